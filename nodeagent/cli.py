"""The `nodeagent` command: wires subcommands to the modules that do the work."""

import json
import os
from pathlib import Path

import click
from rich.console import Console

from nodeagent.datapath import libbpf
from nodeagent.datapath.loader import LoadError
from nodeagent.datapath.pins import DEFAULT_ROOT
from nodeagent.identity.naming import DEFAULT_TRUST_DOMAIN
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
              help="node: one agent per simulated node; sidecar: one proxy per meshed pod (the same agent, "
                   "for comparison); none: no mesh (Service VIPs then route nowhere: the lab has no kube-proxy).")
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
@click.option("--node", "nodes", multiple=True, help="Only this node (repeat for more); default: every node.")
@click.option("--wait", "wait_s", type=float, default=None,
              help="Seconds to wait for each old agent to drain (default: until it exits).")
def upgrade(nodes, wait_s):
    """Hand each node's agent over to a new one, one node after the other, with no connection refused."""
    from nodeagent.lab.upgrade import upgrade_all

    for done in upgrade_all(lab_ops.load(), list(nodes) or None, wait_s):
        drained = "still draining" if done["drain_s"] is None else f"drained in {done['drain_s']} s"
        click.echo(f"{done['node']}: agent {done['old_pid']} -> {done['new_pid']}: new one ready in "
                   f"{done['ready_s']} s, old one {drained}")


@lab.command()
@click.argument("pod")
@click.argument("change")
def label(pod, change):
    """Set a pod label (KEY=VALUE) or remove one (KEY-)."""
    manifest = lab_ops.label(pod, change)
    labels = ",".join(f"{k}={v}" for k, v in sorted(manifest["metadata"]["labels"].items()))
    click.echo(f"pod/{pod} labeled: {labels}")


@lab.command("config")
@click.argument("changes", nargs=-1)
@click.option("--no-check", is_flag=True,
              help="Write even what the agents will refuse (to see them refuse it); keys are checked still.")
def config_(changes, no_check):
    """Change the agents' cluster settings live: KEY=VALUE sets one (a `nodeagent run` flag's name),
    KEY- removes it; none: show them. The agents apply what can change live and report what needs a restart."""
    lab_ops.load()  # a lab is up
    data = lab_ops.configure(list(changes), check=not no_check) if changes else lab_ops.config.read(lab_ops.config_dir())
    click.echo("\n".join(f"{key}={value}" for key, value in sorted(data.items())) or "(no setting changed: the "
               "agents run with their command line's)")


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
        from nodeagent.cluster.kube import ApiClient, ApiError, ConfigError, KubeConfig

        try:
            config = KubeConfig.from_kubeconfig(kubeconfig) if kubeconfig else KubeConfig.in_cluster()
        except (ApiError, ConfigError, OSError, KeyError, StopIteration) as e:
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

    try:
        root = cgroups.cgroup2_root()
    except cgroups.CgroupError as e:
        raise click.ClickException(f"{e}; mount the node's /sys/fs/cgroup or pass --cgroup") from e
    for name in ("kubepods.slice", "kubepods"):
        if (root / name).is_dir():
            return root / name
    raise click.ClickException(f"no kubepods cgroup under {root}; pass --cgroup")


def settings_options(options):
    """One click option per setting of the model (nodeagent/settings.py), in its order."""
    def decorate(command):
        for option in reversed(options):
            default = option.show(option.default) if option.default not in (None, "", 0, False) else None
            help_text = option.help + (f" [default: {default}]" if default else "")
            if option.switch:
                command = click.option(f"--{option.flag}", option.attr, is_flag=True, default=None,
                                       help=help_text)(command)
            else:
                command = click.option(f"--{option.flag}", option.attr, default=None, help=help_text,
                                       metavar=option.metavar or "TEXT")(command)
        return command
    return decorate


def settings_from(options, given: dict):
    """The validated settings from the options given; a bad value exits 2 naming its flag."""
    from nodeagent import settings

    texts = {o.flag: "true" if o.switch else given[o.attr] for o in options if given.get(o.attr) is not None}
    try:
        return settings.parse(texts)
    except settings.SettingsError as e:
        raise click.BadParameter(str(e).split(": ", 1)[1], param_hint=f"--{e.flag}") from None


def _run_options():
    from nodeagent.settings import OPTIONS

    return OPTIONS


