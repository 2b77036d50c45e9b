"""The agent's settings: one validated model, and every place they are spelled out built from it.

Each setting is declared once in OPTIONS: its attribute, its command-line flag, how its text is
parsed and printed, its default, and its scope. From that table come `nodeagent run`'s options
(cli.py), the AgentSettings the agent and its worker processes share (workers receive the same
object), the DaemonSet's arguments and its ConfigMap (deploy/render.py; the Helm chart iterates
the same keys), and the lab's agent command lines.

Scopes: NODE settings differ per node or per deployment and are given on the command line;
CLUSTER settings are the same on every node and live in the ConfigMap, keyed by the flag's name
(`--trust-domain` <-> `trust-domain`), which the agent reads from `--config-dir` and watches
(live_settings.py: which of them change live). A value is validated where it is parsed: a bad
one is an error naming the flag, never a silent default.
"""

import datetime
import enum
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path

from nodeagent.datapath import abi
from nodeagent.datapath.pins import DEFAULT_ROOT
from nodeagent.identity import naming
from nodeagent.policy import authz
from nodeagent.proxy import limits
from nodeagent.proxy.limits import PodLimits

DEFAULT_PIN_ROOT = DEFAULT_ROOT  # NODEAGENT_BPF_ROOT overrides it (pins.py)
DEFAULT_ADMIN = ("127.0.0.1", 4191)
# Linkerd's default clusterNetworks: plaintext clients from these count as in-cluster.
DEFAULT_CLUSTER_NETWORKS = ("10.0.0.0/8", "100.64.0.0/10", "172.16.0.0/12", "192.168.0.0/16")
LOG_LEVELS = ("debug", "info", "warning", "error")
FAST_PATH_NAMES = {"splice": abi.FAST_SPLICE, "skb": abi.FAST_SKB, "loopback": abi.FAST_LOOPBACK}


class Scope(enum.Enum):
    NODE = "node"  # on the command line, per node or deployment
    CLUSTER = "cluster"  # in the ConfigMap, the same on every node


class SettingsError(ValueError):
    def __init__(self, flag: str, message: str):
        super().__init__(f"--{flag}: {message}")
        self.flag = flag


# --- value kinds: text -> value, value -> text ---

def _text(value: str) -> str:
    if not value:
        raise ValueError("must not be empty")
    return value


def _optional_text(value: str) -> str | None:
    return value or None


def _path(value: str) -> Path:
    return Path(_text(value))


def _optional_path(value: str) -> Path | None:
    return Path(value) if value else None


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r} (true or false)")


def _print_bool(value: bool) -> str:
    return "true" if value else "false"


def parse_duration(text: str) -> float:
    """Seconds from "500ms", "10s", "5m", "24h"."""
    from nodeagent.proxy.service_config import parse_duration as parse

    return parse(text)


def _print_duration(seconds: float) -> str:
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{round(seconds * 1000)}ms"


