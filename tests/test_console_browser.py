"""The web console in a real browser (Debian's chromium, headless, driven by playwright-core;
`make tools` installs both) against the lab with live traffic: the pages load, show that
traffic, and the workload's tap keeps updating."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import lab_fixture
from test_proxy import py_in

pytestmark = pytest.mark.privileged
ROOT = Path(__file__).resolve().parent.parent
PLAYWRIGHT_CORE = ROOT / ".tools" / "browser" / "node_modules" / "playwright-core"
TRAFFIC_S = 60  # longer than the browser needs; it stops by itself

# The mesh hop on the node too: every connection of the namespace is mTLS (the column reads 100%).
mesh = lab_fixture(mesh="node", agent_args=("--on-node-plaintext", "false"))

TRAFFIC = """
import http.client, os, time
conn = http.client.HTTPConnection("10.96.0.10", 80, timeout=10)
end, i = time.monotonic() + {seconds}, 0
while time.monotonic() < end and not os.path.exists({stop!r}):
    conn.request("GET", "/status/503" if i % 5 == 0 else f"/items/{{i % 3}}")
    conn.getresponse().read()
    i += 1
    time.sleep(0.05)
"""


@pytest.fixture
def traffic(mesh, tmp_path):
    """Requests from client-n0-0 to the http Service (one in five fails), until the test is done
    (TRAFFIC_S at most)."""
    stop = tmp_path / "stop"
    load = threading.Thread(target=py_in, args=(mesh, "client-n0-0", TRAFFIC.format(seconds=TRAFFIC_S, stop=str(stop))),
                            kwargs={"timeout": TRAFFIC_S + 30})
    load.start()
    yield
    stop.touch()
    load.join()


@pytest.fixture
def console(mesh):
    """`nodeagent dashboard` on a free port, reading the lab's agents."""
    process = subprocess.Popen([sys.executable, "-m", "nodeagent", "dashboard", "--port", "0", "--interval", "1"],
                               stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        assert "http://" in line, line + process.stderr.read()
        yield line.split("http://")[1].split("/")[0]
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_console_shows_live_traffic_and_tap(traffic, console, tmp_path):
    assert PLAYWRIGHT_CORE.is_dir() and Path("/usr/bin/chromium").exists(), "run `make tools` first"
    done = subprocess.run(["node", str(ROOT / "tests" / "console_browser.js"), f"http://{console}", str(tmp_path)],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PLAYWRIGHT_CORE": str(PLAYWRIGHT_CORE)})
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert "error" not in seen, json.dumps(seen, indent=1)
    assert not [m for m in seen["console"] if "error" in m.lower()], seen["console"]

    # Overview: default's pods all meshed, live requests with about one in five failing.
    default = next(row for row in seen["namespace"] if row[0] == "default")
    meshed, success, rps = default[1], float(default[2].rstrip("%")), float(default[3])
    assert meshed == "10/10" and 60 <= success <= 95 and rps > 0, default
    assert {"app/client", "app/http"} <= set(seen["graph"]["nodes"])
    assert any(t.startswith("default/app/client → default/app/http") for t in seen["graph"]["secured"])

    # The namespace: app/http has both its pods meshed and live numbers; mTLS on every connection.
    http = next(row for row in seen["workloads"] if row[0] == "app/http")
    assert http[1] == "2/2" and float(http[3]) > 0 and http[8] == "100.0%", http

    # The workload: its tap kept coming, with the lab's requests as the client's proxy saw them
    # and as the server's did; routes rolled up from it.
    assert seen["tap"]["later"] > seen["tap"]["first"] + 5
    ends = {tuple(r[1:4]) for r in seen["tap"]["rows"]}
    assert ends <= {("outbound", "default/client-n0-0", "svc/default/http"),
                    ("inbound", "client.default", "default/http-n0-0"),
                    ("inbound", "client.default", "default/http-n1-0")}, ends
    assert {r[1] for r in seen["tap"]["rows"]} == {"outbound", "inbound"}
    assert {r[8] for r in seen["tap"]["rows"]} == {"yes"}
    assert {r[5] for r in seen["tap"]["rows"]} <= {"/items/0", "/items/1", "/items/2", "/status/503"}
    failing = [r for r in seen["routes"] if r[3] == "/status/503"]
    assert failing and {r[5] for r in failing} == {"0.0%"}, seen["routes"]
    # Its own numbers: counted by its own pods' proxies (inbound), about one in five failing.
    assert "its own pods' inbound requests" in seen["source"]
    meshed, success, rps = seen["golden"][0][0], float(seen["golden"][0][1].rstrip("%")), float(seen["golden"][0][2])
    assert meshed == "2/2" and 60 <= success <= 95 and rps > 0, seen["golden"]
    assert sorted(p[0] for p in seen["pods"]) == ["default/http-n0-0", "default/http-n1-0"]
    assert {p[2] for p in seen["pods"]} == {"http.default"}

    # Edges: the client's calls over mTLS, both identities.
    edge = next(e for e in seen["edges"] if e[:2] == ["default/app/client", "default/app/http"])
    assert edge[2:5] == ["yes", "client.default", "http.default"] and int(edge[5]) > 0, edge
    assert edge[10] == "client (verified)"
