"""The settings model (nodeagent/settings.py): one table, and everything built from it."""

import subprocess
import sys
from pathlib import Path

import pytest

from nodeagent import settings
from nodeagent.datapath import abi
from nodeagent.policy import authz


def test_defaults_are_the_documented_ones():
    d = settings.DEFAULT
    assert d.trust_domain == "cluster.local" and d.default_policy is authz.Mode.ALL_UNAUTHENTICATED
    assert d.cert_lifetime == 24 * 3600 and d.admin == ("127.0.0.1", 4191) and d.workers == 0


def test_text_is_parsed_and_validated_per_flag():
    s = settings.parse({"fast-path": "splice,skb", "cert-lifetime": "90m", "default-policy": "deny",
                        "on-node-plaintext": "True", "workers": "3", "admin": "127.0.0.2:9999",
                        "metrics": "0.0.0.0:4190", "sidecar-pod": "ns/pod", "cluster-networks": "10.0.0.0/8, fd00::/8"})
    assert s.fast_paths == abi.FAST_SPLICE | abi.FAST_SKB
    assert s.cert_lifetime == 5400 and s.default_policy is authz.Mode.DENY and s.on_node_plaintext
    assert s.workers == 3 and s.admin == ("127.0.0.2", 9999) and s.sidecar_pod == "ns/pod"
    assert s.metrics == ("0.0.0.0", 4190) and settings.DEFAULT.metrics is None
    assert s.cluster_networks == ("10.0.0.0/8", "fd00::/8") and len(s.networks) == 2


@pytest.mark.parametrize("flag, text, message", [
    ("fast-path", "splice,warp", "'warp': a list of splice, skb, loopback"),
    ("fast-path", "skb", "skb and loopback come on top of splice"),
    ("cert-lifetime", "forever", "not a duration"),
    ("cert-lifetime", "10ms", "not between 2s and 366 days"),  # expired when issued: a certificate per connection
    ("cert-lifetime", "100000h", "not between 2s and 366 days"),
    ("default-policy", "open", "one of all-unauthenticated"),
    ("workers", "999", "not in 0..256"),
    ("admin", "localhost", "not HOST:PORT"),
    ("admin", "127.0.0.1:70000", "out of range"),
    ("admin", "0.0.0.0:4191", "not a loopback address"),  # /tap and /stats stay private
    ("metrics", "4190", "not HOST:PORT"),
    ("mesh-label", "nodeagent.io/mesh", "must be KEY=VALUE"),
    ("sidecar-pod", "just-a-name", "must be NAMESPACE/NAME"),
    ("on-node-plaintext", "maybe", "not a boolean"),
    ("cluster-networks", "10.0.0.0/33", "10.0.0.0/33"),
    ("log-level", "loud", "one of debug"),
    ("no-such-flag", "1", "unknown setting"),
])
def test_a_bad_value_names_its_flag(flag, text, message):
    with pytest.raises(settings.SettingsError) as caught:
        settings.parse({flag: text})
    assert caught.value.flag == flag and str(caught.value).startswith(f"--{flag}: ") and message in str(caught.value)


def test_arguments_round_trip_through_the_parser():
    s = settings.parse({"node-name": "n1", "kube": "true", "fast-path": "splice", "workers": "2",
                        "cert-lifetime": "1h", "default-policy": "cluster-authenticated", "identity-dir": "/x"})
    args = settings.to_args(s)
    assert "--kube" in args and "--fast-path=splice" in args and "--cert-lifetime=1h" in args
    texts = dict(arg[2:].split("=", 1) if "=" in arg else (arg[2:], "true") for arg in args)
    assert settings.parse(texts) == s


def test_the_config_map_holds_every_cluster_setting_and_parses_back():
    s = settings.parse({"trust-domain": "example.org", "workers": "4", "on-node-plaintext": "true"})
    data = settings.config_map(s)
    assert set(data) == {o.flag for o in settings.cluster_options()}
    assert settings.parse(data) == s  # node settings stay at their defaults


