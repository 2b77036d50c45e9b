"""The agent as a DaemonSet on a real node: kubelet and containerd on this machine (tests/k8s/node.py)
run `nodeagent install | kubectl apply -f -` as a real pod in a real container (its
capabilities, mounts, probes), which meshes real pods: their Service traffic goes through it
(no kube-proxy runs here: a ClusterIP answers only through the mesh), and the enrolment gate
holds a meshed pod until the node's agent has enrolled it."""

import json
import re
import subprocess
import sys
import time

import pytest

from k8s import image, node
from nodeagent.identity.ca import Authority, write_identity_files

pytestmark = pytest.mark.privileged
NAMESPACE = "nodeagent"


def wait_until(predicate, what: str, timeout_s: float = 120, plane=None):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = ""
            if plane is not None:
                detail = plane.kubectl("get", "pods", "-A", "-o", "wide", check=False).stdout
                detail += plane.kubectl("get", "events", "-A", check=False).stdout[-3000:]
            raise AssertionError(f"timed out waiting for {what}\n{detail}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def real_node(kube, tmp_path_factory):
    work = tmp_path_factory.mktemp("images")
    forwarding = node.ip_forwarding()
    node.up(kube, [image.pause_archive(work), image.agent_archive(work)])
    yield kube
    assert node.ip_forwarding() == forwarding  # nothing here may forward toward the host's interfaces


def bounding_capabilities() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("CapBnd:")).split()[1], 16)


CAP_SYS_RESOURCE = 24


def install(plane, tmp_path_factory, *options: str) -> str:
    """`nodeagent install | kubectl apply -f -`, as a user would. One change, only where this
    machine needs it: its root has no CAP_SYS_RESOURCE in the bounding set (runc then refuses
    the container: "unable to apply caps"), so SYS_RESOURCE (RLIMIT_MEMLOCK for maps on
    kernels before 5.11, which account BPF memory to the memory cgroup since) is left out."""
    identity = tmp_path_factory.getbasetemp() / "node-identity"
    if not identity.exists():
        anchor = Authority.new_anchor("cluster.local")
        write_identity_files(identity, anchor, anchor.new_issuer("cluster.local"))
    manifests = subprocess.run([sys.executable, "-m", "nodeagent", "install", "--identity-dir", str(identity),
                                "--image", image.AGENT_IMAGE, *options],
                               capture_output=True, text=True, check=True).stdout
    if not bounding_capabilities() & (1 << CAP_SYS_RESOURCE):
        manifests = re.sub(r"\n *- SYS_RESOURCE\n", "\n", manifests)
    plane.kubectl("apply", "-f", "-", input=manifests)
    return manifests


def pods(plane, namespace: str, selector: str = "") -> list[dict]:
    args = ["-n", namespace, "get", "pods", "-o", "json"] + (["-l", selector] if selector else [])
    return json.loads(plane.kubectl(*args).stdout)["items"]


def ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod.get("status", {}).get("conditions", []))


def agent_ready(plane) -> dict | None:
    found = [p for p in pods(plane, NAMESPACE, "app.kubernetes.io/name=nodeagent")
             if not p["metadata"].get("deletionTimestamp")]
    return found[0] if len(found) == 1 and ready(found[0]) else None


@pytest.fixture(scope="module")
def agent(real_node, tmp_path_factory):
    install(real_node, tmp_path_factory)
    yield wait_until(lambda: agent_ready(real_node), "the agent's pod Ready", timeout_s=300, plane=real_node)


