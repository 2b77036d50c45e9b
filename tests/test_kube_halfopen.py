"""A half-open watch connection (the peer gone without a FIN: a node's link or a load balancer
dropping the flow) is noticed by TCP keepalive, and the reflector watches again. The loss is
real: iptables drops the double's packets on loopback, both ways, until the test lets them by."""

import random
import shutil
import subprocess
import time

import pytest

from kube_double import ApiDouble
from nodeagent.cluster import kube
from nodeagent.cluster.kube import ApiClient, KubeConfig, Reflector, Store
from test_kube_watch import names, pod, wait_for

pytestmark = [pytest.mark.privileged,
              pytest.mark.skipif(shutil.which("iptables") is None, reason="needs iptables")]


def drop_rules(port: int) -> list[list[str]]:
    return [["INPUT", "-i", "lo", "-p", "tcp", "--dport", str(port), "-j", "DROP"],
            ["INPUT", "-i", "lo", "-p", "tcp", "--sport", str(port), "-j", "DROP"]]


def test_a_half_open_watch_is_noticed_and_watched_again(monkeypatch):
    monkeypatch.setattr(kube, "KEEPALIVE_IDLE_S", 1)
    monkeypatch.setattr(kube, "KEEPALIVE_INTERVAL_S", 1)
    monkeypatch.setattr(kube, "KEEPALIVE_COUNT", 2)
    api = ApiDouble()
    port = api.server.server_address[1]
    store = Store()
    reflector = Reflector(ApiClient(KubeConfig(api.url, token=api.token), timeout_s=2), "pods", store,
                          rng=random.Random(1), sleep=lambda s: time.sleep(min(s, 0.2)))
    added = []
    try:
        api.put("pods", pod("a", "10.244.0.5"))
        reflector.start()
        wait_for(lambda: reflector.watching, "the watch")
        for rule in drop_rules(port):
            subprocess.run(["iptables", "-w", "-I", *rule], check=True)
            added.append(rule)
        started = time.monotonic()
        # Silence both ways: no FIN, no RST; only keepalive can tell the peer is gone.
        wait_for(lambda: reflector.failures >= 1, "keepalive to notice", timeout_s=20)
        noticed = time.monotonic() - started
        assert noticed < 15  # idle 1 s + 2 probes 1 s apart, and the 2 s connect timeout after
        for rule in added:
            subprocess.run(["iptables", "-w", "-D", *rule], check=True)
        added.clear()
        api.put("pods", pod("b", "10.244.0.6"))
        wait_for(lambda: names(store) == {"a", "b"}, "the new watch", timeout_s=20)
    finally:
        for rule in added:
            subprocess.run(["iptables", "-w", "-D", *rule])
        reflector.stop()
        api.close()