@pytest.mark.parametrize("texts, flag", [
    ({"cluster-dir": "/c", "identity-dir": "/i"}, "node-name"),
    ({"node-name": "n", "cluster-dir": "/c"}, "identity-dir"),
    ({"node-name": "n", "identity-dir": "/i"}, "cluster-dir"),
    ({"node-name": "n", "identity-dir": "/i", "cluster-dir": "/c", "kube": "true"}, "cluster-dir"),
    ({"node-name": "n", "identity-dir": "/i", "cluster-dir": "/c", "sidecar-pod": "a/b"}, "cgroup"),
])
def test_what_run_needs_is_checked_with_the_flag_at_fault(texts, flag):
    with pytest.raises(settings.SettingsError) as caught:
        settings.parse(texts).check_runnable()
    assert caught.value.flag == flag


def test_sidecar_without_cgroup_says_so_on_the_command_line(tmp_path):
    # It used to look for the node's kubepods cgroup first and complain about that instead.
    done = subprocess.run([sys.executable, "-m", "nodeagent", "run", "--node-name", "n", "--cluster-dir",
                           str(tmp_path), "--identity-dir", str(tmp_path), "--sidecar-pod", "ns/pod"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "--sidecar-pod needs --cgroup" in done.stderr


def test_run_offers_every_setting_and_refuses_a_bad_one(tmp_path):
    helped = subprocess.run([sys.executable, "-m", "nodeagent", "run", "--help"], capture_output=True, text=True)
    for option in settings.OPTIONS:
        assert f"--{option.flag}" in helped.stdout
    done = subprocess.run([sys.executable, "-m", "nodeagent", "run", "--node-name", "n", "--cluster-dir",
                           str(tmp_path), "--identity-dir", str(tmp_path), "--workers", "-1"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "--workers" in done.stderr and "not in 0..256" in done.stderr


def test_workers_and_sidecars_count_processes():
    assert settings.parse({"workers": "0"}).processes(cores=8) == 8
    assert settings.parse({"workers": "3"}).processes(cores=8) == 3
    assert settings.parse({"workers": "3", "sidecar-pod": "a/b"}).processes(cores=8) == 1


def test_pin_names_are_per_node_or_per_sidecar():
    assert settings.parse({"node-name": "n1"}).pin_name == "n1"
    assert settings.parse({"node-name": "n1", "sidecar-pod": "ns/p"}).pin_name == "sidecar-ns-p"
    assert isinstance(settings.DEFAULT.pin_root, Path)


def test_the_demo_names_only_commands_and_flags_that_exist():
    import re

    from nodeagent.demo import MORE

    assert "Not yet" not in MORE  # it used to call HTTP/2 balancing, workers and fast paths missing
    helped = subprocess.run([sys.executable, "-m", "nodeagent", "--help"], capture_output=True, text=True).stdout
    for command in re.findall(r"`nodeagent (\w+)", MORE):
        assert f"  {command} " in helped
    run_help = subprocess.run([sys.executable, "-m", "nodeagent", "run", "--help"], capture_output=True,
                              text=True).stdout
    for flag in re.findall(r"(--[\w-]+)", MORE):
        assert flag in run_help


def test_lab_up_says_what_each_mesh_mode_is_and_the_readme_shows_it():
    from nodeagent.lab.lab import MESH_MODES

    helped = subprocess.run([sys.executable, "-m", "nodeagent", "lab", "up", "--help"], capture_output=True,
                            text=True).stdout
    flat = " ".join(helped.split())
    for mode in MESH_MODES:
        assert f"{mode}:" in flat  # sidecar used to be missing
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert "nodeagent lab up [--nodes 2] [--pods 5] [--no-enroll] [--mesh none|node|sidecar]" in readme


def test_settings_travel_to_worker_processes_pickled():
    import pickle

    s = settings.parse({"pod-limits": "handshakes=3", "workers": "4", "fast-path": "splice"})
    assert pickle.loads(pickle.dumps(s)) == s  # a mappingproxy inside once killed every worker's start
