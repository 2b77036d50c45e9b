"""Cluster settings changed while the agent runs: the plan (pure, plain values), the watched
directory as the kubelet writes a mounted ConfigMap, and a proxy taking the new values."""

import asyncio
import datetime
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from nodeagent import live_settings, settings
from nodeagent.agent import config_dir, last_good, settings_reloads
from nodeagent.lab import config as lab_config
from nodeagent.agent.config_dir import CHECK_S, ConfigDir, ConfigDirError, read_texts
from nodeagent.agent.settings_reloads import SettingsReloads
from nodeagent.policy import authz
from nodeagent.proxy import limits
from nodeagent.settings import DEFAULT, SettingsError

BASE = replace(DEFAULT, node_name="node-1", identity_dir=Path("/id"), cluster_dir=Path("/cluster"))


def test_every_cluster_setting_is_live_or_waits_for_a_restart_with_a_reason():
    live_settings.check_tables()
    cluster = {o.attr for o in settings.cluster_options()}
    assert set(live_settings.LIVE) | set(live_settings.NEEDS_RESTART) == cluster
    assert all(reason for reason in {**live_settings.LIVE, **live_settings.NEEDS_RESTART}.values())


def test_the_directory_lays_over_the_command_line_and_a_missing_key_keeps_it():
    base = replace(BASE, log_level="warning", max_connections=10)
    started = live_settings.overlay({"log-level": "debug\n"}, base)
    assert started.log_level == "debug" and started.max_connections == 10
    assert started.node_name == "node-1"  # per-node settings come from the command line only


@pytest.mark.parametrize("texts, flag", [
    ({"log-level": "loud"}, "log-level"),
    ({"pod-limits": "handshakes=0"}, "pod-limits"),
    ({"no-such-setting": "1"}, "no-such-setting"),
    ({"node-name": "elsewhere"}, "node-name"),  # a per-node setting is not the ConfigMap's
    ({"log-level": "debug", "max-connections": "-1"}, "max-connections"),
])
def test_a_bad_key_or_value_refuses_the_whole_set_naming_its_flag(texts, flag):
    with pytest.raises(SettingsError) as raised:
        live_settings.plan(BASE, BASE, texts)
    assert raised.value.flag == flag and f"--{flag}" in str(raised.value)


def test_live_settings_are_applied_and_others_wait_with_the_running_value_kept():
    change = live_settings.plan(BASE, BASE, {"log-level": "debug", "default-policy": "deny", "workers": "3",
                                             "pod-limits": "outbound-connections=1", "mesh-label": "a=b"})
    assert change.applied == ("default-policy", "log-level", "pod-limits")
    assert set(change.needs_restart) == {"mesh-label", "workers"}
    assert change.settings.workers == BASE.workers and change.settings.mesh_label == BASE.mesh_label
    assert change.wanted.workers == 3
    assert change.settings.default_policy is authz.Mode.DENY
    assert change.settings.pod_limits[limits.Limit.OUTBOUND_CONNECTIONS] == 1
    assert change.policy_changed
    applied, waiting = live_settings.describe(BASE, change)
    assert applied[0].startswith("--default-policy: 'all-unauthenticated' -> 'deny', applied live")
    assert any(line.startswith("--workers: '0' -> '3' needs a restart") for line in waiting)


def test_the_same_content_again_changes_nothing_and_a_restart_only_value_put_back_waits_no_more():
    once = live_settings.plan(BASE, BASE, {"workers": "3"})
    assert once.applied == () and once.needs_restart
    back = live_settings.plan(once.settings, BASE, {})
    assert back.applied == () and back.needs_restart == {}


def test_a_key_removed_from_the_directory_goes_back_to_the_command_lines_value():
    base = replace(BASE, log_level="warning")
    running = live_settings.plan(base, base, {"log-level": "debug"}).settings
    change = live_settings.plan(running, base, {})
    assert change.applied == ("log-level",) and change.settings.log_level == "warning"
    assert not change.policy_changed


# --- the directory, as the kubelet writes a mounted ConfigMap ---

def kubelet_write(directory: Path, data: dict[str, str], generation: int) -> None:
    """As the kubelet's AtomicWriter does (lab/config.py writes the lab's so)."""
    lab_config.write(directory, data)
    assert (directory / "..data").is_symlink() and len(list(directory.glob("..2*"))) == 1  # the old one went


