"""Trace context at one hop (proxy/tracecontext.py): pure, with plain values."""

import pytest

from nodeagent.proxy import tracecontext as tc
from nodeagent.proxy.tracecontext import Parent, Span, Style

TRACE = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")
PARENT = bytes.fromhex("00f067aa0ba902b7")
NEW_TRACE = bytes.fromhex("11111111111111111111111111111111")
NEW_SPAN = bytes.fromhex("2222222222222222")
W3C = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize("value, expected", [
    (W3C, Parent(Style.W3C, TRACE, PARENT, True)),
    (W3C[:-2] + b"00", Parent(Style.W3C, TRACE, PARENT, False)),
    (W3C[:-2] + b"03", Parent(Style.W3C, TRACE, PARENT, True)),  # other flags bits are kept out of it
    (W3C.upper(), None),  # W3C: lowercase hex only
    (W3C[:4] + W3C[4:5].upper() + W3C[5:], None),  # one uppercase digit ("B")
    (b" " + W3C + b" ", Parent(Style.W3C, TRACE, PARENT, True)),
    (b"01" + W3C[2:] + b"-future-fields", Parent(Style.W3C, TRACE, PARENT, True)),  # a later version: 4 fields read
    (W3C + b"-extra", None),  # version 00 has exactly four
    (b"ff" + W3C[2:], None),  # version ff is invalid
    (W3C.replace(TRACE.hex().encode(), b"0" * 32), None),  # an all-zero trace id
    (W3C.replace(PARENT.hex().encode(), b"0" * 16), None),
    (W3C[:-3], None),
    (b"00-xyz-00f067aa0ba902b7-01", None),
    (b"", None),
    (b"00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01", None),
])
def test_traceparent(value, expected):
    assert tc.parse_traceparent(value) == expected


def test_every_prefix_of_a_traceparent_is_refused_but_the_whole():
    answers = [tc.parse_traceparent(W3C[:i]) for i in range(len(W3C) + 1)]
    assert answers[:-1] == [None] * len(W3C) and answers[-1] is not None


@pytest.mark.parametrize("value, expected", [
    (b"4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1", Parent(Style.B3_SINGLE, TRACE, PARENT, True)),
    (b"4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0-0000000000000001",
     Parent(Style.B3_SINGLE, TRACE, PARENT, False)),
    (b"4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-d", Parent(Style.B3_SINGLE, TRACE, PARENT, True)),
    (b"a3ce929d0e0e4736-00f067aa0ba902b7", Parent(Style.B3_SINGLE, bytes(8) + TRACE[8:], PARENT, None)),
    (b"0", Parent(Style.B3_SINGLE, b"", None, False)),
    (b"1", Parent(Style.B3_SINGLE, b"", None, True)),
    (b"4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-x", None),
    (b"4bf92f3577b34da6a3ce929d0e0e4736", None),
    (b"a-b-c-d-e", None),
])
def test_b3_single(value, expected):
    assert tc.parse_b3_single(value) == expected


def test_b3_multi_and_the_order_of_preference():
    multi = [(b"X-B3-TraceId", TRACE.hex().encode()), (b"X-B3-SpanId", PARENT.hex().encode()),
             (b"X-B3-Sampled", b"1")]
    assert tc.find_parent(multi) == Parent(Style.B3_MULTI, TRACE, PARENT, True)
    assert tc.find_parent([*multi[:2], (b"x-b3-flags", b"1")]).sampled is True  # debug: sampled
    assert tc.find_parent(multi[:2]).sampled is None  # no decision: ours to make
    assert tc.find_parent([(b"x-b3-sampled", b"0")]) == Parent(Style.B3_MULTI, b"", None, False)
    assert tc.find_parent([(b"x-b3-traceid", b"zz"), (b"x-b3-spanid", PARENT.hex().encode())]) is None
    # traceparent wins over B3; a malformed traceparent gives way to B3
    assert tc.find_parent([*multi, (b"traceparent", W3C)]).style is Style.W3C
    assert tc.find_parent([(b"traceparent", b"junk"), *multi]).style is Style.B3_MULTI
    assert tc.find_parent([(b"content-type", b"text/plain")]) is None
    assert tc.find_parent([]) is None