def _int_range(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        number = int(value)
        if not low <= number <= high:
            raise ValueError(f"{number} is not in {low}..{high}")
        return number
    return parse


# Certificates carry whole seconds: below 2 s one is expired when issued (a "10ms" typo would mint
# a certificate per connection and fail every handshake). Above a year, a stolen workload key
# stays good for longer than any issuer is normally kept (Linkerd's issuer default: 1 year).
CERT_LIFETIME_MIN_S, CERT_LIFETIME_MAX_S = 2.0, 366 * 24 * 3600.0


def _cert_lifetime(value: str) -> float:
    seconds = parse_duration(value)
    if not CERT_LIFETIME_MIN_S <= seconds <= CERT_LIFETIME_MAX_S:
        raise ValueError(f"{value} is not between 2s and 366 days (8784h)")
    return seconds


def _address(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        raise ValueError(f"not HOST:PORT: {value!r}")
    ipaddress.ip_address(host or "127.0.0.1")
    number = int(port)
    if not 0 < number < 65536:
        raise ValueError(f"port {number} out of range")
    return host or "127.0.0.1", number


def _print_address(value: tuple[str, int]) -> str:
    return f"{value[0]}:{value[1]}"


def _loopback_address(value: str) -> tuple[str, int]:
    """The admin port serves /tap and /stats: loopback only (agent/admin.py)."""
    host, port = _address(value)
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError(f"{host} is not a loopback address: /tap and /stats stay private; "
                         f"serve Prometheus and probes with --metrics")
    return host, port


def _optional_address(value: str) -> tuple[str, int] | None:
    return _address(value) if value else None


def _show_optional_address(value: tuple[str, int] | None) -> str:
    return "" if value is None else _print_address(value)


def _mesh_label(value: str) -> str:
    key, sep, label = value.partition("=")
    if not key or not sep or not label:
        raise ValueError(f"must be KEY=VALUE, not {value!r}")
    return value


def _pod_ref(value: str) -> str | None:
    if not value:
        return None
    namespace, sep, name = value.partition("/")
    if not namespace or not sep or not name or "/" in name:
        raise ValueError(f"must be NAMESPACE/NAME, not {value!r}")
    return value


def _policy(value: str) -> authz.Mode:
    try:
        return authz.Mode(value)
    except ValueError:
        raise ValueError(f"{value!r}: one of {', '.join(m.value for m in authz.Mode)}") from None


def _log_level(value: str) -> str:
    if value.lower() not in LOG_LEVELS:
        raise ValueError(f"{value!r}: one of {', '.join(LOG_LEVELS)}")
    return value.lower()


def parse_fast_paths(value: str) -> int:
    bits = 0
    for name in filter(None, (part.strip() for part in value.split(","))):
        if name not in FAST_PATH_NAMES:
            raise ValueError(f"{name!r}: a list of {', '.join(FAST_PATH_NAMES)}")
        bits |= FAST_PATH_NAMES[name]
    if bits and not bits & abi.FAST_SPLICE:
        raise ValueError("skb and loopback come on top of splice")
    return bits


def _print_fast_paths(bits: int) -> str:
    return ",".join(name for name, bit in FAST_PATH_NAMES.items() if bits & bit)


def _pod_limits(value: str) -> PodLimits:
    return limits.parse(value)


_SIZES = {"": 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30}


def parse_size(value: str) -> int:
    """Bytes from "400Mi", "1Gi", "65536" (Kubernetes' binary suffixes)."""
    text = value.strip()
    number, unit = text.rstrip("KMGi"), text[len(text.rstrip("KMGi")):]
    if unit not in _SIZES or not number.isdigit():
        raise ValueError(f"not a size: {value!r} (e.g. 400Mi, 1Gi)")
    size = int(number) * _SIZES[unit]
    if size < 16 << 20:
        raise ValueError(f"{value} is less than 16Mi")
    return size


def _print_size(size: int) -> str:
    for unit in ("Gi", "Mi", "Ki"):
        if size % _SIZES[unit] == 0:
            return f"{size // _SIZES[unit]}{unit}"
    return str(size)


def _access_log(value: str) -> str:
    """stderr, or an absolute path to append lines to."""
    if value != "stderr" and not value.startswith("/"):
        raise ValueError(f"{value!r}: 'stderr' or an absolute file path")
    return value


def _trace_collector(value: str) -> str | None:
    if not value:
        return None
    from nodeagent.proxy.otlp import parse_endpoint

    parse_endpoint(value)
    return value


def _fraction(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{number} is not in 0..1")
    return number


def _networks(value: str) -> tuple[str, ...]:
    parts = tuple(filter(None, (part.strip() for part in value.split(","))))
    for part in parts:
        ipaddress.ip_network(part)
    return parts


@dataclass(frozen=True)
class Option:
    attr: str
    flag: str
    parse: Callable[[str], object]
    show: Callable[[object], str]
    default: object
    scope: Scope
    help: str
    metavar: str | None = None
    switch: bool = False  # a bare flag on the command line (`--kube`), true when given


def _option(attr, parse, default, scope, help, show=str, flag=None, metavar=None, switch=False) -> Option:
    return Option(attr, flag or attr.replace("_", "-"), parse, show, default, scope, help, metavar, switch)


def _show_optional(value) -> str:
    return "" if value is None else str(value)


OPTIONS: tuple[Option, ...] = (
    # Where this agent is and what it follows.
    _option("node_name", _optional_text, None, Scope.NODE, "This node's name (Pods' spec.nodeName).",
            _show_optional),
    _option("cluster_dir", _optional_path, None, Scope.NODE,
            "Follow a directory of Kubernetes manifests (the lab's cluster).", _show_optional),
    _option("kube", _bool, False, Scope.NODE, "Follow the Kubernetes API (in-cluster config, or --kubeconfig).",
            _print_bool, switch=True),
    _option("kubeconfig", _optional_path, None, Scope.NODE, "A kubeconfig file for --kube.", _show_optional),
    _option("cgroup", _optional_path, None, Scope.NODE,
            "The cgroup v2 directory of this node's pods (default: kubepods under the cgroup2 mount); "
            "in sidecar mode, the pod's own cgroup.", _show_optional),
    _option("pin_root", _path, DEFAULT_PIN_ROOT, Scope.NODE, "Where the data path is pinned on bpffs."),
    _option("identity_dir", _optional_path, None, Scope.NODE,
            "The issuer Secret's files: ca.crt, issuer.crt, issuer.key (see `identity init`).", _show_optional),
    _option("config_dir", _optional_path, None, Scope.NODE,
            "The cluster settings as a mounted ConfigMap: one file per setting, named by its flag, over the "
            "command line's; watched, and a change is applied live (those that cannot be are reported as "
            "needing a restart: README, Changing settings).", _show_optional),
    _option("state_dir", _optional_path, None, Scope.NODE,
            "A writable directory kept across the agent's restarts on this node (the DaemonSet's hostPath "
            "/var/lib/nodeagent): the last --config-dir content applied is copied there, and an agent that "
            "starts while the directory holds a bad one starts from it (README, Changing settings).",
            _show_optional),
    _option("admin", _loopback_address, DEFAULT_ADMIN, Scope.NODE,
            "Admin address, loopback only: /live, /ready, /metrics, /stats, /tap.", _print_address,
            metavar="HOST:PORT"),
    _option("metrics", _optional_address, None, Scope.NODE,
            "Also serve /metrics, /live and /ready (nothing else) here: for Prometheus and probes.",
            _show_optional_address, metavar="HOST:PORT"),
    _option("sidecar_pod", _pod_ref, None, Scope.NODE,
            "Sidecar mode: serve only this pod; --cgroup is then the pod's own cgroup.", _show_optional,
            metavar="NAMESPACE/NAME"),
    # The same on every node: the ConfigMap.
    _option("mesh_label", _mesh_label, "nodeagent.io/mesh=enabled", Scope.CLUSTER,
            "The opt-in label KEY=VALUE on pods or namespaces (VALUE 'disabled' on a pod opts out).",
            metavar="KEY=VALUE"),
    _option("trust_domain", _text, naming.DEFAULT_TRUST_DOMAIN, Scope.CLUSTER,
            "The SPIFFE trust domain of workload identities."),
    _option("cert_lifetime", _cert_lifetime, 24 * 3600.0, Scope.CLUSTER,
            "Workload certificate lifetime, 2s to 8784h (renewed at 70% of it; short ones are for tests).",
            _print_duration, metavar="DURATION"),
    _option("default_policy", _policy, authz.Mode.ALL_UNAUTHENTICATED, Scope.CLUSTER,
            "Inbound policy of pods that set none: " + ", ".join(m.value for m in authz.Mode) + ".",
            lambda mode: mode.value),
    _option("cluster_networks", _networks, DEFAULT_CLUSTER_NETWORKS, Scope.CLUSTER,
            "CIDRs of the cluster's pods and nodes (cluster-unauthenticated policies).", ",".join,
            metavar="CIDR,..."),
    _option("fast_paths", parse_fast_paths, 0, Scope.CLUSTER,
            "Kernel fast paths: 'splice' (sk_msg) carries apps' sends on opaque plaintext connections past the "
            "proxy; 'skb' (sk_skb) also what arrives from remote peers, and 'loopback' apps' loopback sends; "
            "these two without backpressure (README, Kernel fast paths).", _print_fast_paths,
            flag="fast-path", metavar="splice[,skb][,loopback]"),
    _option("on_node_plaintext", _bool, False, Scope.CLUSTER,
            "Meshed traffic between pods of this node (opaque TCP, HTTP/1, HTTP/2) is served in one hop, without "
            "the mTLS hop: the destination's policy asked with the source's identity, both sides counted, its "
            "series tls=false (ARCHITECTURE.md, Same-node traffic in one hop).",
            _print_bool, metavar="BOOL"),
    _option("workers", _int_range(0, 256), 0, Scope.CLUSTER,
            "Proxy processes, this one included (0: one per core the agent may use); sidecar mode runs one."),
    _option("log_level", _log_level, "info", Scope.CLUSTER, "Log level: " + ", ".join(LOG_LEVELS) + "."),
    _option("pod_limits", _pod_limits, PodLimits(), Scope.CLUSTER,
            "Each pod's share of the node's proxy, NAME=N,... (limits.nodeagent.io/NAME annotations on a "
            "Namespace set its pods' limits; on a pod they may only lower; README, Per-pod limits): " + PodLimits().show() + ".",
            lambda limits: limits.show(), metavar="NAME=N,..."),
    _option("max_connections", _int_range(1, 1_000_000), 20000, Scope.CLUSTER,
            "Client connections the node's proxy holds at once, all pods together (each proxy process its share; "
            "each pod also has its own limit, per process)."),
    _option("memory_budget", parse_size, 400 << 20, Scope.CLUSTER,
            "Resident memory the agent (all its processes) aims to stay under: near it, new connections are "
            "refused and those holding the most buffered bytes are cut (keep it below the container's limit).",
            _print_size, metavar="SIZE"),
    _option("access_log", _access_log, "stderr", Scope.CLUSTER,
            "Where access log lines go, for the pods and Services that ask for one with the "
            "config.nodeagent.io/access-log annotation (apache or json): stderr, or a file path (appended to).",
            metavar="stderr|PATH"),
    _option("drain_timeout", parse_duration, 600.0, Scope.CLUSTER,
            "On SIGTERM the agent drains: HTTP clients are told to go at once, opaque and mTLS connections are "
            "left to end until this deadline, then cut (a second SIGTERM or SIGINT cuts them at once).",
            _print_duration, metavar="DURATION"),
    _option("trace_collector", _trace_collector, None, Scope.CLUSTER,
            "Export spans of sampled requests to this OpenTelemetry collector, OTLP/HTTP protobuf "
            "(http://HOST:PORT[/PATH], default path /v1/traces); empty: tracing off, trace headers pass untouched.",
            _show_optional, metavar="URL"),
    _option("trace_sampling", _fraction, 0.01, Scope.CLUSTER,
            "With --trace-collector: the fraction of new traces sampled (requests that carry a trace context "
            "follow its sampled flag).", metavar="0..1"),
)
BY_FLAG = {option.flag: option for option in OPTIONS}


@dataclass(frozen=True)
class AgentSettings:
    """Everything an agent (and each of its workers) runs with. Build it with `parse` (text,
    validated) or `replace` on DEFAULT in code; `check_runnable` says whether an agent can start."""

    node_name: str | None = None
    cluster_dir: Path | None = None
    kube: bool = False
    kubeconfig: Path | None = None
    cgroup: Path | None = None
    pin_root: Path = DEFAULT_PIN_ROOT
    identity_dir: Path | None = None
    config_dir: Path | None = None
    state_dir: Path | None = None
    admin: tuple[str, int] = DEFAULT_ADMIN
    metrics: tuple[str, int] | None = None
    sidecar_pod: str | None = None
    mesh_label: str = "nodeagent.io/mesh=enabled"
    trust_domain: str = naming.DEFAULT_TRUST_DOMAIN
    cert_lifetime: float = 24 * 3600.0
    default_policy: authz.Mode = authz.Mode.ALL_UNAUTHENTICATED
    cluster_networks: tuple[str, ...] = DEFAULT_CLUSTER_NETWORKS
    fast_paths: int = 0
    on_node_plaintext: bool = False
    workers: int = 0
    log_level: str = "info"
    pod_limits: PodLimits = PodLimits()
    max_connections: int = 20000
    memory_budget: int = 400 << 20
    access_log: str = "stderr"
    drain_timeout: float = 600.0
    trace_collector: str | None = None
    trace_sampling: float = 0.01

    # --- derived ---

    @property
    def pin_name(self) -> str:
        """Each agent's data path has a pin directory of its own."""
        if self.sidecar_pod:
            return f"sidecar-{self.sidecar_pod.replace('/', '-')}"
        return self.node_name or ""

    @property
    def cert_lifetime_delta(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.cert_lifetime)

    @property
    def networks(self) -> tuple:
        return tuple(ipaddress.ip_network(n) for n in self.cluster_networks)

    def processes(self, cores: int) -> int:
        """Proxy processes to run, this one included."""
        if self.sidecar_pod:
            return 1
        return self.workers or cores

    def check_runnable(self) -> None:
        """What `nodeagent run` needs beyond valid values; SettingsError if something is missing."""
        if not self.node_name:
            raise SettingsError("node-name", "required")
        if not self.identity_dir:
            raise SettingsError("identity-dir", "required")
        if bool(self.cluster_dir) == bool(self.kube or self.kubeconfig):
            raise SettingsError("cluster-dir", "give either --cluster-dir or --kube/--kubeconfig")
        if self.sidecar_pod and not self.cgroup:
            raise SettingsError("cgroup", "--sidecar-pod needs --cgroup: the pod's own cgroup directory")


DEFAULT = AgentSettings()
assert [f.name for f in fields(AgentSettings)] == [o.attr for o in OPTIONS], "OPTIONS and AgentSettings differ"
assert all(getattr(DEFAULT, o.attr) == o.default for o in OPTIONS), "OPTIONS' defaults differ from AgentSettings'"


def parse(texts: Mapping[str, str], base: AgentSettings = DEFAULT) -> AgentSettings:
    """Settings from flag names -> text (as given on a command line or in the ConfigMap);
    flags not given keep `base`'s values. SettingsError names the flag of a bad value."""
    values = {}
    for flag, text in texts.items():
        option = BY_FLAG.get(flag)
        if option is None:
            raise SettingsError(flag, f"unknown setting; known: {', '.join(BY_FLAG)}")
        try:
            values[option.attr] = option.parse(str(text))
        except ValueError as e:
            raise SettingsError(flag, str(e)) from None
    return replace(base, **values)


def show(settings: AgentSettings, option: Option) -> str:
    return option.show(getattr(settings, option.attr))


def to_args(settings: AgentSettings, scope: Scope | None = None) -> list[str]:
    """`--flag=value` for every setting (of `scope`) that differs from the default."""
    return [f"--{o.flag}" if o.switch else f"--{o.flag}={show(settings, o)}" for o in OPTIONS
            if (scope is None or o.scope is scope) and getattr(settings, o.attr) != o.default]


def config_map(settings: AgentSettings) -> dict[str, str]:
    """The ConfigMap's data: every CLUSTER setting, by its flag's name."""
    return {o.flag: show(settings, o) for o in OPTIONS if o.scope is Scope.CLUSTER}


def cluster_options() -> tuple[Option, ...]:
    return tuple(o for o in OPTIONS if o.scope is Scope.CLUSTER)