@main.command()
@settings_options(_run_options())
def run(**given):
    """Run the agent for one node: data path, proxy, identities, admin port."""
    import dataclasses
    import logging

    from nodeagent import settings as settings_model
    from nodeagent.agent.agent import AgentError, run_agent
    from nodeagent.cluster.files import ManifestDirSource

    agent_settings = settings_from(_run_options(), given)
    try:
        agent_settings.check_runnable()
    except settings_model.SettingsError as e:
        raise click.UsageError(str(e)) from None
    if agent_settings.cgroup is None:
        agent_settings = dataclasses.replace(agent_settings, cgroup=_default_pods_cgroup())
    elif not agent_settings.cgroup.is_dir():
        raise click.BadParameter(f"{agent_settings.cgroup} is not a directory", param_hint="--cgroup")
    # The command line's level until the directory is read: its refusal, if any, is logged.
    logging.basicConfig(level=agent_settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    reloads = None
    if agent_settings.config_dir:
        import time

        from nodeagent.agent.settings_reloads import SettingsReloads, termination_grace

        try:
            reloads = SettingsReloads(agent_settings.config_dir, agent_settings, time.monotonic(),
                                      agent_settings.state_dir, termination_grace(os.environ))
        except OSError as e:
            raise click.BadParameter(f"cannot read {agent_settings.config_dir}: {e}", param_hint="--config-dir")
        # A bad content is refused as at runtime, and the agent starts from the last good one
        # (a ConfigMap edit must not crash-loop every agent that restarts after it).
        agent_settings = reloads.initial()
        logging.getLogger().setLevel(agent_settings.log_level.upper())
    if agent_settings.cluster_dir:
        source = ManifestDirSource(agent_settings.cluster_dir, agent_settings.mesh_label)
    else:
        from nodeagent.cluster.kube import ApiClient, ApiError, ConfigError, KubeConfig, KubeSource

        try:
            config_source = (KubeConfig.from_kubeconfig(agent_settings.kubeconfig) if agent_settings.kubeconfig
                             else KubeConfig.in_cluster())
        except (ApiError, ConfigError, OSError, KeyError, StopIteration) as e:
            raise click.ClickException(f"no Kubernetes API configuration: {e}") from e
        source = KubeSource(ApiClient(config_source), agent_settings.mesh_label)
    try:
        run_agent(agent_settings, source, reloads)
    except AgentError as e:
        raise click.ClickException(f"agent refused to start: {e}") from e


@main.group(cls=_Errors)
def identity():
    """Trust roots and issuers for workload identities."""


@identity.command("init")
@click.option("--dir", "directory", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where to write ca.crt, ca.key, issuer.crt, issuer.key and issuer-secret.yaml.")
@click.option("--trust-domain", default=DEFAULT_TRUST_DOMAIN, show_default=True)
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


def _cluster_options():
    from nodeagent.settings import cluster_options

    return cluster_options()


@main.command()
@click.option("--namespace", default="nodeagent", show_default=True)
@click.option("--image", default="ghcr.io/nodeagent/nodeagent:0.1.0", show_default=True)
@click.option("--identity-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="From `identity init` (ca.crt, issuer.crt, issuer.key). Default: make a new one in "
                   "./nodeagent-identity (keep its ca.key).")
@settings_options(_cluster_options())
def install(namespace, image, identity_dir, **given):
    """Print the manifests to install nodeagent: `nodeagent install | kubectl apply -f -`.
    The agents' settings (the ConfigMap) are `nodeagent run`'s cluster-wide options."""
    import datetime

    import yaml

    from nodeagent.deploy.render import Values, render
    from nodeagent.identity import ca

    agent_settings = settings_from(_cluster_options(), given)  # a typo is refused here, not in every agent
    if identity_dir is None:
        identity_dir = Path("nodeagent-identity")
        if not (identity_dir / "issuer.key").exists():
            anchor = ca.Authority.new_anchor(agent_settings.trust_domain, datetime.timedelta(days=365))
            ca.write_identity_files(identity_dir, anchor, anchor.new_issuer(agent_settings.trust_domain))
            click.echo(f"# made a new trust anchor and issuer in {identity_dir}/: keep ca.key safe", err=True)
    values = Values(namespace=namespace, image=image, settings=agent_settings,
                    anchors_pem=(identity_dir / "ca.crt").read_text(),
                    issuer_crt_pem=(identity_dir / "issuer.crt").read_text(),
                    issuer_key_pem=(identity_dir / "issuer.key").read_text())
    click.echo(yaml.safe_dump_all(render(values), sort_keys=False), nl=False)


from nodeagent.observe.commands import dashboard, edges, stat, tap, top  # noqa: E402  (registered below)

for _command in (stat, tap, top, edges, dashboard):
    main.add_command(_command)