def test_a_generation_is_read_whole_through_the_data_link(tmp_path):
    kubelet_write(tmp_path, {"log-level": "debug", "workers": "2"}, 1)
    assert read_texts(tmp_path) == {"log-level": "debug", "workers": "2"}
    kubelet_write(tmp_path, {"log-level": "info"}, 2)
    assert read_texts(tmp_path) == {"log-level": "info"}


def test_a_plain_directory_is_read_as_it_is_and_hidden_entries_are_not_settings(tmp_path):
    (tmp_path / "log-level").write_text("debug")
    (tmp_path / ".hidden").write_text("x")
    assert read_texts(tmp_path) == {"log-level": "debug"}


def test_a_content_no_settings_configmap_could_hold_is_refused(tmp_path):
    (tmp_path / "log-level").write_bytes(b"x" * (config_dir.MAX_VALUE_BYTES + 1))
    with pytest.raises(ConfigDirError, match="longer than"):
        read_texts(tmp_path)
    (tmp_path / "log-level").write_bytes(b"\xff")
    with pytest.raises(ConfigDirError, match="UTF-8"):
        read_texts(tmp_path)


def test_each_new_content_is_given_once_and_only_after_the_check_interval(tmp_path):
    kubelet_write(tmp_path, {"log-level": "info"}, 1)
    watched = ConfigDir(tmp_path, now=0.0)
    assert watched.texts == {"log-level": "info"}
    kubelet_write(tmp_path, {"log-level": "debug"}, 2)
    assert watched.changed(CHECK_S / 2) is None  # not yet looked at
    assert watched.changed(CHECK_S) == {"log-level": "debug"}
    assert watched.changed(2 * CHECK_S) is None


def test_reloads_keep_the_settings_in_use_on_a_bad_value_and_say_why_once(tmp_path, caplog):
    kubelet_write(tmp_path, {"log-level": "info"}, 1)
    reloads = SettingsReloads(tmp_path, BASE, now=0.0)
    running = reloads.initial()
    kubelet_write(tmp_path, {"log-level": "info", "max-connections": "many"}, 2)
    assert reloads.check(running, CHECK_S) is None
    assert reloads.check(running, 2 * CHECK_S) is None
    assert "--max-connections" in reloads.refusal and reloads.counts["refused"] == 1
    assert sum("refused" in r.message for r in caplog.records) == 1
    kubelet_write(tmp_path, {"log-level": "debug", "workers": "4"}, 3)
    change = reloads.check(running, 3 * CHECK_S)
    assert change.applied == ("log-level",) and reloads.refusal is None
    assert reloads.needs_restart.keys() == {"workers"}
    status = reloads.status(change.settings)
    assert status["in_use"]["log-level"] == "debug" and status["in_use"]["workers"] == "0"
    assert status["reloads"] == {"applied": 1, "restart": 0, "unchanged": 0, "refused": 1}
    families = {f.name: f.samples for f in settings_reloads.SettingsCollector(reloads).collect()}
    assert [(s.labels, s.value) for s in families["config_needs_restart"]] == [({"setting": "workers"}, 1)]


def test_a_proxy_takes_the_live_values(tmp_path):
    from nodeagent.identity.ca import Authority
    from nodeagent.identity.workload import WorkloadIdentities
    from nodeagent.proxy.server import Proxy

    anchor = Authority.new_anchor("cluster.local")
    identities = WorkloadIdentities(anchor.new_issuer("cluster.local"), anchor.certificate_pem())

    async def main():
        proxy = Proxy(None, identities, BASE, processes=2)
        try:
            change = live_settings.plan(BASE, BASE, {
                "max-connections": "7", "memory-budget": "64Mi", "on-node-plaintext": "true", "cert-lifetime": "1h",
                "default-policy": "all-authenticated", "cluster-networks": "10.0.0.0/8",
                "access-log": str(tmp_path / "access.log")})
            # Node-wide, --max-connections is shared out over the processes (each its own table).
            assert proxy.connections.max_connections == BASE.max_connections // 2
            proxy.apply_settings(change.settings)
            assert proxy.connections.max_connections == 7 // 2
            assert proxy.guard.budget == (64 << 20) // 2
            assert proxy.connector.on_node_plaintext is True
            assert identities.lifetime == datetime.timedelta(hours=1)
            assert proxy.authorizer.default_policy is authz.Mode.ALL_AUTHENTICATED
            assert [str(n) for n in proxy.authorizer.cluster_networks] == ["10.0.0.0/8"]
            assert proxy.telemetry.access_log.destination == str(tmp_path / "access.log")
        finally:
            proxy.close_listeners()

    asyncio.run(main())


