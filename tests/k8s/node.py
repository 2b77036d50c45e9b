"""The test node: containerd (Debian's, with runc and the CNI plugins) and a kubelet on this
machine, registered with the test control plane, running real pods in real containers.

Network safety: the pods' network is a bridge (nak8s0) with no uplink. The CNI bridge
plugin runs with isGateway off (with it on, it turns IP forwarding on): the bridge's address
is set here, no masquerade, and the pods get routes to their subnet and to the Service range
only, never a default route. The API server listens on the `kubernetes` Service's own address
(10.97.0.1:443, a second address of the bridge), so pods reach it as a local address of this host: no NAT,
no forwarding (the tests check ip_forward stays 0). containerd pulls nothing: every registry
host resolves to a closed local port, and the images are imported (tests/k8s/image.py).

Everything lives under the cluster's state directory and is removed by `down()`: processes
(kubelet, containerd, its shims and every container: their cgroups are killed), mounts,
network namespaces, the links, the kubepods cgroups, the agent's pinned data path, and the
sysctls and iptables chains kubelet sets.
"""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import yaml

from nodeagent import cgroups
from k8s.cluster import BIN, ClusterError, log_tail, start_process

NODE_NAME = "nodeagent-test-node"
BRIDGE, BRIDGE_IP, POD_SUBNET = "nak8s0", "10.245.0.1", "10.245.0.0/24"
API_IP, API_PORT = "10.97.0.1", 443  # the `kubernetes` Service's address, on the bridge
SERVICE_CIDR = "10.97.0.0/16"  # as the control plane's (cluster.py)
# While the cluster is up, the host routes these nowhere but to the bridge's own addresses,
# so not even the host's own packets to a Service or pod address can take its default route.
GUARDED = ("10.97.0.0/16", "10.245.0.0/16")
CNI_BIN = "/usr/lib/cni"
# What kubelet's container manager writes (setupKernelTunables): restored by down().
KUBELET_SYSCTLS = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
                   "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes")
READY_TIMEOUT_S = 120


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def ip_forwarding() -> str:
    return Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()


def create_links() -> None:
    """The bridge the pods hang on, and the API server's address: nothing with an uplink."""
    remove_links()
    for network in GUARDED:
        _ip("route", "add", "unreachable", network)
    _ip("link", "add", BRIDGE, "type", "bridge")
    _ip("addr", "add", f"{BRIDGE_IP}/24", "dev", BRIDGE)
    _ip("addr", "add", f"{API_IP}/32", "dev", BRIDGE)  # (this kernel has no dummy links)
    _ip("link", "set", BRIDGE, "up")


def remove_links() -> None:
    _ip("link", "del", BRIDGE, check=False)
    for network in GUARDED:
        _ip("route", "del", "unreachable", network, check=False)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def containerd_config(state: Path) -> Path:
    c = state / "containerd"
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    # Every registry: a closed port on loopback. Images are imported, never pulled.
    _write(c / "certs.d" / "_default" / "hosts.toml", 'server = "http://127.0.0.1:9"\n')
    _write(c / "certs.d" / "nodeagent.test" / "hosts.toml", 'server = "http://127.0.0.1:9"\n')
    cni = {"cniVersion": "0.4.0", "name": "nodeagent-test", "plugins": [{
        "type": "bridge", "bridge": BRIDGE, "isGateway": False, "ipMasq": False, "hairpinMode": True,
        "ipam": {"type": "host-local", "subnet": POD_SUBNET, "gateway": BRIDGE_IP,
                 "dataDir": str(state / "cni" / "ipam"),
                 "routes": [{"dst": SERVICE_CIDR, "gw": BRIDGE_IP}]}}]}  # and the subnet: its own
    _write(state / "cni" / "net.d" / "10-nodeagent-test.conflist", json.dumps(cni))
    return _write(c / "config.toml", f"""version = 2
root = "{c / 'root'}"
state = "{c / 'state'}"
[grpc]
  address = "{state / 'containerd.sock'}"
[ttrpc]
  address = "{state / 'containerd.sock.ttrpc'}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{c / 'opt'}"
[{cri}]
  sandbox_image = "nodeagent.test/pause:1"
  netns_mounts_under_state_dir = true
  enable_selinux = false
  # This machine's root cannot lower oom_score_adj (no CAP_SYS_RESOURCE in its bounding set):
  # containers get containerd's own, not the kubelet's -998 for sandboxes.
  restrict_oom_score_adj = true
  [{cri}.cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{state / 'cni' / 'net.d'}"
    max_conf_num = 1
  [{cri}.registry]
    config_path = "{c / 'certs.d'}"
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
""")


