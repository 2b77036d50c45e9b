"""The cluster settings (the ConfigMap) changed while the agent runs: which change live, which
wait for a restart. Pure: plain values in, plain values out.

The ConfigMap is a directory of files, one per CLUSTER setting, named by its flag
(agent/config_dir.py reads it). Its settings lay over the command line's: a key the directory
holds overrides the flag; a key it lacks keeps the command line's value, else the default. A new
directory is validated whole (`plan`): one bad value refuses the whole set, naming its flag, and
the settings in use stay. Of a valid set, each setting in LIVE is applied to the running agent
and its workers (established connections keep what they were admitted with, but for those a new
policy refuses and those a lowered memory budget makes the memory guard cut; new connections and
new certificates use the new value); each in NEEDS_RESTART keeps its running value and is
reported, with the reason, until a restart takes it (the DaemonSet rolls hitlessly).
"""

from collections.abc import Mapping
from dataclasses import dataclass, replace

from nodeagent import settings as model
from nodeagent.settings import AgentSettings, Scope, SettingsError

RESTART_HINT = "needs a restart (the DaemonSet rolls hitlessly: kubectl -n nodeagent rollout restart ds/nodeagent)"

# attr -> why a running agent cannot take a new value.
NEEDS_RESTART = {
    "mesh_label": "which pods are meshed is also the admission policy's rule, rendered from the label at install: "
                  "change both together (helm upgrade, or nodeagent install)",
    "trust_domain": "every workload identity and the identity each mTLS hop expects of its peer are named in it, "
                    "on every node at once, with an issuer of that domain",
    "fast_paths": "which BPF programs are attached, and the data path's config, are set when the data path loads",
    "workers": "the proxy processes start with the agent, and each holds connections of its own",
}
# attr -> where the new value takes effect.
LIVE = {
    "cert_lifetime": "certificates issued from now on (renewals included)",
    "default_policy": "connections authorized from now on; open inbound connections the new policy refuses are "
                      "closed, as on an annotation change",
    "cluster_networks": "as default-policy",
    "on_node_plaintext": "hops planned from now on",
    "log_level": "every process's log at once",
    "pod_limits": "every pod's next admission (its Namespace's limit annotations still win; a pod's own may only "
                  "lower); what a pod holds over a lowered limit stays, and it gets no more until under it",
    "max_connections": "the node's next admission (each proxy process admits its share: the value divided by "
                       "their number)",
    "memory_budget": "the memory guard's next check (a process left above its share cuts the established "
                     "connections holding the most buffered bytes, as in any memory emergency)",
    "drain_timeout": "the next drain (the DaemonSet's terminationGracePeriodSeconds follows only at install: "
                     "a longer drain than it allows is warned of)",
    "trace_sampling": "traces started from now on",
    "trace_collector": "connections opened from now on are traced (or not, when emptied); spans are posted to the "
                       "new collector from the next batch on",
    "access_log": "lines written from now on, established connections' too (each process's writer opens the new "
                  "destination before its next write)",
}
POLICY_ATTRS = ("default_policy", "cluster_networks")
# The DaemonSet's terminationGracePeriodSeconds is drain-timeout plus this, set at install; the
# chart also gives it to the agent in GRACE_ENV, so a drain-timeout raised live beyond what the
# kubelet waits for is told (a drain that long is SIGKILLed before its deadline).
TERMINATION_MARGIN_S = 30
GRACE_ENV = "NODEAGENT_TERMINATION_GRACE_S"
UNDECLARED = "not declared live (live_settings.LIVE)"  # a new setting waits for a restart until it is


def waits_for_restart(attr: str) -> bool:
    return attr not in LIVE


def why_restart(attr: str) -> str:
    return NEEDS_RESTART.get(attr, UNDECLARED)


