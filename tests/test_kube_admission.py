"""The enrolment gate's check, on /proc/net/tcp text as the kernel writes it."""

from nodeagent.admission import gate

# A pod's namespace with the agent's listeners (127.0.0.1:15001 and :15006, the pod's IP:4143)
# and an application's own listener.
ENROLLED = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:3A9E 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 0109F40A:102F 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
   3: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4 1 0 100 0 0 10 0
"""
# Only the outbound listener yet, and a connection (not listening) from port 15006.
HALFWAY = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:3A9E 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
"""


def test_the_gate_opens_only_on_both_proxy_listeners():
    assert gate.listening_ports(ENROLLED) == {15001, 15006, 4143, 8080}
    assert gate.enrolled(ENROLLED) and not gate.enrolled(HALFWAY)


def test_the_gate_waits_and_says_so_then_settles_before_it_opens():
    reads = iter([HALFWAY] * 400 + [ENROLLED, ENROLLED])
    now = [0.0]
    said = []

    def sleep(seconds):
        now[0] += seconds

    gate.wait(read=lambda: next(reads), poll_s=0.2, settle_s=0.5, clock=lambda: now[0], sleep=sleep,
              say=said.append)
    assert [s for s in said if s.startswith("waiting")] == ["waiting 30 s for the node's nodeagent to enrol this pod",
                                                            "waiting 60 s for the node's nodeagent to enrol this pod"]
    assert said[-1] == "enrolled by the node's agent after 80.5 s"