def test_the_labs_changes_set_and_remove_keys_and_refuse_what_the_agents_would(tmp_path):
    assert lab_config.change(tmp_path, ["log-level=debug", "workers=2"]) == {"log-level": "debug", "workers": "2"}
    assert lab_config.change(tmp_path, ["workers-"]) == {"log-level": "debug"}
    assert read_texts(tmp_path) == {"log-level": "debug"} and not (tmp_path / "workers").exists()
    with pytest.raises(ValueError, match="--default-policy"):
        lab_config.change(tmp_path, ["default-policy=maybe"])
    assert read_texts(tmp_path) == {"log-level": "debug"}
    lab_config.change(tmp_path, ["default-policy=maybe"], check=False)
    assert read_texts(tmp_path)["default-policy"] == "maybe"
    with pytest.raises(ValueError, match="KEY=VALUE"):
        lab_config.parse_changes(["log-level"])


def test_an_agent_starting_on_a_bad_content_refuses_it_as_at_runtime_and_starts_from_the_last_good(
        tmp_path, caplog):
    settings_dir, state = tmp_path / "config", tmp_path / "state"
    state.mkdir()
    kubelet_write(settings_dir, {"max-connections": "500", "workers": "3"}, 1)
    first = SettingsReloads(settings_dir, BASE, now=0.0, state_dir=state)
    assert first.initial().max_connections == 500 and first.status(BASE)["started_from"] == "directory"
    kubelet_write(settings_dir, {"max-connections": "600", "workers": "3"}, 2)
    assert first.check(BASE, CHECK_S).settings.max_connections == 600  # applied: the new last good
    kubelet_write(settings_dir, {"max-connections": "many", "workers": "4"}, 3)
    assert first.check(BASE, 2 * CHECK_S) is None

    restarted = SettingsReloads(settings_dir, BASE, now=0.0, state_dir=state)  # an OOM kill, a reboot, a roll
    running = restarted.initial()
    assert (running.max_connections, running.workers) == (600, 3)
    assert "--max-connections" in restarted.refusal and restarted.counts["refused"] == 1
    assert restarted.status(running)["started_from"] == "last-good"
    assert any("refused" in r.message and "--max-connections" in r.message for r in caplog.records)
    assert restarted.check(running, CHECK_S) is None and restarted.counts["refused"] == 1  # reported once
    kubelet_write(settings_dir, {"max-connections": "700"}, 4)  # fixed: taken live as usual
    change = restarted.check(running, 2 * CHECK_S)
    assert change.settings.max_connections == 700 and restarted.refusal is None

    kubelet_write(settings_dir, {"max-connections": "many"}, 5)
    new_node = SettingsReloads(settings_dir, BASE, now=0.0, state_dir=tmp_path / "empty")
    assert new_node.initial() == BASE and new_node.status(BASE)["started_from"] == "command-line"
    kubelet_write(settings_dir, {"log-level": "x" * (config_dir.MAX_VALUE_BYTES + 1)}, 6)  # refused, not fatal
    no_copy = SettingsReloads(settings_dir, BASE, now=0.0)
    assert no_copy.initial() == BASE and "longer than" in no_copy.refusal


