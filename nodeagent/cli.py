"""The `nodeagent` command: wires subcommands to the modules that do the work."""

import json
import os
from pathlib import Path

import click
from rich.console import Console

from nodeagent.datapath import libbpf
from nodeagent.datapath.loader import LoadError
from nodeagent.datapath.pins import DEFAULT_ROOT
from nodeagent.lab import lab as lab_ops
from nodeagent.lab.plan import MAX_NODES, MAX_PODS_PER_NODE


class _Errors(click.Group):
    """Known failures end in one clear line and exit status 1, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (lab_ops.LabError, LoadError, libbpf.BpfError, ValueError) as e:
            raise click.ClickException(str(e)) from e


@click.group(cls=_Errors)
@click.version_option(package_name="nodeagent")
def main():
    """An eBPF-accelerated, per-node service-mesh agent."""


@main.group(cls=_Errors)
def lab():
    """A stand-in for Kubernetes nodes: pods in network namespaces on this machine."""


@lab.command()
@click.option("--nodes", default=2, show_default=True, type=click.IntRange(1, MAX_NODES))
@click.option("--pods", default=5, show_default=True, type=click.IntRange(1, MAX_PODS_PER_NODE),
              help="Pods per node, cycling http, h2c, echo, banner, client.")
@click.option("--enroll/--no-enroll", default=True, show_default=True,
              help="Label pods nodeagent.io/mesh=enabled.")
@click.option("--mesh", type=click.Choice(lab_ops.MESH_MODES), default="none", show_default=True,
              help="node: one agent per simulated node; none: no mesh.")
def up(nodes, pods, enroll, mesh):
    """Create NODES simulated nodes with PODS pods each."""
    created = lab_ops.up(nodes, pods, enroll, mesh)
    plan = created.plan
    click.echo(f"lab up: {len(plan.nodes)} node(s), {len(plan.pods)} pod(s), {len(plan.services)} service(s), "
               f"mesh {mesh}; `nodeagent lab status` shows them")


@lab.command()
def down():
    """Remove everything the lab made (also after a crashed run)."""
    removed = lab_ops.down()
    click.echo("lab down: " + (f"removed {len(removed)} objects" if removed else "nothing to remove"))


@lab.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(as_json):
    """List nodes, pods and services."""
    from nodeagent.lab.views import print_status

    current = lab_ops.status(lab_ops.load())
    if as_json:
        click.echo(json.dumps(current, indent=2))
    else:
        print_status(current, Console())


@lab.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("pod")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_(pod, command):
    """Run COMMAND inside POD's network namespace and cgroup."""
    lab_ops.exec_in_pod(pod, list(command))


@lab.command()
@click.argument("pod")
@click.argument("change")
def label(pod, change):
    """Set a pod label (KEY=VALUE) or remove one (KEY-)."""
    manifest = lab_ops.label(pod, change)
    labels = ",".join(f"{k}={v}" for k, v in sorted(manifest["metadata"]["labels"].items()))
    click.echo(f"pod/{pod} labeled: {labels}")


@main.command()
def demo():
    """Bring up a 2-node lab, run traffic of each kind, summarize, tear down."""
    from nodeagent.demo import run_demo

    run_demo(Console())


pin_root_option = click.option("--pin-root", type=click.Path(path_type=Path), default=DEFAULT_ROOT, show_default=True,
                               help="Where the data path is pinned on bpffs.")


@main.command()
@pin_root_option
@click.option("--no-compile", is_flag=True, help="Skip compiling the BPF programs.")
@click.option("--post-install", is_flag=True,
              help="Check an installed mesh through the Kubernetes API instead of this host.")
@click.option("--kubeconfig", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="With --post-install (default: in-cluster configuration).")
@click.option("--namespace", default="nodeagent", show_default=True, help="With --post-install.")
def check(pin_root, no_compile, post_install, kubeconfig, namespace):
    """Check every kernel and host prerequisite (or, --post-install, the installed mesh);
    non-zero exit if any fails."""
    from nodeagent import preflight

    if post_install:
        from nodeagent import postinstall
        from nodeagent.cluster.kube import ApiClient, ApiError, KubeConfig

        try:
            config = KubeConfig.from_kubeconfig(kubeconfig) if kubeconfig else KubeConfig.in_cluster()
        except (ApiError, OSError, KeyError, StopIteration) as e:
            raise click.ClickException(f"no Kubernetes API configuration: {e}") from e
        checks = postinstall.run_all(ApiClient(config), namespace)
    else:
        checks = preflight.run_all(pin_root, compile_programs=not no_compile)
    if not preflight.render(checks, click.echo):
        raise SystemExit(1)


@main.command()
@pin_root_option
@click.option("--node", help="Only this node's data path (default: every node under --pin-root).")
def cleanup(pin_root, node):
    """Detach every program of ours and remove every pin: pods are unmeshed."""
    from nodeagent.datapath import cleanup as datapath_cleanup
    from nodeagent.datapath.pins import PinLayout

    if node:
        removed = datapath_cleanup.remove_node(PinLayout(pin_root, node))
    else:
        removed = datapath_cleanup.remove_all(pin_root)
    click.echo(f"cleanup: removed {len(removed)} pinned objects under {pin_root}")


