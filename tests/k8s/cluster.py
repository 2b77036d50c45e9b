"""The test cluster's control plane: etcd (Debian's), kube-apiserver, kube-controller-manager and
kube-scheduler (built by scripts/k8s-build.sh), on this machine, for the tests.

Everything lives under one state directory; every process it starts is recorded there, so
`down()` removes a cluster a killed test session left behind before a new one starts, and the
pytest fixture (tests/k8s/fixtures.py) removes its own on success, failure and interrupt.
Nothing listens beyond the address it is given (loopback, or the test node's bridge, which has
no uplink), and nothing is pulled from anywhere: the components only talk to each other.

    make k8s-up      # by hand: prints the admin kubeconfig's path
    make k8s-down
"""

import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
TOOLS = Path(os.environ.get("K8S_TOOLS", REPO / ".tools" / "k8s"))
BIN = TOOLS / "bin"
COMPONENTS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kubectl")
# One directory per cluster: STATE_ROOT/<pid of the test session> (or "manual": make k8s-up).
STATE_ROOT = Path(os.environ.get("NODEAGENT_K8S_STATE", "/run/nodeagent-k8s" if os.geteuid() == 0
                                 else f"/tmp/nodeagent-k8s-{os.getuid()}"))
MANUAL = STATE_ROOT / "manual"
# Ranges of their own: the lab (10.244.0.0/16, 10.96.0.0/16) refuses to start beside a host route
# into its ranges, and both must be able to run in one test session.
SERVICE_CIDR = "10.97.0.0/16"
KUBERNETES_SERVICE_IP = "10.97.0.1"
START_TIMEOUT_S = 120


# Admission as hardened clusters have it: Pod Security enforcing `baseline` unless a namespace
# says otherwise, and system-critical priority classes only against a ResourceQuota (GKE).
ADMISSION = {
    "apiVersion": "apiserver.config.k8s.io/v1", "kind": "AdmissionConfiguration",
    "plugins": [
        {"name": "PodSecurity", "configuration": {
            "apiVersion": "pod-security.admission.config.k8s.io/v1", "kind": "PodSecurityConfiguration",
            "defaults": {"enforce": "baseline", "enforce-version": "latest", "audit": "baseline",
                         "audit-version": "latest", "warn": "baseline", "warn-version": "latest"},
            "exemptions": {"usernames": [], "runtimeClasses": [], "namespaces": []}}},
        {"name": "ResourceQuota", "configuration": {
            "apiVersion": "apiserver.config.k8s.io/v1", "kind": "ResourceQuotaConfiguration",
            "limitedResources": [{"resource": "pods", "matchScopes": [
                {"scopeName": "PriorityClass", "operator": "In",
                 "values": ["system-node-critical", "system-cluster-critical"]}]}]}},
    ]}


class ClusterError(RuntimeError):
    pass


def missing_binaries() -> list[str]:
    missing = [c for c in COMPONENTS if not (BIN / c).is_file()]
    if shutil.which("etcd") is None:
        missing.append("etcd (Debian's etcd-server)")
    return missing


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def kubeconfig(path: Path, server: str, ca: Path, cert: Path, key: Path, user: str) -> Path:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}]}))
    path.chmod(0o600)
    return path


# --- processes: started in their own session, recorded, ended by pid ---

def _pids_file(state: Path) -> Path:
    return state / "pids"


def _ours(pid: int, state: Path) -> bool:
    """The pid is still a process we started (its command line names our state directory)."""
    try:
        return str(state) in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False


def start_process(state: Path, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
    log = open(state / f"{name}.log", "ab")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               start_new_session=True, env=env)
    log.close()
    with open(_pids_file(state), "a") as f:
        f.write(f"{process.pid} {name}\n")
    return process