def test_run_starts_on_a_bad_content_but_not_on_a_bad_flag_or_a_missing_directory(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from nodeagent.agent import agent
    from nodeagent.cli import main

    started = []
    monkeypatch.setattr(agent, "run_agent", lambda settings_, source, reloads: started.append((settings_, reloads)))
    settings_dir = tmp_path / "config"
    lab_config.write(settings_dir, {"default-policy": "maybe"})
    args = ["run", "--node-name", "n", "--identity-dir", str(tmp_path), "--cluster-dir", str(tmp_path),
            "--cgroup", str(tmp_path), "--config-dir", str(settings_dir)]
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    [(running, reloads)] = started
    assert running.default_policy is DEFAULT.default_policy and "--default-policy" in reloads.refusal
    done = CliRunner().invoke(main, [*args, "--default-policy", "maybe"])  # the operator's own invocation
    assert done.exit_code == 2 and "--default-policy" in done.output
    done = CliRunner().invoke(main, [*args[:-1], str(tmp_path / "missing")])
    assert done.exit_code == 2 and "cannot read" in done.output and len(started) == 1


def test_the_agent_applies_a_new_content_to_its_proxy_and_log_level_and_reports_the_rest(tmp_path):
    import logging

    from nodeagent.agent.agent import Agent
    from nodeagent.identity.ca import Authority
    from nodeagent.identity.workload import WorkloadIdentities
    from nodeagent.proxy.server import Proxy

    anchor = Authority.new_anchor("cluster.local")
    identities = WorkloadIdentities(anchor.new_issuer("cluster.local"), anchor.certificate_pem())
    lab_config.write(tmp_path, {})
    reloads = SettingsReloads(tmp_path, BASE, now=time.monotonic() - CHECK_S)  # due at once
    root = logging.getLogger()
    level = root.level

    async def main():
        agent = Agent(reloads.initial(), None, reloads)
        agent.proxy = Proxy(None, identities, agent.config)
        try:
            lab_config.write(tmp_path, {"max-connections": "9", "log-level": "error", "fast-path": "splice"})
            agent._reload_settings()
            assert agent.config.max_connections == 9 and agent.proxy.connections.max_connections == 9
            assert agent.proxy.settings is agent.config and root.level == logging.ERROR
            assert agent.config.fast_paths == 0 and set(reloads.needs_restart) == {"fast-path"}
        finally:
            agent.proxy.close_listeners()
            root.setLevel(level)

    asyncio.run(main())


def test_tracing_turned_on_off_and_moved_live_keeps_one_exporter_per_process():
    from nodeagent.identity.ca import Authority
    from nodeagent.identity.workload import WorkloadIdentities
    from nodeagent.proxy.otlp import parse_endpoint
    from nodeagent.proxy.server import Proxy

    anchor = Authority.new_anchor("cluster.local")
    identities = WorkloadIdentities(anchor.new_issuer("cluster.local"), anchor.certificate_pem())

    async def main():
        proxy = Proxy(None, identities, BASE)
        telemetry = proxy.telemetry
        try:
            assert telemetry.tracer is None
            on = live_settings.plan(BASE, BASE, {"trace-collector": "http://127.0.0.1:14318", "trace-sampling": "0.5"})
            proxy.apply_settings(on.settings)
            tracer = telemetry.tracer
            assert tracer.rate == 0.5 and tracer.exporter.target == parse_endpoint("http://127.0.0.1:14318")
            proxy.apply_settings(live_settings.plan(on.settings, BASE, {}).settings)
            assert telemetry.tracer is None  # new connections untraced; the old ones keep `tracer`
            moved = live_settings.plan(BASE, BASE, {"trace-collector": "http://127.0.0.2:4318/x"})
            proxy.apply_settings(moved.settings)
            assert telemetry.tracer is tracer and tracer.exporter.target == ("127.0.0.2", 4318, "/x")
            assert tracer.rate == BASE.trace_sampling
        finally:
            proxy.close_listeners()

    asyncio.run(main())


def test_a_drain_timeout_raised_beyond_the_pods_grace_period_is_warned_of_at_start_and_live(tmp_path, caplog):
    assert live_settings.drain_beyond_grace(600.0, 630.0) is None
    assert live_settings.drain_beyond_grace(3600.0, None) is None  # not told: nothing to say
    assert "terminationGracePeriodSeconds (630 s) allows (600 s" in live_settings.drain_beyond_grace(601.0, 630.0)
    assert settings_reloads.termination_grace({live_settings.GRACE_ENV: "630"}) == 630.0
    assert settings_reloads.termination_grace({}) is None and settings_reloads.termination_grace({"x": "y"}) is None
    assert settings_reloads.termination_grace({live_settings.GRACE_ENV: "soon"}) is None

    kubelet_write(tmp_path, {"drain-timeout": "10m"}, 1)
    reloads = SettingsReloads(tmp_path, BASE, now=0.0, grace_s=630.0)
    running = reloads.initial()
    assert not [r for r in caplog.records if "SIGKILL" in r.message]
    kubelet_write(tmp_path, {"drain-timeout": "1h"}, 2)
    change = reloads.check(running, CHECK_S)
    assert change.settings.drain_timeout == 3600.0  # applied: the next drain takes it, as documented
    [warning] = [r for r in caplog.records if "SIGKILL" in r.message]
    assert warning.levelname == "WARNING" and "--drain-timeout 1h" in warning.message
    assert "(630 s)" in warning.message
    restarted = SettingsReloads(tmp_path, BASE, now=0.0, grace_s=630.0)
    restarted.initial()
    assert len([r for r in caplog.records if "SIGKILL" in r.message]) == 2


def test_a_key_that_is_not_a_plain_file_name_is_never_written_even_unchecked(tmp_path):
    directory = tmp_path / "lab" / "config"
    lab_config.change(directory, ["log-level=debug"])
    for key in ("../../escaped", "../escaped", "..data", ".hidden", "a/b", "a..b", "sp ace", ""):
        with pytest.raises(ValueError, match="plain file name"):
            lab_config.change(directory, [f"{key}=1"], check=False)
    with pytest.raises(ValueError, match="plain file name"):
        lab_config.write(directory, {"../../escaped": "1"})
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if "..20" not in p.as_posix()) == [
        "lab", "lab/config", "lab/config/..data", "lab/config/log-level"]
    assert read_texts(directory) == {"log-level": "debug"}
    assert config_dir.plain_key("drain-timeout") and config_dir.plain_key("a.b_c-1")