@main.group(cls=_Errors)
def datapath():
    """The eBPF data path of a node (normally driven by `nodeagent run`)."""


@datapath.command("load")
@pin_root_option
@click.option("--node", required=True, help="Node name: the pin directory under --pin-root.")
@click.option("--cgroup", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The cgroup v2 directory holding the node's pods.")
def datapath_load(pin_root, node, cgroup):
    """Compile, load and attach (or adopt) a node's programs; prints the loader's report."""
    from nodeagent.datapath.loader import load_in_subprocess

    click.echo(json.dumps(load_in_subprocess(node, cgroup, pin_root)))


def _default_pods_cgroup() -> Path:
    """Where kubelet puts pods: kubepods.slice (systemd driver) or kubepods (cgroupfs)."""
    from nodeagent import cgroups

    root = cgroups.cgroup2_root()
    for name in ("kubepods.slice", "kubepods"):
        if (root / name).is_dir():
            return root / name
    raise click.ClickException(f"no kubepods cgroup under {root}; pass --cgroup")


def _fast_path_bits(text: str) -> int:
    from nodeagent.datapath import abi

    names = {"splice": abi.FAST_SPLICE, "skb": abi.FAST_SKB, "loopback": abi.FAST_LOOPBACK}
    bits = 0
    for name in filter(None, (part.strip() for part in text.split(","))):
        if name not in names:
            raise click.BadParameter(f"{name!r}: a list of splice, skb, loopback", param_hint="--fast-path")
        bits |= names[name]
    if bits and not bits & abi.FAST_SPLICE:
        raise click.BadParameter("skb and loopback come on top of splice", param_hint="--fast-path")
    return bits


@main.command()
@click.option("--node-name", required=True, help="This node's name (Pods' spec.nodeName).")
@click.option("--cluster-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Follow a directory of Kubernetes manifests (the lab's cluster).")
@click.option("--kube", is_flag=True, help="Follow the Kubernetes API (in-cluster config, or --kubeconfig).")
@click.option("--kubeconfig", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--mesh-label", default="nodeagent.io/mesh=enabled", show_default=True,
              help="The opt-in label KEY=VALUE on pods or namespaces (VALUE 'disabled' on a pod opts out).")
@click.option("--cgroup", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The cgroup v2 directory of this node's pods (default: kubepods under the cgroup2 mount).")
@pin_root_option
@click.option("--identity-dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="The issuer Secret's files: ca.crt, issuer.crt, issuer.key (see `identity init`).")
@click.option("--trust-domain", default="cluster.local", show_default=True)
@click.option("--cert-lifetime", default="24h", show_default=True, help="Workload certificate lifetime.")
@click.option("--default-policy", default="all-unauthenticated", show_default=True,
              type=click.Choice([m.value for m in __import__("nodeagent.policy.authz", fromlist=["Mode"]).Mode]),
              help="Inbound policy of pods that set none.")
@click.option("--admin", default="127.0.0.1:4191", show_default=True, help="Admin and metrics address.")
@click.option("--sidecar-pod", metavar="NAMESPACE/NAME",
              help="Sidecar mode: serve only this pod; --cgroup is then the pod's own cgroup.")
@click.option("--fast-path", "fast_path", default="", show_default="off", metavar="splice[,skb][,loopback]",
              help="Kernel fast paths: 'splice' (sk_msg) carries apps' sends on opaque plaintext connections "
                   "past the proxy; 'skb' (sk_skb) also what arrives from remote peers, and 'loopback' apps' "
                   "loopback sends; these two without backpressure (README, Kernel fast paths).")
@click.option("--on-node-plaintext", type=click.BOOL, default=False, show_default=True, metavar="BOOL",
              help="Opaque TCP between meshed pods of this node skips the mTLS hop (it never leaves the kernel).")
@click.option("--workers", default=0, type=click.IntRange(0, 256), show_default="0: one per core",
              help="Proxy processes, this one included (0: one per core the agent may use); sidecar mode "
                   "always runs one.")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def run(node_name, cluster_dir, kube, kubeconfig, mesh_label, cgroup, pin_root, identity_dir, trust_domain,
        cert_lifetime, default_policy, admin, sidecar_pod, fast_path, on_node_plaintext, workers, log_level):
    """Run the agent for one node: data path, proxy, identities, admin port."""
    import datetime
    import logging

    from nodeagent.agent.agent import AgentConfig, AgentError, run_agent
    from nodeagent.cluster.files import ManifestDirSource
    from nodeagent.policy.authz import Mode
    from nodeagent.proxy.service_config import parse_duration

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, _, port = admin.rpartition(":")
    fast_paths = _fast_path_bits(fast_path)
    config = AgentConfig(node_name, cluster_dir, cgroup or _default_pods_cgroup(), pin_root, identity_dir,
                         host or "127.0.0.1", int(port), trust_domain,
                         datetime.timedelta(seconds=parse_duration(cert_lifetime)), Mode(default_policy), sidecar_pod,
                         fast_paths, on_node_plaintext,
                         1 if sidecar_pod else (workers or len(os.sched_getaffinity(0))), log_level.upper())
    if sidecar_pod and not cgroup:
        raise click.UsageError("--sidecar-pod needs --cgroup: the pod's own cgroup directory")
    if bool(cluster_dir) == bool(kube or kubeconfig):
        raise click.UsageError("give either --cluster-dir or --kube/--kubeconfig")
    if cluster_dir:
        source = ManifestDirSource(cluster_dir, mesh_label)
    else:
        from nodeagent.cluster.kube import ApiClient, ApiError, KubeConfig, KubeSource

        try:
            config_source = KubeConfig.from_kubeconfig(kubeconfig) if kubeconfig else KubeConfig.in_cluster()
        except (ApiError, OSError, KeyError, StopIteration) as e:
            raise click.ClickException(f"no Kubernetes API configuration: {e}") from e
        source = KubeSource(ApiClient(config_source), mesh_label)
    try:
        run_agent(config, source)
    except AgentError as e:
        raise click.ClickException(f"agent refused to start: {e}") from e


@main.group(cls=_Errors)
def identity():
    """Trust roots and issuers for workload identities."""


@identity.command("init")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where to write ca.crt, ca.key, issuer.crt, issuer.key and issuer-secret.yaml.")
@click.option("--trust-domain", default="cluster.local", show_default=True)
@click.option("--anchor-lifetime", default="8760h", show_default=True)
@click.option("--issuer-lifetime", default="8760h", show_default=True)
@click.option("--namespace", default="nodeagent", show_default=True, help="Namespace of the Secret manifest.")
def identity_init(directory, trust_domain, anchor_lifetime, issuer_lifetime, namespace):
    """Create a trust anchor and an issuer (ECDSA P-256), as PEM files and a Secret."""
    import datetime

    import yaml

    from nodeagent.identity import ca
    from nodeagent.proxy.service_config import parse_duration

    anchor = ca.Authority.new_anchor(trust_domain, datetime.timedelta(seconds=parse_duration(anchor_lifetime)))
    issuer = anchor.new_issuer(trust_domain, datetime.timedelta(seconds=parse_duration(issuer_lifetime)))
    written = ca.write_identity_files(directory, anchor, issuer)
    secret = directory / "issuer-secret.yaml"
    secret.write_text(yaml.safe_dump(ca.issuer_secret_manifest(namespace, issuer, anchor.certificate_pem()),
                                     sort_keys=False))
    secret.chmod(0o600)
    for path in [*written, secret]:
        click.echo(f"wrote {path}")
    click.echo("keep ca.key offline: agents need only the Secret (ca.crt, issuer.crt, issuer.key)")


@main.command()
@click.option("--namespace", default="nodeagent", show_default=True)
@click.option("--image", default="ghcr.io/nodeagent/nodeagent:0.1.0", show_default=True)
@click.option("--label", default="nodeagent.io/mesh=enabled", show_default=True,
              help="The opt-in label (KEY=VALUE) on pods or namespaces.")
@click.option("--identity-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="From `identity init` (ca.crt, issuer.crt, issuer.key). Default: make a new one in "
                   "./nodeagent-identity (keep its ca.key).")
@click.option("--fast-path", default="", show_default="off", metavar="splice[,skb][,loopback]",
              help="The agents' kernel fast paths (as `run --fast-path`).")
@click.option("--on-node-plaintext", type=click.BOOL, default=False, show_default=True, metavar="BOOL",
              help="As `run --on-node-plaintext`.")
def install(namespace, image, label, identity_dir, fast_path, on_node_plaintext):
    """Print the manifests to install nodeagent: `nodeagent install | kubectl apply -f -`."""
    import datetime

    import yaml

    from nodeagent.deploy.render import Values, render
    from nodeagent.identity import ca

    if identity_dir is None:
        identity_dir = Path("nodeagent-identity")
        if not (identity_dir / "issuer.key").exists():
            anchor = ca.Authority.new_anchor("cluster.local", datetime.timedelta(days=365))
            ca.write_identity_files(identity_dir, anchor, anchor.new_issuer("cluster.local"))
            click.echo(f"# made a new trust anchor and issuer in {identity_dir}/: keep ca.key safe", err=True)
    _fast_path_bits(fast_path)  # refuse a typo here rather than in every agent
    values = Values(namespace=namespace, image=image, mesh_label=label, fast_path=fast_path,
                    on_node_plaintext=on_node_plaintext,
                    anchors_pem=(identity_dir / "ca.crt").read_text(),
                    issuer_crt_pem=(identity_dir / "issuer.crt").read_text(),
                    issuer_key_pem=(identity_dir / "issuer.key").read_text())
    click.echo(yaml.safe_dump_all(render(values), sort_keys=False), nl=False)


from nodeagent.observe.commands import stat, tap, top  # noqa: E402  (registered below)

for _command in (stat, tap, top):
    main.add_command(_command)
