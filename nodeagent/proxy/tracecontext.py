"""Trace context of one request at one proxy hop: read from its headers, decided, written back.
Pure: headers and numbers in, a decision and header edits out (no I/O, no clock, no randomness
of its own: ids and the sampling draw are given).

What is read, in this order (the first found wins):
- W3C Trace Context: `traceparent` (`00-<trace id>-<parent id>-<flags>`, lowercase hex; a later
  version is read by its first four fields, as the spec asks); `tracestate` is never touched, so
  it travels on.
- B3, multi-header (`x-b3-traceid`, `x-b3-spanid`, `x-b3-sampled`, `x-b3-flags`) or single
  (`b3: <trace>-<span>[-<sampling>[-<parent>]]`, or just a sampling state).
A malformed header counts as none.

What is decided (`decide`): this hop is a span, a child of the parent, and the request goes on
with this hop's span id as its parent id (in the parent's own format), as W3C asks of every
participant; only a sampled span is recorded (exported).
- a parent's sampled flag is followed: whoever decided for the trace decided for this hop;
- a parent that left the decision open (B3 without a sampling state): sampled with the
  probability `rate` (the draw is given), and the decision is written on;
- no parent: a new trace, sampled with the probability `rate`; either way the request goes on
  with a new `traceparent` carrying the decision, so every later hop (this request's inbound
  side included) follows it instead of drawing again;
- B3 carrying a decision alone: a new trace with that decision, except "do not sample", which
  passes untouched (there is no id to carry).
"""

import enum
from typing import NamedTuple

TRACEPARENT = b"traceparent"
B3_SINGLE = b"b3"
B3_TRACE_ID, B3_SPAN_ID, B3_PARENT_ID = b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid"
B3_SAMPLED, B3_FLAGS = b"x-b3-sampled", b"x-b3-flags"
_READ = frozenset({TRACEPARENT, B3_SINGLE, B3_TRACE_ID, B3_SPAN_ID, B3_SAMPLED, B3_FLAGS})
_HEX = frozenset(b"0123456789abcdef")


class Style(enum.Enum):
    """Where the parent came from, so the child is written back in the same form."""

    W3C = "w3c"
    B3_MULTI = "b3-multi"
    B3_SINGLE = "b3-single"
    NEW = "new"  # no parent: a trace this hop starts


class Parent(NamedTuple):  # a NamedTuple, not a frozen dataclass: made per request, at a fifth of the cost
    style: Style
    trace_id: bytes  # 16 bytes (a 64-bit B3 id is padded on the left with zeros)
    span_id: bytes | None  # 8 bytes; None: B3 carried a sampling state only
    sampled: bool | None  # None: the parent left the decision to us (B3 without a sampling state)


class Span(NamedTuple):
    """This hop's span: recorded (exported) only when `sampled`; always carried on."""

    trace_id: bytes
    span_id: bytes
    parent_id: bytes | None
    sampled: bool


def _hex_id(text: bytes, size: int) -> bytes | None:
    """`size` bytes from lowercase hex text of exactly 2 * size digits, not all zero (W3C and B3
    both say lowercase: anything else is not a valid id)."""
    text = text.strip()
    if len(text) != 2 * size or not _HEX.issuperset(text):
        return None
    value = bytes.fromhex(text.decode())
    return value if any(value) else None


def parse_traceparent(value: bytes) -> Parent | None:
    if len(value) == 55 and value[:3] == b"00-" and value[35:36] == b"-" and value[52:53] == b"-":
        # The usual form, lowercase version 00: read by position (a third of the general path's cost).
        try:
            trace_id, span_id, flags = bytes.fromhex(value[3:35].decode()), bytes.fromhex(value[36:52].decode()), \
                int(value[53:55], 16)
        except ValueError:
            return None
        if not any(trace_id) or not any(span_id) or not _HEX.issuperset(value[3:35] + value[36:52] + value[53:55]):
            return None
        return Parent(Style.W3C, trace_id, span_id, bool(flags & 1))
    parts = value.strip().split(b"-")
    if len(parts) < 4 or len(parts[0]) != 2 or not _HEX.issuperset(parts[0]):
        return None
    version = parts[0]
    if version == b"ff" or (version == b"00" and len(parts) != 4):
        return None
    trace_id, span_id, flags = _hex_id(parts[1], 16), _hex_id(parts[2], 8), parts[3]
    if trace_id is None or span_id is None or len(flags) != 2 or not _HEX.issuperset(flags):
        return None
    return Parent(Style.W3C, trace_id, span_id, bool(int(flags, 16) & 1))


def _b3_trace_id(text: bytes) -> bytes | None:
    text = text.strip()
    if len(text) == 16:
        text = b"0" * 16 + text
    return _hex_id(text, 16)


def _b3_sampled(text: bytes | None) -> bool | None:
    if text is None:
        return None
    text = text.strip().lower()
    if text in (b"1", b"true", b"d"):
        return True
    if text in (b"0", b"false"):
        return False
    return None


