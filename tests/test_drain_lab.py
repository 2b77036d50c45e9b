"""SIGTERM drains the agent (issue 15): not ready at once, listeners closed without a reset,
HTTP/1 clients told `Connection: close`, HTTP/2 clients GOAWAY after their streams, opaque
connections left to end until the drain deadline or a second signal; worker processes too."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import lab_fixture
from nodeagent.lab import lab as lab_ops
from test_proxy import _agent_pid, wait_until

pytestmark = pytest.mark.privileged
TESTS = os.path.dirname(os.path.abspath(__file__))


lab = lab_fixture(nodes=2, pods_per_node=5, mesh="node")


def in_pod(lab, pod_name: str, argv: list[str], **popen) -> subprocess.Popen:
    pod = lab.plan.pod(pod_name)
    return subprocess.Popen(["ip", "netns", "exec", pod.netns, *argv], text=True,
                            preexec_fn=lambda: (lab.pod_cgroup(pod) / "cgroup.procs").write_text("0"), **popen)


def ready_status(admin_port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def restart_agent(lab, extra_args: list[str] = ()) -> None:
    node = lab.plan.nodes[0]
    saved = lab_ops.AGENT_EXTRA_ARGS
    lab_ops.AGENT_EXTRA_ARGS = [*saved, *extra_args]
    try:
        lab_ops.start_agent(lab, node)
    finally:
        lab_ops.AGENT_EXTRA_ARGS = saved
    lab_ops.wait_agent_ready(node)


def stop_agent(lab) -> None:
    """Two signals: drain, then at once."""
    pid = _agent_pid(lab, lab.plan.nodes[0].name)
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.2)
    os.kill(pid, signal.SIGTERM)
    wait_gone(pid, 10)


def wait_gone(pid: int, timeout_s: float) -> None:
    wait_until(lambda: not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z",
               f"process {pid} to exit", timeout_s)


def holder(lab):
    """drain_client.py in client-n0-0 (served by node0's agent), toward pods of node1."""
    http, echo = lab.plan.pod("http-n1-0").ip, lab.plan.pod("echo-n1-0").ip
    process = in_pod(lab, "client-n0-0", [sys.executable, os.path.join(TESTS, "drain_client.py"), f"{http}:8080",
                                           f"{echo}:9000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert process.stdout.readline().strip() == "open"
    return process


def test_sigterm_drains_http1_http2_and_opaque_connections(lab):
    node = lab.plan.nodes[0]
    pid = _agent_pid(lab, node.name)
    client = holder(lab)
    h2c = lab.plan.pod("h2c-n1-0").ip
    nghttp = in_pod(lab, "client-n0-0", ["nghttp", "-v", "-t", "20", f"http://{h2c}:8081/delay/2500"],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        time.sleep(0.8)  # the stream is in flight at the proxy
        assert nghttp.poll() is None
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: ready_status(node.admin_port) == 503, "/ready to say 503", 2)

        # HTTP/1: the next response on the kept-alive connection says close, and the proxy closes.
        client.stdin.write("go\n")
        client.stdin.flush()
        answer = json.loads(client.stdout.readline())
        assert answer == {"status": 200, "connection": "close", "body": "hello from http-n1-0\n",
                          "closed_after": True, "echo_exact": True}

        # HTTP/2: the stream in flight finishes; GOAWAY NO_ERROR, first a notice, then the last stream id.
        output, _ = nghttp.communicate(timeout=20)
        assert nghttp.returncode == 0, output
        assert re.search(r":status: 200", output), output
        goaways = [int(last) for last in re.findall(r"recv GOAWAY frame.*\n.*last_stream_id=(\d+), error_code=NO_ERROR",
                                                    output)]
        request_stream = int(re.search(r"send HEADERS frame <length=\d+, flags=0x\w+, stream_id=(\d+)>", output)[1])
        assert goaways[0] == 2**31 - 1 and goaways[-1] == request_stream, output

        # The opaque connection keeps the agent until it ends.
        time.sleep(1)
        assert os.path.exists(f"/proc/{pid}") and ready_status(node.admin_port) == 503
        client.stdin.write("close\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "closed"
        wait_gone(pid, 10)
        log = (lab_ops.STATE_DIR / "logs" / f"agent-{node.name}.log").read_text()
        assert "drained in" in log and "connections cut" not in log.split("draining: not ready")[-1]
    finally:
        for process in (client, nghttp):
            process.kill()
            process.wait()
        restart_agent(lab)


def test_the_drain_deadline_cuts_what_is_left_in_every_process(lab):
    stop_agent(lab)
    restart_agent(lab, ["--drain-timeout", "3s", "--workers", "2"])
    node = lab.plan.nodes[0]
    pid = _agent_pid(lab, node.name)
    clients = [holder(lab) for _ in range(4)]  # spread over both processes by the kernel
    try:
        os.kill(pid, signal.SIGTERM)
        time.sleep(1)
        for client in clients:  # still served while draining
            client.stdin.write("go\n")
            client.stdin.flush()
            assert json.loads(client.stdout.readline())["echo_exact"]
        wait_gone(pid, 15)
        log = (lab_ops.STATE_DIR / "logs" / f"agent-{node.name}.log").read_text().split("draining: not ready")[-1]
        assert "the drain deadline" in log and "connections cut" in log
    finally:
        for client in clients:
            client.kill()
            client.wait()
        if not lab_ops.agent_ready(lab.plan.nodes[0]):
            restart_agent(lab)


def test_a_second_signal_ends_the_drain_at_once(lab):
    node = lab.plan.nodes[0]
    pid = _agent_pid(lab, node.name)
    client = holder(lab)
    try:
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: ready_status(node.admin_port) == 503, "/ready to say 503", 2)
        time.sleep(0.5)
        assert os.path.exists(f"/proc/{pid}")  # the default deadline is 10 minutes
        os.kill(pid, signal.SIGINT)
        wait_gone(pid, 10)
        log = (lab_ops.STATE_DIR / "logs" / f"agent-{node.name}.log").read_text().split("draining: not ready")[-1]
        assert "a second signal" in log
    finally:
        client.kill()
        client.wait()
        restart_agent(lab)