def test_decide():
    sampled, unsampled = Parent(Style.W3C, TRACE, PARENT, True), Parent(Style.W3C, TRACE, PARENT, False)
    assert tc.decide(sampled, 0.99, 0.0, NEW_TRACE, NEW_SPAN) == Span(TRACE, NEW_SPAN, PARENT, True)
    assert tc.decide(unsampled, 0.0, 1.0, NEW_TRACE, NEW_SPAN) == Span(TRACE, NEW_SPAN, PARENT, False)  # it decided
    assert tc.decide(None, 0.004, 0.01, NEW_TRACE, NEW_SPAN) == Span(NEW_TRACE, NEW_SPAN, None, True)
    assert tc.decide(None, 0.01, 0.01, NEW_TRACE, NEW_SPAN) == Span(NEW_TRACE, NEW_SPAN, None, False)
    undecided = Parent(Style.B3_MULTI, TRACE, PARENT, None)
    assert tc.decide(undecided, 0.5, 0.6, NEW_TRACE, NEW_SPAN) == Span(TRACE, NEW_SPAN, PARENT, True)
    assert tc.decide(undecided, 0.7, 0.6, NEW_TRACE, NEW_SPAN) == Span(TRACE, NEW_SPAN, PARENT, False)
    assert tc.decide(Parent(Style.B3_SINGLE, b"", None, True), 0.9, 0.0, NEW_TRACE, NEW_SPAN) == Span(
        NEW_TRACE, NEW_SPAN, None, True)
    assert tc.decide(Parent(Style.B3_SINGLE, b"", None, False), 0.0, 1.0, NEW_TRACE, NEW_SPAN) is None


def hop(headers: list, draw: float = 0.0, rate: float = 1.0) -> tuple[list, Span | None]:
    headers = list(headers)
    parent = tc.find_parent(headers)
    span = tc.decide(parent, draw, rate, NEW_TRACE, NEW_SPAN)
    if span is not None:
        tc.rewrite(headers, parent, span)
    return headers, span


def test_rewrite_w3c_keeps_tracestate_and_other_headers():
    headers, span = hop([(b"Host", b"api"), (b"TraceParent", W3C), (b"tracestate", b"vendor=x"),
                         (b"traceparent", W3C)])
    assert headers == [(b"Host", b"api"), (b"TraceParent", b"00-" + TRACE.hex().encode() + b"-2222222222222222-01"),
                       (b"tracestate", b"vendor=x")]  # a duplicate traceparent is dropped
    assert tc.find_parent(headers) == Parent(Style.W3C, TRACE, NEW_SPAN, True)


def test_rewrite_new_trace_carries_the_decision_either_way():
    headers, span = hop([(b"host", b"api")], draw=0.5, rate=0.01)
    assert span.sampled is False and headers[-1] == (b"traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-00")
    parent = tc.find_parent(headers)
    next_span = tc.decide(parent, 0.0, 1.0, NEW_TRACE, bytes.fromhex("3333333333333333"))
    assert next_span == Span(NEW_TRACE, bytes.fromhex("3333333333333333"), NEW_SPAN, False)  # it follows


def test_rewrite_b3_in_its_own_form():
    multi, _ = hop([(b"x-b3-traceid", TRACE.hex().encode()), (b"x-b3-spanid", PARENT.hex().encode()),
                    (b"x-b3-sampled", b"1")])
    assert dict(multi) == {b"x-b3-traceid": TRACE.hex().encode(), b"x-b3-spanid": NEW_SPAN.hex().encode(),
                           b"x-b3-sampled": b"1", b"x-b3-parentspanid": PARENT.hex().encode()}
    single, _ = hop([(b"b3", b"a3ce929d0e0e4736-00f067aa0ba902b7-1-0000000000000009")])
    assert single == [(b"b3", b"a3ce929d0e0e4736-2222222222222222-1-00f067aa0ba902b7")]  # 64-bit id stays 64-bit
    only_decision, span = hop([(b"b3", b"1")])
    assert span.trace_id == NEW_TRACE and only_decision[0] == (b"b3", b"1") and only_decision[1][0] == b"traceparent"
    undecided, span = hop([(b"x-b3-traceid", TRACE.hex().encode()), (b"x-b3-spanid", PARENT.hex().encode())],
                          draw=0.9, rate=0.5)
    assert span.sampled is False and dict(undecided)[b"x-b3-sampled"] == b"0"  # our decision, written on
    single, _ = hop([(b"b3", b"a3ce929d0e0e4736-00f067aa0ba902b7")], draw=0.9, rate=0.5)
    assert single == [(b"b3", b"a3ce929d0e0e4736-2222222222222222-0-00f067aa0ba902b7")]


def test_an_unsampled_parent_is_carried_on_unsampled():
    headers, span = hop([(b"traceparent", W3C[:-2] + b"00"), (b"tracestate", b"a=b")])
    assert span == Span(TRACE, NEW_SPAN, PARENT, False)
    assert headers == [(b"traceparent", b"00-" + TRACE.hex().encode() + b"-2222222222222222-00"),
                       (b"tracestate", b"a=b")]
    assert hop([(b"b3", b"0")]) == ([(b"b3", b"0")], None)  # "do not sample" alone: nothing to carry