def stop_processes(state: Path, timeout_s: float = 15.0) -> None:
    """SIGTERM what we started (newest first), SIGKILL what is left after the timeout."""
    try:
        entries = [line.split() for line in _pids_file(state).read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        return
    pids = [int(pid) for pid, _ in reversed(entries) if _ours(int(pid), state)]
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and any(_ours(p, state) for p in pids):
        _reap()
        time.sleep(0.1)
    for pid in pids:
        if _ours(pid, state):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    _reap()
    _pids_file(state).unlink(missing_ok=True)


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def log_tail(state: Path, name: str, lines: int = 30) -> str:
    try:
        return "\n".join((state / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


@dataclass
class ControlPlane:
    state: Path
    address: str  # where the API server listens (loopback, or the test node's bridge)
    port: int
    admin_kubeconfig: Path
    processes: dict

    @property
    def server(self) -> str:
        return f"https://{self.address}:{self.port}"

    @property
    def ca(self) -> Path:
        return self.state / "pki" / "ca.crt"

    def kubeconfig_for(self, name: str, common_name: str, organization: str | None = None) -> Path:
        """A kubeconfig with a client certificate of the cluster's CA for this identity."""
        from k8s.pki import Pki  # noqa: PLC0415

        pki = Pki.load(self.state / "pki")
        pki.issue(name, common_name, organization)
        return kubeconfig(self.state / f"{name}.kubeconfig", self.server, self.ca, pki.dir / f"{name}.crt",
                          pki.dir / f"{name}.key", name)

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        pki = self.state / "pki"
        context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        return context

    def request(self, method: str, path: str, body: dict | None = None, timeout_s: float = 10.0) -> tuple[int, dict]:
        """A request as the cluster's admin (system:masters)."""
        conn = http.client.HTTPSConnection(self.address, self.port, context=self.client_context(), timeout=timeout_s)
        try:
            headers = {"Accept": "application/json"}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            try:
                return response.status, json.loads(raw) if raw else {}
            except ValueError:
                return response.status, {"raw": raw.decode(errors="replace")}
        finally:
            conn.close()

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout_s: float = 60) -> subprocess.CompletedProcess:
        done = subprocess.run([str(BIN / "kubectl"), "--kubeconfig", str(self.admin_kubeconfig), *args],
                              input=input, capture_output=True, text=True, timeout=timeout_s)
        if check and done.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)}: {done.stderr.strip()}")
        return done

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        end = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < end:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise ClusterError(f"{name} exited with {process.returncode}:\n{log_tail(self.state, name)}")
            try:
                status, body = self.request("GET", "/readyz")
                if status == 200:
                    # The controllers are what make EndpointSlices and ServiceAccount tokens.
                    status, _ = self.request("GET", "/api/v1/namespaces/default/serviceaccounts/default")
                    if status == 200:
                        return
                    last = "the default ServiceAccount is not there yet"
                else:
                    last = f"/readyz: {status} {body}"
            except (OSError, ssl.SSLError, http.client.HTTPException) as e:
                last = repr(e)
            time.sleep(0.5)
        raise ClusterError(f"the control plane did not become ready in {timeout_s} s: {last}\n"
                           f"{log_tail(self.state, 'kube-apiserver')}")


def down(state: Path) -> None:
    """Remove a cluster (this one, or one a killed session left behind), and its node."""
    stop_processes(state)
    if os.geteuid() == 0:
        from k8s import node  # noqa: PLC0415

        node.down(state)
    shutil.rmtree(state, ignore_errors=True)


def remove_orphans() -> None:
    """Clusters whose test session is gone (killed before it could clean up)."""
    for state in STATE_ROOT.glob("[0-9]*"):
        if not Path(f"/proc/{state.name}").exists():
            down(state)


def up(state: Path | None = None, address: str = "127.0.0.1", port: int | None = None) -> ControlPlane:
    """The control plane, its API server on `address`:`port` (a free port if None)."""
    missing = missing_binaries()
    if missing:
        raise ClusterError(f"missing {', '.join(missing)}: run `make k8s-tools`")
    remove_orphans()
    state = state or STATE_ROOT / str(os.getpid())
    down(state)
    state.mkdir(parents=True)
    STATE_ROOT.chmod(0o700)
    try:
        return _start(state, address, port)
    except BaseException:
        down(state)  # nothing half-started stays behind
        raise