def kubelet_config(state: Path, pki) -> Path:
    pki.issue("kubelet", f"system:node:{NODE_NAME}", "system:nodes")
    pki.issue("kubelet-serving", f"system:node:{NODE_NAME}", "system:nodes", server_names=(BRIDGE_IP,),
              client=False)
    _write(state / "resolv.conf", "nameserver 127.0.0.1\n")  # pods resolve nothing outside
    sock = f"unix://{state / 'containerd.sock'}"
    return _write(state / "kubelet.yaml", yaml.safe_dump({
        "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
        "address": BRIDGE_IP, "port": 10250, "readOnlyPort": 0, "healthzBindAddress": "127.0.0.1", "healthzPort": 0,
        "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": False},
                           "x509": {"clientCAFile": str(pki.dir / "ca.crt")}},
        "authorization": {"mode": "AlwaysAllow"},
        "tlsCertFile": str(pki.dir / "kubelet-serving.crt"), "tlsPrivateKeyFile": str(pki.dir / "kubelet-serving.key"),
        # This machine's cgroup v1 controllers (hybrid hierarchy): cgroupfs, v1 allowed.
        "cgroupDriver": "cgroupfs", "failCgroupV1": False, "failSwapOn": False,
        "containerRuntimeEndpoint": sock, "imageServiceEndpoint": sock,
        "resolvConf": str(state / "resolv.conf"), "clusterDomain": "cluster.local",
        "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
        "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                         "nodefs.inodesFree": "1%"},
        "maxPods": 30, "serializeImagePulls": False, "rotateCertificates": False,
        "podLogsDir": str(state / "pod-logs"),
        "localStorageCapacityIsolation": False,
    }))


def _ctr(state: Path, *args: str, check: bool = True, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["ctr", "--address", str(state / "containerd.sock"), "--namespace", "k8s.io", *args],
                          capture_output=True, text=True, check=check, timeout=timeout_s)


def _wait_socket(path: Path, process: subprocess.Popen, state: Path, name: str, timeout_s: float = 30) -> None:
    end = time.monotonic() + timeout_s
    while not path.exists():
        if process.poll() is not None:
            raise ClusterError(f"{name} exited with {process.returncode}:\n{log_tail(state, name)}")
        if time.monotonic() > end:
            raise ClusterError(f"{name} did not open {path}:\n{log_tail(state, name)}")
        time.sleep(0.2)


def _save_sysctls(state: Path) -> None:
    saved = {}
    for key in KUBELET_SYSCTLS:
        try:
            saved[key] = (Path("/proc/sys") / key).read_text().strip()
        except OSError:
            continue
    (state / "sysctls.yaml").write_text(yaml.safe_dump(saved))


def _restore_sysctls(state: Path) -> None:
    try:
        saved = yaml.safe_load((state / "sysctls.yaml").read_text()) or {}
    except FileNotFoundError:
        return
    for key, value in saved.items():
        try:
            (Path("/proc/sys") / key).write_text(f"{value}\n")
        except OSError:
            pass


def _shared(point: str) -> bool | None:
    """Whether a mount point propagates (shared), None if it is no mount point."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.partition(" - ")[0].split(" ")
            if fields[4] == point:
                return any(tag.startswith("shared:") for tag in fields[6:])
    return None


def _share_bpffs(state: Path) -> None:
    """The DaemonSet mounts bpffs with HostToContainer propagation, which needs a shared (or
    slave) host mount: systemd makes every mount shared, this machine has no systemd. Made
    shared here, and private again by down()."""
    if _shared("/sys/fs/bpf") is False:
        subprocess.run(["mount", "--make-shared", "/sys/fs/bpf"], check=True)
        (state / "bpffs-was-private").touch()


def up(plane, images: list[Path]) -> str:
    """containerd and kubelet for `plane`; the images imported; returns the node's name once Ready."""
    state = plane.state
    if os.geteuid() != 0:
        raise ClusterError("the test node needs root (containers, cgroups, a bridge)")
    forwarding = ip_forwarding()
    _save_sysctls(state)
    _share_bpffs(state)
    if not AGENT_STATE_DIR.exists():
        (state / "agent-state-dir-made").touch()  # removed at down, with the agents' settings copy
    config = containerd_config(state)
    containerd = start_process(state, "containerd", ["containerd", "--config", str(config)])
    plane.processes["containerd"] = containerd
    _wait_socket(state / "containerd.sock", containerd, state, "containerd")
    for archive in images:
        _ctr(state, "images", "import", "--no-unpack=false", str(archive))
    from k8s.pki import Pki  # noqa: PLC0415

    pki = Pki.load(state / "pki")
    kubeconfig = Path(plane.kubeconfig_for("kubelet", f"system:node:{NODE_NAME}"))
    kubelet = start_process(state, "kubelet", [
        str(BIN / "kubelet"), f"--config={kubelet_config(state, pki)}", f"--kubeconfig={kubeconfig}",
        f"--hostname-override={NODE_NAME}", f"--node-ip={BRIDGE_IP}", f"--root-dir={state / 'kubelet'}",
        f"--cert-dir={state / 'kubelet-pki'}", "--v=1"])
    plane.processes["kubelet"] = kubelet
    end = time.monotonic() + READY_TIMEOUT_S
    while True:
        if kubelet.poll() is not None:
            raise ClusterError(f"kubelet exited with {kubelet.returncode}:\n{log_tail(state, 'kubelet', 60)}")
        status, node = plane.request("GET", f"/api/v1/nodes/{NODE_NAME}")
        ready = status == 200 and any(c["type"] == "Ready" and c["status"] == "True"
                                      for c in node.get("status", {}).get("conditions", []))
        if ready:
            break
        if time.monotonic() > end:
            raise ClusterError(f"node {NODE_NAME} not Ready in {READY_TIMEOUT_S} s:\n"
                               f"{log_tail(state, 'kubelet', 60)}")
        time.sleep(1)
    if ip_forwarding() != forwarding:
        raise ClusterError(f"IP forwarding changed from {forwarding} to {ip_forwarding()}: refusing to go on")
    return NODE_NAME