@dataclass(frozen=True)
class Change:
    settings: AgentSettings  # what the agent runs with from now: the new live values, the running others
    wanted: AgentSettings  # what the directory asks for, all of it
    applied: tuple[str, ...]  # flags whose new value is applied live
    needs_restart: dict[str, str]  # flag -> why, for each setting whose wanted value waits for a restart

    @property
    def policy_changed(self) -> bool:
        return any(model.BY_FLAG[flag].attr in POLICY_ATTRS for flag in self.applied)


def overlay(texts: Mapping[str, str], base: AgentSettings) -> AgentSettings:
    """`base` (the command line's settings) with the directory's values over it. Only CLUSTER
    settings may be in the directory; SettingsError names the first bad key or value."""
    for flag in sorted(texts):
        option = model.BY_FLAG.get(flag)
        if option is not None and option.scope is not Scope.CLUSTER:
            raise SettingsError(flag, "a per-node setting: give it on the command line, not in the ConfigMap")
    return model.parse({flag: text.strip() for flag, text in texts.items()}, base)


def plan(running: AgentSettings, base: AgentSettings, texts: Mapping[str, str]) -> Change:
    """What a new directory content changes in an agent running with `running` (started from the
    command line's `base`). SettingsError (nothing changes) if any key or value is bad."""
    wanted = overlay(texts, base)
    kept = {o.attr: getattr(running, o.attr) for o in model.cluster_options() if waits_for_restart(o.attr)}
    effective = replace(wanted, **kept)
    applied = tuple(o.flag for o in model.cluster_options() if getattr(effective, o.attr) != getattr(running, o.attr))
    waiting = {o.flag: why_restart(o.attr) for o in model.cluster_options()
               if waits_for_restart(o.attr) and getattr(wanted, o.attr) != getattr(running, o.attr)}
    return Change(effective, wanted, applied, waiting)


def drain_beyond_grace(drain_timeout: float, grace_s: float | None) -> str | None:
    """Why a drain of `drain_timeout` would be SIGKILLed by the kubelet before its deadline, or
    None (also when the pod's grace period is not known)."""
    if grace_s is None or drain_timeout + TERMINATION_MARGIN_S <= grace_s:
        return None
    return (f"--drain-timeout {model.BY_FLAG['drain-timeout'].show(drain_timeout)} is longer than this pod's "
            f"terminationGracePeriodSeconds ({grace_s:.0f} s) allows ({max(grace_s - TERMINATION_MARGIN_S, 0):.0f} s "
            f"with the {TERMINATION_MARGIN_S} s margin): a drain that long is killed (SIGKILL) before its deadline, "
            f"its connections reset; the grace period follows only with helm upgrade / nodeagent install, "
            f"which rolls the agents")


def describe(running: AgentSettings, change: Change) -> tuple[list[str], list[str]]:
    """Log lines for the settings whose wanted value differs from the running one, each with its
    old and new text: (applied live, and where), (waiting for a restart, and why)."""
    applied = [f"--{flag}: {model.show(running, model.BY_FLAG[flag])!r} -> "
               f"{model.show(change.settings, model.BY_FLAG[flag])!r}, applied live: {LIVE[model.BY_FLAG[flag].attr]}"
               for flag in change.applied]
    waiting = [f"--{flag}: {model.show(running, model.BY_FLAG[flag])!r} -> "
               f"{model.show(change.wanted, model.BY_FLAG[flag])!r} {RESTART_HINT}: {why}"
               for flag, why in change.needs_restart.items()]
    return applied, waiting


def check_tables() -> None:
    """Every CLUSTER setting is either live or waits for a restart, never both, never neither."""
    cluster = {o.attr for o in model.cluster_options()}
    both, neither = set(LIVE) & set(NEEDS_RESTART), cluster - set(LIVE) - set(NEEDS_RESTART)
    extra = (set(LIVE) | set(NEEDS_RESTART)) - cluster
    if both or neither or extra:
        raise AssertionError(f"live_settings tables: both {both}, neither {neither}, not cluster settings {extra}")