def test_the_reader_ignores_and_reports_an_entry_that_is_not_a_settings_file(tmp_path, caplog):
    (tmp_path / "log-level").write_text("debug")
    (tmp_path / "sp ace").write_text("x")
    (tmp_path / "sub").mkdir()
    generation = config_dir.read_generation(tmp_path)
    assert generation.texts == {"log-level": "debug"}
    assert generation.ignored == ["'sp ace': not a plain key name", "'sub': not a regular file"]
    reloads = SettingsReloads(tmp_path, BASE, now=0.0)
    assert reloads.initial().log_level == "debug" and reloads.refusal is None
    assert reloads.status(BASE)["ignored"] == generation.ignored
    assert any("ignored" in r.message and "'sp ace'" in r.message for r in caplog.records)


def test_an_unreadable_directory_is_counted_and_warned_of_after_a_few_reads_at_most_once_a_minute(tmp_path, caplog):
    settings_dir = tmp_path / "config"
    kubelet_write(settings_dir, {"log-level": "info"}, 1)
    reloads = SettingsReloads(settings_dir, BASE, now=0.0)
    running = reloads.initial()
    settings_dir.rename(tmp_path / "gone")  # a broken mount, say
    warnings = lambda: [r for r in caplog.records if r.levelname == "WARNING" and "cannot be read" in r.message]  # noqa: E731
    checks = [CHECK_S * k for k in range(1, 41)]  # 80 s
    for now in checks[:2]:
        assert reloads.check(running, now) is None
    assert reloads.files.unreadable == 2 and warnings() == []  # a swap mid-read fails one read, not a warning
    for now in checks[2:]:
        assert reloads.check(running, now) is None
    assert reloads.files.unreadable == 40 and reloads.status(running)["unreadable"] == 40
    assert len(warnings()) == 2 and "3 reads in a row" in warnings()[0].message  # at 6 s, then at 66 s
    families = {f.name: f.samples for f in settings_reloads.SettingsCollector(reloads).collect()}
    assert families["config_dir_unreadable"][0].value == 40
    (tmp_path / "gone").rename(settings_dir)
    kubelet_write(settings_dir, {"log-level": "debug"}, 2)
    assert reloads.check(running, 41 * CHECK_S).settings.log_level == "debug"
    assert reloads.files._failing == 0


def test_a_last_good_copy_that_is_not_ours_is_ignored(tmp_path, caplog):
    kubelet_write(tmp_path / "config", {"max-connections": "many"}, 1)
    for text in ("[1, 2]", "{not json", " " * (last_good.MAX_COPY_BYTES + 1)):
        (tmp_path / last_good.LastGood.NAME).write_text(text)
        reloads = SettingsReloads(tmp_path / "config", BASE, now=0.0, state_dir=tmp_path)
        assert reloads.initial() == BASE and reloads.start is settings_reloads.Start.COMMAND_LINE
    assert sum("last settings applied" in r.message or "not a copy" in r.message for r in caplog.records) == 3