def _start(state: Path, address: str, port: int | None) -> ControlPlane:
    from k8s.pki import Pki  # noqa: PLC0415

    pki = Pki(state / "pki")
    p = lambda name: str(pki.dir / name)  # noqa: E731
    pki.issue("apiserver", "kube-apiserver", server_names=(
        address, "127.0.0.1", KUBERNETES_SERVICE_IP, "localhost", "kubernetes", "kubernetes.default",
        "kubernetes.default.svc", "kubernetes.default.svc.cluster.local"), client=False)
    pki.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters")
    pki.issue("admin", "nodeagent-test-admin", "system:masters")
    pki.issue("controller-manager", "system:kube-controller-manager")
    pki.issue("scheduler", "system:kube-scheduler")
    admission = state / "admission.yaml"
    admission.write_text(yaml.safe_dump(ADMISSION))
    if address != "127.0.0.1":
        from k8s import node  # noqa: PLC0415

        node.create_links()  # the API server's address, and the pods' bridge
    etcd_client, etcd_peer = free_port("127.0.0.1"), free_port("127.0.0.1")
    api_port = port or free_port(address)
    server = f"https://{address}:{api_port}"
    processes = {}
    processes["etcd"] = start_process(state, "etcd", [
        "etcd", "--name", "nodeagent-test", "--data-dir", str(state / "etcd"),
        "--listen-client-urls", f"http://127.0.0.1:{etcd_client}",
        "--advertise-client-urls", f"http://127.0.0.1:{etcd_client}",
        "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
        "--initial-cluster", f"nodeagent-test=http://127.0.0.1:{etcd_peer}",
        "--quota-backend-bytes", str(512 << 20), "--log-level", "warn"])
    processes["kube-apiserver"] = start_process(state, "kube-apiserver", [
        str(BIN / "kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{etcd_client}",
        f"--bind-address={address}", f"--advertise-address={address}", f"--secure-port={api_port}",
        f"--service-cluster-ip-range={SERVICE_CIDR}", "--authorization-mode=Node,RBAC",
        f"--client-ca-file={p('ca.crt')}", f"--tls-cert-file={p('apiserver.crt')}",
        f"--tls-private-key-file={p('apiserver.key')}",
        f"--kubelet-client-certificate={p('apiserver-kubelet-client.crt')}",
        f"--kubelet-client-key={p('apiserver-kubelet-client.key')}",
        f"--kubelet-certificate-authority={p('ca.crt')}",
        # The node's address, never its name: a name would be looked up in the host's DNS.
        "--kubelet-preferred-address-types=InternalIP",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-account-key-file={p('sa.pub')}", f"--service-account-signing-key-file={p('sa.key')}",
        "--allow-privileged=true", "--enable-admission-plugins=NodeRestriction",
        f"--admission-control-config-file={admission}",
        "--profiling=false", f"--cert-dir={state / 'pki'}", "--v=1"])
    config = lambda name, user: str(kubeconfig(state / f"{name}.kubeconfig", server, pki.dir / "ca.crt",  # noqa: E731
                                               pki.dir / f"{name}.crt", pki.dir / f"{name}.key", user))
    admin = Path(config("admin", "admin"))
    plane = ControlPlane(state, address, api_port, admin, processes)
    _wait_api(plane)
    processes["kube-controller-manager"] = start_process(state, "kube-controller-manager", [
        str(BIN / "kube-controller-manager"), f"--kubeconfig={config('controller-manager', 'kcm')}",
        f"--authentication-kubeconfig={state / 'controller-manager.kubeconfig'}",
        f"--authorization-kubeconfig={state / 'controller-manager.kubeconfig'}",
        "--bind-address=127.0.0.1", f"--secure-port={free_port('127.0.0.1')}", "--leader-elect=false",
        "--use-service-account-credentials=true", f"--service-account-private-key-file={p('sa.key')}",
        f"--root-ca-file={p('ca.crt')}", f"--cluster-signing-cert-file={p('ca.crt')}",
        f"--cluster-signing-key-file={p('ca.key')}", f"--cert-dir={state / 'pki'}",
        "--controllers=*",
        "--v=1"])
    processes["kube-scheduler"] = start_process(state, "kube-scheduler", [
        str(BIN / "kube-scheduler"), f"--kubeconfig={config('scheduler', 'scheduler')}",
        f"--authentication-kubeconfig={state / 'scheduler.kubeconfig'}",
        f"--authorization-kubeconfig={state / 'scheduler.kubeconfig'}",
        "--bind-address=127.0.0.1", f"--secure-port={free_port('127.0.0.1')}", "--leader-elect=false", "--v=1"])
    plane.wait_ready()
    (state / "server").write_text(plane.server)
    return plane


def _wait_api(plane: ControlPlane, timeout_s: float = START_TIMEOUT_S) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        for name, process in plane.processes.items():
            if process.poll() is not None:
                raise ClusterError(f"{name} exited with {process.returncode}:\n{log_tail(plane.state, name)}")
        try:
            if plane.request("GET", "/readyz")[0] == 200:
                return
        except (OSError, ssl.SSLError, http.client.HTTPException):
            pass
        time.sleep(0.3)
    raise ClusterError(f"kube-apiserver not ready in {timeout_s} s:\n{log_tail(plane.state, 'kube-apiserver')}")


def main() -> None:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "up":
        from k8s import node  # noqa: PLC0415

        plane = up(MANUAL, *((node.API_IP, node.API_PORT) if os.geteuid() == 0 else ()))
        print(plane.admin_kubeconfig)
    elif command == "down":
        down(MANUAL)
    else:
        sys.exit("usage: python -m k8s.cluster up|down (with tests/ on PYTHONPATH)")


if __name__ == "__main__":
    main()