def test_the_daemonset_runs_as_a_real_pod_and_passes_the_post_install_check(real_node, agent):
    assert agent["spec"]["nodeName"] == node.NODE_NAME
    done = subprocess.run([sys.executable, "-m", "nodeagent", "check", "--post-install", "--kubeconfig",
                           str(real_node.admin_kubeconfig)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 of 1 nodes ready, rollout complete" in done.stdout
    # The agent's metrics port, read through the API server's pod proxy: nothing waits for a restart.
    assert "[ok]   agents run with the ConfigMap's settings (none waits for a restart): 1 running agent(s) asked" \
        in done.stdout, done.stdout


SERVER = """
import http.server, socket
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("hello from " + socket.gethostname() + "\\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), Hello).serve_forever()
"""
# Fetches the Service by its ClusterIP once a second (no kube-proxy here: only the mesh routes it).
CLIENT = """
import os, time, urllib.request
url = "http://" + os.environ["WEB_SERVICE_HOST"] + "/"
for _ in range(600):
    try:
        print("ok", urllib.request.urlopen(url, timeout=2).read().decode().strip(), flush=True)
    except Exception as e:
        print("fail", repr(e), flush=True)
    time.sleep(1)
"""


def python_pod(name: str, namespace: str, code: str, labels: dict) -> dict:
    container = {"name": "app", "image": image.APP_IMAGE, "command": ["/opt/venv/bin/python", "-c", code],
                 "ports": [{"name": "http", "containerPort": 8080}]}
    if code is SERVER:  # Ready once it answers (through the mesh), not once its process starts: as real servers are
        container["readinessProbe"] = {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"terminationGracePeriodSeconds": 1, "containers": [container]}}


def logs(plane, namespace: str, pod: str, container: str = "app") -> str:
    return plane.kubectl("-n", namespace, "logs", pod, "-c", container, check=False).stdout


@pytest.fixture(scope="module")
def shop(real_node, agent):
    plane = real_node
    plane.kubectl("create", "namespace", "store")
    plane.kubectl("label", "namespace", "store", "nodeagent.io/mesh=enabled")
    plane.kubectl("apply", "-f", "-", input=json.dumps(python_pod("web", "store", SERVER, {"app": "web"})))
    plane.kubectl("-n", "store", "create", "service", "clusterip", "web", "--tcp=80:8080")
    plane.kubectl("-n", "store", "patch", "service", "web", "--type=merge",
                  "-p", json.dumps({"spec": {"selector": {"app": "web"}}}))
    plane.kubectl("apply", "-f", "-", input=json.dumps(python_pod("client", "store", CLIENT, {"app": "client"})))
    yield plane


def test_meshed_pods_on_the_real_node_reach_a_service_through_the_agent(shop):
    wait_until(lambda: "ok hello from web" in logs(shop, "store", "client"), "the client's requests through the mesh",
               timeout_s=180, plane=shop)
    # Each meshed pod started only after its gate saw the agent's listeners in its namespace.
    for name in ("web", "client"):
        assert "enrolled by the node's agent" in logs(shop, "store", name, "nodeagent-enrolment")
    stats = json.loads(shop.kubectl("-n", NAMESPACE, "exec", "ds/nodeagent", "--", "/opt/venv/bin/python", "-c",
                                    "import urllib.request; print(urllib.request.urlopen("
                                    "'http://127.0.0.1:4191/stats').read().decode())").stdout)
    assert {p["pod"] for p in stats["pods"]} == {"store/web", "store/client"}
    assert stats["ready"] and not stats["view_problems"]


def agent_stats(plane) -> dict:
    return json.loads(plane.kubectl("-n", NAMESPACE, "exec", "ds/nodeagent", "--", "/opt/venv/bin/python", "-c",
                                    "import urllib.request; print(urllib.request.urlopen("
                                    "'http://127.0.0.1:4191/stats').read().decode())").stdout)


def test_an_edited_config_map_is_taken_by_the_running_agent(shop):
    """Issue 15: `kubectl edit` of the ConfigMap reaches the agent through its mounted volume (the
    kubelet's sync and ConfigMap cache: up to about 2 minutes); live settings apply, the others wait for a restart."""
    plane = shop
    (before,) = [p["metadata"]["uid"] for p in pods(plane, NAMESPACE, "app.kubernetes.io/name=nodeagent")]
    plane.kubectl("-n", NAMESPACE, "patch", "configmap", "nodeagent-config", "--type=merge",
                  "-p", json.dumps({"data": {"log-level": "debug", "max-connections": "500", "workers": "3"}}))
    wait_until(lambda: agent_stats(plane)["settings"]["in_use"]["log-level"] == "debug",
               "the agent to take the new log level", timeout_s=180, plane=plane)
    settings = agent_stats(plane)["settings"]
    assert settings["in_use"]["max-connections"] == "500" and set(settings["needs_restart"]) == {"workers"}
    # Copied to the node (the hostPath --state-dir), for an agent that starts on a bad ConfigMap.
    copy = json.loads((node.AGENT_STATE_DIR / "config-last-good.json").read_text())
    assert (copy["log-level"], copy["workers"]) == ("debug", "3") and settings["started_from"] == "directory"
    assert [p["metadata"]["uid"] for p in pods(plane, NAMESPACE, "app.kubernetes.io/name=nodeagent")] == [before]
    served = logs(plane, "store", "client").count("ok hello from web")
    wait_until(lambda: logs(plane, "store", "client").count("ok hello from web") > served,
               "the client's next request through the mesh", timeout_s=30, plane=plane)
    plane.kubectl("-n", NAMESPACE, "patch", "configmap", "nodeagent-config", "--type=merge",
                  "-p", json.dumps({"data": {"log-level": "info", "max-connections": "20000", "workers": "0"}}))


# Requests to the Service for at most LOAD_S or until /tmp/stop exists, each on a new connection
# and on one kept-alive connection (opened again when the proxy asks it to close); then one line
# of counts. A reset is any ConnectionResetError (http.client's RemoteDisconnected is one).
LOAD_S = 240
LOAD = """
import http.client, json, os, time
host = os.environ["WEB_SERVICE_HOST"]
counts = {kind: {"ok": 0, "failed": 0, "resets": 0} for kind in ("new connection", "keep-alive")}
errors, kept, said, by = [], None, False, {}
def get(connection):
    connection.request("GET", "/")
    response = connection.getresponse()
    body = response.read().decode()
    good = response.status == 200 and body.startswith("hello from web")
    if good:
        by[body.split()[-1]] = by.get(body.split()[-1], 0) + 1
    else:  # what the proxy said (its error header), for the failure's message
        errors.append("%%d %%s: %%s" %% (response.status, response.getheader("nodeagent-proxy-error"), body[:200]))
    return good, response.will_close
deadline = time.monotonic() + %d
while time.monotonic() < deadline and not os.path.exists("/tmp/stop"):
    for kind in counts:
        try:
            if kind == "new connection":
                connection = http.client.HTTPConnection(host, 80, timeout=5)
                good, _ = get(connection)
                connection.close()
            else:
                kept = kept or http.client.HTTPConnection(host, 80, timeout=5)
                good, closing = get(kept)
                if closing:
                    kept.close()
                    kept = None
            counts[kind]["ok" if good else "failed"] += 1
        except Exception as e:
            counts[kind]["resets" if isinstance(e, ConnectionResetError) else "failed"] += 1
            errors.append(kind + ": " + repr(e))
            if kind == "keep-alive":
                kept = None
    if not said and sum(c["ok"] for c in counts.values()) >= 2:
        print("started", flush=True)
        said = True
    time.sleep(0.02)
print("summary " + json.dumps({"counts": counts, "answered_by": by, "errors": errors[:20]}), flush=True)
time.sleep(3600)
""" % LOAD_S


def agent_pods(plane) -> list[dict]:
    return pods(plane, NAMESPACE, "app.kubernetes.io/name=nodeagent")


def running(pod: dict) -> bool:
    return any("running" in c.get("state", {}) for c in pod.get("status", {}).get("containerStatuses", []))


def test_a_surge_roll_of_the_daemonset_under_load_fails_no_request(shop):
    """A change of the pod template (same image) rolls the DaemonSet with maxSurge 1: the new
    agent pod runs beside the old one on the node (no hostPort, no hostNetwork: nothing keeps
    them apart), takes over, and the old one drains and exits; a client sending requests all
    along sees no failure and no reset. A server pod that joins the Service while both agents run
    is enrolled by the new agent alone (agent/succession.py) and answers after the old one exits."""
    plane = shop
    (old,) = agent_pods(plane)
    # The load starts once the Service has its endpoint (run alone, no earlier test waited for it).
    wait_until(lambda: [p for p in pods(plane, "store", "app=web") if ready(p)], "the web pod Ready", timeout_s=180,
               plane=plane)
    load = python_pod("load", "store", LOAD, {"app": "load"})
    load["spec"]["restartPolicy"] = "Never"
    plane.kubectl("apply", "-f", "-", input=json.dumps(load))
    wait_until(lambda: "started" in logs(plane, "store", "load"), "the load's first requests", timeout_s=180,
               plane=plane)
    plane.kubectl("-n", NAMESPACE, "patch", "daemonset", "nodeagent", "--type=merge", "-p", json.dumps(
        {"spec": {"template": {"metadata": {"annotations": {"nodeagent.test/roll": "1"}}}}}))
    side_by_side, old_logs, started = False, "", time.monotonic()
    joiner = python_pod("web-joiner", "store", SERVER, {"app": "web"})
    while True:  # what the node runs, every 0.25 s, until the old agent pod is gone
        now = {p["metadata"]["name"]: p for p in agent_pods(plane)}
        new = [p for name, p in now.items() if name != old["metadata"]["name"]]
        if old["metadata"]["name"] in now:
            if not side_by_side and new and running(new[0]) and running(now[old["metadata"]["name"]]):
                side_by_side = True
                plane.kubectl("apply", "-f", "-", input=json.dumps(joiner))  # joins during the overlap
            if now[old["metadata"]["name"]]["metadata"].get("deletionTimestamp"):
                read = plane.kubectl("-n", NAMESPACE, "logs", old["metadata"]["name"], check=False).stdout or ""
                # Once its container is gone the kubelet answers with this text instead of the logs.
                if read and not read.startswith("unable to retrieve container logs"):
                    old_logs = read
        elif new and ready(new[0]):
            break
        assert time.monotonic() - started < 300, plane.kubectl("get", "pods", "-A", "-o", "wide").stdout
        time.sleep(0.25)
    rolled_s = time.monotonic() - started
    wait_until(lambda: [p for p in pods(plane, "store", "app=web") if p["metadata"]["name"] == "web-joiner" and ready(p)],
               "the joining pod Ready", timeout_s=120, plane=plane)
    stats = agent_stats(plane)  # the new agent's: it serves every meshed pod
    assert {p["pod"] for p in stats["pods"]} == {f"store/{name}" for name in ("web", "client", "load", "web-joiner")}
    assert stats["ready"]
    time.sleep(4)  # the load goes on through the new agent alone, to both servers
    plane.kubectl("-n", "store", "exec", "load", "--", "/opt/venv/bin/python", "-c", "open('/tmp/stop', 'w')")
    summary = wait_until(lambda: re.search(r"^summary (.*)$", logs(plane, "store", "load"), re.M),
                         "the load's counts", timeout_s=30, plane=plane)
    result = json.loads(summary.group(1))
    print(f"rolled in {rolled_s:.1f} s: {result}")
    assert side_by_side, "the new agent pod never ran beside the old one"
    assert "draining" in old_logs, old_logs[-2000:]  # the old agent drained on SIGTERM
    assert "store/web-joiner" not in old_logs  # the new agent enrolled the joining pod alone
    assert result["answered_by"].get("web-joiner", 0) > 0, result
    status = json.loads(plane.kubectl("-n", NAMESPACE, "get", "daemonset", "nodeagent", "-o", "json").stdout)["status"]
    assert (status["updatedNumberScheduled"], status["numberAvailable"]) == (1, 1), status
    for kind, counts in result["counts"].items():
        assert counts["ok"] > 0 and (counts["failed"], counts["resets"]) == (0, 0), (kind, result)
    plane.kubectl("-n", "store", "delete", "pod", "load", "web-joiner", "--wait=false")


def test_a_meshed_pod_started_while_the_agent_is_down_is_held_until_it_is_back(shop, tmp_path_factory):
    plane = shop
    # The agent goes away (its DaemonSet selects no node), the node's data path stays pinned.
    plane.kubectl("-n", NAMESPACE, "patch", "daemonset", "nodeagent", "--type=merge", "-p", json.dumps(
        {"spec": {"template": {"spec": {"nodeSelector": {"kubernetes.io/os": "none"}}}}}))
    wait_until(lambda: not pods(plane, NAMESPACE, "app.kubernetes.io/name=nodeagent"), "the agent to go",
               plane=plane)
    plane.kubectl("apply", "-f", "-", input=json.dumps(python_pod("late", "store", CLIENT, {"app": "late"})))
    time.sleep(15)
    (late,) = [p for p in pods(plane, "store") if p["metadata"]["name"] == "late"]
    assert late["status"]["phase"] == "Pending" and not ready(late)
    assert [s["name"] for s in late["status"].get("initContainerStatuses", [])] == ["nodeagent-enrolment"]
    assert "running" in late["status"]["initContainerStatuses"][0]["state"]  # the gate, waiting for the agent
    assert "running" not in late["status"]["containerStatuses"][0]["state"]  # the application: not started
    install(plane, tmp_path_factory)  # the agent is back: it enrols the held pod, which then starts
    wait_until(lambda: "ok hello from web" in logs(plane, "store", "late"), "the held pod, meshed",
               timeout_s=300, plane=plane)
