"""Access logs: one line per HTTP request, for the pods and Services that ask for it with the
annotation `config.nodeagent.io/access-log: apache|json` (Linkerd's config.linkerd.io/access-log,
with its two formats). A pod's annotation logs the requests it sends (outbound) and receives
(inbound); a Service's logs the requests sent to it. The agent's `--access-log` says where the
lines go: `stderr` or a file (appended to).

What a line may show follows the tap's rule (tap.py): the path without its query or fragment,
the authority without userinfo, the user agent, never another header or a body; long fields
are cut. A line is written when the response is counted (the metrics' moment: HTTP/1 at its
head, HTTP/2 at its end); `total_ns` is the time from the request's head to that moment.

Bounded and off the data path: the proxy only appends a small record to a queue of at most
QUEUE_LINES; a thread formats and writes them, a batch per write. When the queue is full (the
disk or the reader of stderr is slower than the traffic) a line is dropped and counted
(`access_log_dropped_total`), never waited for. A pod holds at most half of the queue
(queue_share.py): a pod logging faster than the writer drops its own lines, not its neighbours'.
"""

import collections
import enum
import logging
import os
import threading
import time
from json.encoder import encode_basestring
from typing import NamedTuple

from nodeagent.proxy.queue_share import QueueShares
from nodeagent.proxy.tap import MAX_FIELD_CHARS, shown_authority, shown_path

ANNOTATION = "config.nodeagent.io/access-log"
STDERR = "stderr"
QUEUE_LINES = 4096  # each record holds at most ~3 cut fields of MAX_FIELD_CHARS: ~1 KiB; ~4 MiB in all
POD_SHARE = 2  # a pod may hold 1/POD_SHARE of the queue
POD_FLOOR = 32  # and may always queue this many, even past the queue's bound (queue_share.py)
FLUSH_S = 0.1  # how long a line may wait in the queue
MAX_URL_BYTES = 4 * MAX_FIELD_CHARS  # of a request target kept for the line (the query is cut later)
ERROR_LOG_EVERY_S = 10.0  # a failing destination is logged at most this often (from the writer's thread)

log = logging.getLogger("nodeagent.proxy")


class Format(enum.Enum):
    APACHE = "apache"
    JSON = "json"


def format_of(annotations: dict) -> tuple[Format | None, str | None]:
    """The format an object's annotations ask for (None: no access log), and an error for a
    value that is not a format (then none: a typo never floods a log)."""
    value = annotations.get(ANNOTATION)
    if value is None:
        return None, None
    try:
        return Format(value.strip().lower()), None
    except ValueError:
        return None, f"{ANNOTATION}: {value!r} is not one of {', '.join(f.value for f in Format)}"


class Entry(NamedTuple):
    """What the data path hands over: raw and cheap to take; formatted by the writer."""

    format: Format
    time: float  # wall clock, when the response was counted
    direction: str
    namespace: str
    pod: str
    client_addr: str
    client_id: str
    destination: str
    authority: bytes
    method: str
    url: bytes
    version: str
    status: int
    total_s: float
    trace_id: bytes | None
    user_agent: bytes
    tls: bool


def _cut(value: bytes) -> str:
    text = value.decode("latin-1")
    return text if len(text) <= MAX_FIELD_CHARS else text[:MAX_FIELD_CHARS - 1] + "…"


_APACHE_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7f)} | {ord('"'): '\\"', ord("\\"): "\\\\"}


def _apache(text: str) -> str:
    """A field of an apache line: control characters, quotes and backslashes escaped (a client
    cannot start a line of its own or end a quoted field)."""
    return text.translate(_APACHE_ESCAPES)


_second_text: tuple[int, str] = (-1, "")  # the last whole second formatted (the writer's thread only)


def _timestamp(wall: float) -> str:
    """RFC 3339 in UTC with microseconds; the date and time of day formatted once per second."""
    global _second_text
    second = int(wall)
    if _second_text[0] != second:
        _second_text = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{_second_text[1]}.{int((wall - second) * 1e6):06d}Z"


def _json(text: str) -> str:
    return encode_basestring(text)  # quoted and escaped (C); non-ASCII kept, as ensure_ascii=False


