"""The enrolment gate: the first init container of every meshed pod (admission/policy.py puts
it there). It runs in the pod's network namespace before any other container of the pod and
exits only once the node's agent has enrolled the pod, which it sees as the agent's
listeners in that namespace (the outbound and inbound proxy ports); so no container of a
meshed pod runs, and sends, unmeshed. A pod started while its node's agent is down waits
here (Init:0/1) until the agent is back. Unprivileged: it only reads /proc/net/tcp.

    python -m nodeagent.admission.gate [--poll-s 0.2] [--settle-s 0.5]
"""

import argparse
import sys
import time
from pathlib import Path

from nodeagent.ports import INBOUND_PORT, OUTBOUND_PORT

LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's st column
GATE_PORTS = frozenset({OUTBOUND_PORT, INBOUND_PORT})
NOTICE_EVERY_S = 30.0


def listening_ports(proc_net_tcp: str) -> set[int]:
    """Local ports in LISTEN state, from /proc/net/tcp text."""
    ports = set()
    for line in proc_net_tcp.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[3] == LISTEN:
            ports.add(int(fields[1].rpartition(":")[2], 16))
    return ports


def enrolled(proc_net_tcp: str) -> bool:
    return GATE_PORTS <= listening_ports(proc_net_tcp)


def wait(read=lambda: Path("/proc/net/tcp").read_text(), poll_s: float = 0.2, settle_s: float = 0.5,
         clock=time.monotonic, sleep=time.sleep, say=lambda text: print(text, file=sys.stderr, flush=True)) -> None:
    """Until the agent's listeners are up, then `settle_s` more (the agent writes the pod's
    data-path entry right after opening them) and a second look."""
    started = noticed = clock()
    while True:
        if enrolled(read()):
            sleep(settle_s)
            if enrolled(read()):
                say(f"enrolled by the node's agent after {clock() - started:.1f} s")
                return
        if clock() - noticed >= NOTICE_EVERY_S:
            noticed = clock()
            say(f"waiting {noticed - started:.0f} s for the node's nodeagent to enrol this pod")
        sleep(poll_s)


def main() -> None:
    parser = argparse.ArgumentParser(description="Wait until the node's agent has enrolled this pod.")
    parser.add_argument("--poll-s", type=float, default=0.2)
    parser.add_argument("--settle-s", type=float, default=0.5)
    args = parser.parse_args()
    wait(poll_s=args.poll_s, settle_s=args.settle_s)


if __name__ == "__main__":
    main()