# The DaemonSet's --pin-root: its agent's data path stays pinned after it stops (by design: its
# pods fail closed); the node's is removed with the node.
AGENT_PIN_ROOT = Path("/sys/fs/bpf/nodeagent")
AGENT_STATE_DIR = Path("/var/lib/nodeagent")  # the DaemonSet's hostPath (--state-dir): the kubelet makes it


def _remove_agent_datapath() -> None:
    from nodeagent.datapath import cleanup  # noqa: PLC0415
    from nodeagent.datapath.pins import PinLayout  # noqa: PLC0415

    if (AGENT_PIN_ROOT / NODE_NAME).exists():
        cleanup.remove_node(PinLayout(AGENT_PIN_ROOT, NODE_NAME))
    try:
        AGENT_PIN_ROOT.rmdir()  # only if nothing else is pinned there
    except OSError:
        pass


def _kill_shims(state: Path) -> None:
    """containerd's shims outlive it (they run in sessions of their own); each names our
    containerd's socket, under the state directory, on its command line."""
    marker = str(state).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if b"containerd-shim" in (cmdline := (entry / "cmdline").read_bytes()) and marker in cmdline:
                os.kill(int(entry.name), 9)
        except (OSError, ProcessLookupError):
            continue


def _mounts_under(root: Path) -> list[str]:
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split(" ")[4].encode().decode("unicode_escape")
            if point == str(root) or point.startswith(f"{root}/"):
                found.append(point)
    return sorted(set(found), key=len, reverse=True)


def _kubepods_cgroups() -> list[Path]:
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields, _, fs = line.partition(" - ")
            if fs.split(" ")[0] in ("cgroup", "cgroup2"):
                point = Path(fields.split(" ")[4])
                found += [p for p in (point / "kubepods", point / "kubepods.slice") if p.is_dir()]
    return found


def down(state: Path) -> None:
    """Everything the node made, after the caller stopped kubelet and containerd. Safe to call
    when no node ran."""
    _kill_shims(state)
    _remove_agent_datapath()
    for cgroup in _kubepods_cgroups():  # every container's processes
        try:
            cgroups.remove_tree(cgroup)
        except (cgroups.CgroupError, OSError):
            pass
    for point in _mounts_under(state):
        try:
            cgroups.remove_tree(cgroup)
        except (cgroups.CgroupError, OSError):
            pass
    for point in _mounts_under(state):
        subprocess.run(["umount", "--lazy", point], capture_output=True)
    _restore_sysctls(state)
    if (state / "bpffs-was-private").exists():
        subprocess.run(["mount", "--make-private", "/sys/fs/bpf"], capture_output=True)
    if (state / "agent-state-dir-made").exists():
        shutil.rmtree(AGENT_STATE_DIR, ignore_errors=True)
    remove_links()
    _remove_kubelet_chains()


# The chains kubelet makes (kubelet_network_linux.go): (table, chain, built-in chains jumping to it).
KUBELET_CHAINS = (("filter", "KUBE-FIREWALL", ("INPUT", "OUTPUT")), ("filter", "KUBE-KUBELET-CANARY", ()),
                  ("nat", "KUBE-KUBELET-CANARY", ()), ("mangle", "KUBE-KUBELET-CANARY", ()),
                  ("mangle", "KUBE-IPTABLES-HINT", ()))


def _remove_kubelet_chains() -> None:
    for tool in ("iptables", "ip6tables"):
        if not shutil.which(tool):
            continue
        for table, chain, jumps in KUBELET_CHAINS:
            for parent in jumps:
                while subprocess.run([tool, "-w", "-t", table, "-D", parent, "-j", chain],
                                     capture_output=True).returncode == 0:
                    pass
            subprocess.run([tool, "-w", "-t", table, "-F", chain], capture_output=True)
            subprocess.run([tool, "-w", "-t", table, "-X", chain], capture_output=True)
