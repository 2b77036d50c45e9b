"""tls_handshakes_total{direction, resumed} through the real proxy (benchmarks/podpair.py: two pods
in their own network namespaces, real sockets, real mutual-TLS handshakes): pod A's first
connection to pod B is a full handshake, its second resumes the session of the first, each
counted as client (outbound) and as server (inbound). Needs root (namespaces), not the lab."""

import asyncio
import os
from dataclasses import replace

import pytest

from nodeagent.settings import DEFAULT
from test_handshake_pacing import sample, with_pair
from test_inbound_handshakes import echo_from_a

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")

MESH = replace(DEFAULT, on_node_plaintext=False)  # one proxy serves both pods: through the mesh port all the same


def handshakes(pair) -> dict:
    return {(direction, resumed): sample(pair, "tls_handshakes_total", direction=direction, resumed=resumed)
            for direction in ("outbound", "inbound") for resumed in ("false", "true")}


def test_a_full_then_a_resumed_handshake_are_counted_apart_on_both_sides():
    async def scenario(pair):
        before = handshakes(pair)
        assert await echo_from_a(pair) == b"ping"  # the session's tickets came before the echo
        after_first = handshakes(pair)
        assert await echo_from_a(pair) == b"ping"
        after_second = handshakes(pair)
        return before, after_first, after_second
    before, first, second = asyncio.run(with_pair(MESH, scenario))
    assert set(before.values()) == {0}
    assert first == {("outbound", "false"): 1, ("outbound", "true"): 0, ("inbound", "false"): 1, ("inbound", "true"): 0}
    assert second == {("outbound", "false"): 1, ("outbound", "true"): 1, ("inbound", "false"): 1, ("inbound", "true"): 1}