def line(entry: Entry) -> str:
    """One access log line, without its newline."""
    path = shown_path(entry.url)
    authority = shown_authority(entry.authority)
    version = f"HTTP/{entry.version}"
    if entry.format is Format.APACHE:
        # Linkerd's apache format: client address, client identity, -, [time], "request", status.
        uri = _apache(f"http://{authority}{path}" if authority else path)
        return (f'{entry.client_addr} {entry.client_id or "-"} - [{_timestamp(entry.time)}] '
                f'"{_apache(entry.method)} {uri} {version}" {entry.status}')
    # Assembled by hand (the same as json.dumps of the dict, keys in this order): a third of its cost.
    return (f'{{"client.addr":{_json(entry.client_addr)},"client.id":{_json(entry.client_id or "-")},'
            f'"host":{_json(authority)},"method":{_json(entry.method)},"uri":{_json(path)},'
            f'"version":{_json(version)},"status":{int(entry.status)},"timestamp":"{_timestamp(entry.time)}",'
            f'"total_ns":{round(entry.total_s * 1e9)},'
            f'"trace_id":"{entry.trace_id.hex() if entry.trace_id else ""}",'
            f'"user_agent":{_json(_cut(entry.user_agent))},"direction":{_json(entry.direction)},'
            f'"namespace":{_json(entry.namespace)},"pod":{_json(entry.pod)},'
            f'"destination":{_json(entry.destination)},"tls":{"true" if entry.tls else "false"}}}')


def open_destination(destination: str) -> int:
    """A file descriptor to write lines to: stderr's, or the file's (created, appended to: a
    line is one write of its own batch, so processes sharing the file never interleave mid-line)."""
    if destination == STDERR:
        return 2
    return os.open(destination, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)


class AccessLog:
    """The process's writer: `record` (on the data path) queues; a thread writes. Started at
    the first record, so a node with no annotated pod runs no thread."""

    def __init__(self, destination: str, on_drop):
        self.destination = destination
        self.on_drop = on_drop  # lines dropped: called with their number (from either thread)
        self.entries: collections.deque[Entry] = collections.deque()  # appends and pops are thread-safe
        self.shares = QueueShares(QUEUE_LINES, QUEUE_LINES // POD_SHARE, POD_FLOOR)  # bounds `entries`, per pod and in all
        self.dropped = 0
        self.written = 0
        self._fd: int | None = None
        self._opened: str | None = None  # the destination `_fd` was opened for (the writer thread's)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._error_logged_at = -ERROR_LOG_EVERY_S

    def record(self, entry: Entry) -> None:
        if not self.shares.admit((entry.namespace, entry.pod)):
            self.dropped += 1
            self.on_drop(1)
            return
        self.entries.append(entry)
        if self._thread is None:
            self._start()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()

    def retarget(self, destination: str) -> None:
        """Lines written from now on go to `destination` (the settings changed live): the writer
        opens it before its next write, and closes the old one."""
        self.destination = destination

    def _open(self) -> None:
        destination = self.destination
        try:
            fd = open_destination(destination)
        except OSError as e:
            fd = None
            self._error(f"cannot open {destination}: {e}")
        old, self._fd, self._opened = self._fd, fd, destination
        if old is not None and old != 2:
            os.close(old)

    def _run(self) -> None:
        self._open()
        while not self._stop.wait(FLUSH_S):
            self._flush()
        self._flush()

    def _flush(self) -> None:
        if self.destination != self._opened:
            self._open()
        lines, pods = [], []
        entries = self.entries
        while entries:
            entry = entries.popleft()
            pods.append((entry.namespace, entry.pod))
            lines.append(line(entry))
        if not lines:
            return
        self.shares.taken(pods)
        if self._fd is None:  # the destination could not be opened: the lines are lost, and counted
            self.dropped += len(lines)
            self.on_drop(len(lines))
            return
        data = ("\n".join(lines) + "\n").encode()
        try:
            while data:
                data = data[os.write(self._fd, data):]
            self.written += len(lines)
        except OSError as e:
            self.dropped += len(lines)
            self.on_drop(len(lines))
            self._error(f"writing to {self.destination}: {e}")

    def _error(self, message: str) -> None:
        """Logged from the writer's thread, so not through the (loop-side) ProblemLog: at most
        once per ERROR_LOG_EVERY_S; the lines lost are in access_log_dropped_total."""
        now = time.monotonic()
        if now - self._error_logged_at >= ERROR_LOG_EVERY_S:
            self._error_logged_at = now
            log.warning("access log: %s (lines are dropped and counted)", message)

    def close(self, timeout_s: float = 2.0) -> None:
        """Write what is queued, then stop (bounded: a writer stuck on a full pipe is left)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                return
        if self._fd is not None and self._fd != 2:
            os.close(self._fd)
            self._fd = None