def parse_b3_single(value: bytes) -> Parent | None:
    parts = value.strip().split(b"-")
    if len(parts) == 1:  # a sampling state alone: "0", "1" or "d"
        sampled = _b3_sampled(parts[0])
        return None if sampled is None else Parent(Style.B3_SINGLE, b"", None, sampled)
    if len(parts) > 4:
        return None
    trace_id, span_id = _b3_trace_id(parts[0]), _hex_id(parts[1], 8)
    if trace_id is None or span_id is None:
        return None
    sampled = _b3_sampled(parts[2]) if len(parts) > 2 else None
    if len(parts) > 2 and sampled is None:
        return None
    return Parent(Style.B3_SINGLE, trace_id, span_id, sampled)


def parse_b3_multi(found: dict) -> Parent | None:
    sampled = True if found.get(B3_FLAGS, b"").strip() == b"1" else _b3_sampled(found.get(B3_SAMPLED))
    if B3_TRACE_ID not in found:
        return None if sampled is None else Parent(Style.B3_MULTI, b"", None, sampled)
    trace_id, span_id = _b3_trace_id(found[B3_TRACE_ID]), _hex_id(found.get(B3_SPAN_ID, b""), 8)
    if trace_id is None or span_id is None:
        return None
    return Parent(Style.B3_MULTI, trace_id, span_id, sampled)


def find_parent(headers) -> Parent | None:
    """The request's parent context, from (name, value) pairs (any case of names)."""
    found = {}
    for name, value in headers:
        lowered = name.lower()
        if lowered in _READ and lowered not in found:
            found[lowered] = value
    if not found:
        return None
    if TRACEPARENT in found:
        parent = parse_traceparent(found[TRACEPARENT])
        if parent is not None:
            return parent
    if B3_SINGLE in found:
        parent = parse_b3_single(found[B3_SINGLE])
        if parent is not None:
            return parent
    return parse_b3_multi(found)


def decide(parent: Parent | None, draw: float, rate: float, new_trace_id: bytes, new_span_id: bytes) -> Span | None:
    """This hop's span, or None when the request passes untouched (B3's "do not sample" with no
    ids). `draw` is uniform in [0, 1): a new trace is sampled when draw < rate; so is a parent
    that left the decision to us."""
    sampled = draw < rate if parent is None or parent.sampled is None else parent.sampled
    if parent is None or not parent.trace_id:
        if parent is not None and not sampled:
            return None
        return Span(new_trace_id, new_span_id, None, sampled)
    return Span(parent.trace_id, new_span_id, parent.span_id, sampled)


def traceparent(span: Span) -> bytes:
    return b"00-%s-%s-%s" % (span.trace_id.hex().encode(), span.span_id.hex().encode(),
                            b"01" if span.sampled else b"00")


def _b3_id(trace_id: bytes, original: bytes) -> bytes:
    """A trace id written back as long as it came (B3 allows 64-bit ids)."""
    text = trace_id.hex().encode()
    return text[16:] if len(original.strip()) == 16 else text


def rewrite(headers: list, parent: Parent | None, span: Span) -> None:
    """Edit `headers` (a list of (name, value) pairs) in place so that the request goes on as a
    child of `span`, in the parent's format; with no parent (or B3 carrying a decision only), a
    new `traceparent` is appended (and the B3 decision-only headers are left as they were)."""
    style = parent.style if parent is not None and parent.trace_id else Style.NEW
    if style is Style.NEW:
        headers.append((TRACEPARENT, traceparent(span)))
        return
    span_hex = span.span_id.hex().encode()
    parent_hex = span.parent_id.hex().encode() if span.parent_id else b""
    if style is Style.W3C:
        value = traceparent(span)
        _replace(headers, {TRACEPARENT: value})
    elif style is Style.B3_SINGLE:
        index = _index(headers, B3_SINGLE)
        original = headers[index][1].strip().split(b"-")
        fields = [_b3_id(span.trace_id, original[0]), span_hex]
        fields.append(original[2] if len(original) > 2 else b"1" if span.sampled else b"0")
        fields.append(parent_hex)
        headers[index] = (headers[index][0], b"-".join(fields))
    else:
        names = {B3_SPAN_ID: span_hex, B3_PARENT_ID: parent_hex}
        if parent.sampled is None:  # the decision was left to us: later hops follow ours
            names[B3_SAMPLED] = b"1" if span.sampled else b"0"
        missing = _replace(headers, names)
        headers.extend((name, names[name]) for name in missing)


def _index(headers: list, name: bytes) -> int:
    for i, (key, _) in enumerate(headers):
        if key.lower() == name:
            return i
    raise KeyError(name)


def _replace(headers: list, values: dict) -> list:
    """Set each of `values` on the first header of its name (removing later duplicates); the
    names that were not there."""
    seen = set()
    i = 0
    while i < len(headers):
        name = headers[i][0]
        lowered = name.lower()
        if lowered in values:
            if lowered in seen:
                del headers[i]
                continue
            seen.add(lowered)
            headers[i] = (name, values[lowered])
        i += 1
    return [name for name in values if name not in seen]
