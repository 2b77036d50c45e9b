"""Two pods and the real proxy, without a lab, a kernel program or a lock: the proxy's own cost.

`PodPair` makes two network namespaces joined by a veth pair (10.255.0.1 and .2; no uplink,
nothing leaves them), starts the lab's sample servers in pod B (HTTP/1 :8080, h2c :8081, echo
:9000), and serves both pods with one real `Proxy` in this process, mutual TLS between them
included. Only the data path is stood in for: a client in pod A connects to the outbound
listener (127.0.0.1:15001 in A) itself, and `original_destination` says where it meant to go.

Used by benchmarks/proxy_cost.py (CPU per request) and benchmarks/conncost.py (memory per held
connection, against the per-pod limits). Needs root; removes everything it made on exit and failure (conncost.py removes the
namespaces of a measurement that was killed).
"""

import asyncio
import collections
import contextlib
import os
import signal
import subprocess
import sys
import time

from nodeagent import netns
from nodeagent.cluster.model import ClusterView
from nodeagent.identity.ca import Authority
from nodeagent.identity.workload import WorkloadIdentities
from nodeagent.ports import OUTBOUND_PORT

PREFIX = "nabench"
A_IP, B_IP = "10.255.0.1", "10.255.0.2"
SUBNET = 24
PORTS = {"http": 8080, "h2c": 8081, "echo": 9000}
NAMESPACE = "bench"


class StandInDatapath:
    """What the proxy asks of the data path, answered without a kernel: every outbound
    connection meant `destination`."""

    def __init__(self):
        self.destination: tuple[str, int] | None = None
        self.refusals: collections.deque = collections.deque(maxlen=64)  # the last windows written

    def original_destination(self, netns_cookie: int, client_port: int):
        return self.destination

    def refuse_connects(self, netns_cookie: int, until_ns: int) -> None:
        """What the kernel would be told (proxy/refusal.py): recorded, for tests."""
        self.refusals.append((netns_cookie, until_ns))


def pod_object(name: str, ip: str, meshed: bool = True) -> dict:
    return {"metadata": {"name": name, "namespace": NAMESPACE, "uid": f"uid-{name}",
                         "labels": {"app": name, **({"nodeagent.io/mesh": "enabled"} if meshed else {})}},
            "spec": {"nodeName": "bench", "serviceAccountName": name, "containers": [{}]},
            "status": {"phase": "Running", "podIP": ip}}


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True)


class PodPair:
    def __init__(self, settings=None):
        self.tag = f"{PREFIX}{os.getpid()}"
        self.names = (f"{self.tag}-a", f"{self.tag}-b")
        self.settings = settings
        self.apps: subprocess.Popen | None = None
        self.proxy = None
        self.datapath = StandInDatapath()
        self._fds: list[int] = []

    # --- the network ---

    def _make_network(self) -> None:
        a, b = self.names
        for name in self.names:
            _ip("netns", "add", name)
            _ip("-n", name, "link", "set", "lo", "up")
        _ip("link", "add", f"{self.tag}a", "netns", a, "type", "veth", "peer", "name", f"{self.tag}b", "netns", b)
        for name, dev, address in ((a, f"{self.tag}a", A_IP), (b, f"{self.tag}b", B_IP)):
            _ip("-n", name, "addr", "add", f"{address}/{SUBNET}", "dev", dev)
            _ip("-n", name, "link", "set", dev, "up")

    def _remove_network(self) -> None:
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)

    # --- the apps in pod B ---

    def _start_apps(self) -> None:
        code = ("import asyncio, uvloop\nfrom nodeagent.lab.workloads import serve\n"
                "async def main():\n"
                f"    await asyncio.gather(*(serve(kind, port, 'pod-b') for kind, port in {PORTS!r}.items()))\n"
                "uvloop.run(main())\n")
        self.apps = subprocess.Popen(["ip", "netns", "exec", self.names[1], sys.executable, "-c", code],
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not self._listening(PORTS["echo"]):
            if time.monotonic() > deadline or self.apps.poll() is not None:
                raise RuntimeError("the sample servers in pod B did not start")
            time.sleep(0.05)

    def _listening(self, port: int) -> bool:
        out = subprocess.run(["ip", "netns", "exec", self.names[1], "ss", "-Htln", f"sport = :{port}"],
                             capture_output=True, text=True).stdout
        return bool(out.strip())

    # --- the proxy ---

    async def start(self) -> "PodPair":
        from nodeagent.proxy.server import Proxy
        from nodeagent.settings import DEFAULT

        self._make_network()
        try:
            self._start_apps()
            anchor = Authority.new_anchor("cluster.local")
            issuer = anchor.new_issuer("cluster.local")
            identities = WorkloadIdentities(issuer, anchor.certificate_pem())
            self.proxy = Proxy(self.datapath, identities, self.settings or DEFAULT, owns_datapath=False)
            view = ClusterView([pod_object("pod-a", A_IP), pod_object("pod-b", B_IP, meshed=os.environ.get("BENCH_PLAIN") is None)])
            self.proxy.update_view(view)
            identities.allow({self.proxy.identity_of(p) for p in view.pods.values()})
            self.pods = {}
            for slot, (name, netns_name) in enumerate(zip(("pod-a", "pod-b"), self.names)):
                fd = os.open(netns.named_path(netns_name), os.O_RDONLY)
                self.pods[name] = await self.proxy.add_pod(view.pods[f"{NAMESPACE}/{name}"], fd, slot)
        except BaseException:
            await self.stop()
            raise
        return self

    async def stop(self) -> None:
        if self.proxy is not None:
            for cookie in list(self.proxy.pods):
                with contextlib.suppress(Exception):
                    await self.proxy.remove_pod(cookie, deleted=True)
            self.proxy.close_listeners()
        if self.apps is not None and self.apps.poll() is None:
            self.apps.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.apps.wait(5)
            if self.apps.poll() is None:
                self.apps.kill()
        self._remove_network()

    # --- clients in pod A ---

    def aim(self, port_or_kind) -> tuple[str, int]:
        """Outbound connections from pod A now mean pod B's `port` (or app kind)."""
        port = PORTS.get(port_or_kind, port_or_kind)
        self.datapath.destination = (B_IP, port)
        return "127.0.0.1", OUTBOUND_PORT

    def run_in_a(self, argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.names[0], *argv], capture_output=True, text=True,
                              timeout=timeout)

    async def run_in_a_async(self, argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
        return await asyncio.to_thread(self.run_in_a, argv, timeout)


def leftovers() -> list[str]:
    """Namespaces a killed run left (`ip netns` names starting with the prefix)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(PREFIX)]
