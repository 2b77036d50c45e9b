"""Access logs, unprivileged: which annotation asks for which format, what a line shows, and the
writer's bounds (a full queue drops and counts; a failing destination drops and counts)."""

import json
import os
import threading
import time

import pytest

from nodeagent.proxy import accesslog
from nodeagent.proxy.accesslog import ANNOTATION, AccessLog, Entry, Format, format_of, line


def entry(fmt=Format.JSON, **changes) -> Entry:
    values = dict(format=fmt, time=1700000000.25, direction="outbound", namespace="default", pod="web-0",
                  client_addr="10.244.0.10", client_id="spiffe://cluster.local/ns/default/sa/web",
                  destination="svc/default/api", authority=b"user:pw@api.default:8080", method="GET",
                  url=b"/items/7?token=secret#frag", version="1.1", status=200, total_s=0.0125,
                  trace_id=None, user_agent=b"curl/8.0", tls=True)
    values.update(changes)
    return Entry(**values)


@pytest.mark.parametrize("value, expected", [
    ("json", Format.JSON), ("apache", Format.APACHE), (" JSON ", Format.JSON), ("Apache", Format.APACHE),
])
def test_annotation_names_a_format(value, expected):
    assert format_of({ANNOTATION: value}) == (expected, None)


def test_no_annotation_no_log_and_a_bad_one_is_an_error_not_a_log():
    assert format_of({}) == (None, None)
    assert format_of({"config.linkerd.io/access-log": "json"}) == (None, None)
    found, error = format_of({ANNOTATION: "xml"})
    assert found is None and "'xml'" in error and "apache" in error and "json" in error


def test_json_line_shows_no_query_no_userinfo():
    shown = json.loads(line(entry()))
    assert shown == {
        "client.addr": "10.244.0.10", "client.id": "spiffe://cluster.local/ns/default/sa/web",
        "host": "api.default:8080", "method": "GET", "uri": "/items/7", "version": "HTTP/1.1", "status": 200,
        "timestamp": "2023-11-14T22:13:20.250000Z", "total_ns": 12500000, "trace_id": "",
        "user_agent": "curl/8.0", "direction": "outbound", "namespace": "default", "pod": "web-0",
        "destination": "svc/default/api", "tls": True}


def test_apache_line_is_linkerds_layout():
    assert line(entry(Format.APACHE, client_id="", version="2", status=503)) == (
        '10.244.0.10 - - [2023-11-14T22:13:20.250000Z] "GET http://api.default:8080/items/7 HTTP/2" 503')


def test_long_and_odd_fields_are_cut_and_escaped():
    shown = json.loads(line(entry(url=b"/" + b"a" * 5000, user_agent=b'x"\n' * 400, trace_id=b"\x01" * 16)))
    assert len(shown["uri"]) == accesslog.MAX_FIELD_CHARS and shown["uri"].endswith("…")
    assert len(shown["user_agent"]) == accesslog.MAX_FIELD_CHARS
    assert shown["trace_id"] == "01" * 16
    apache = line(entry(Format.APACHE, url=b'/a\nb"c\\'))
    assert "\n" not in apache and '/a\\x0ab\\"c\\\\ HTTP/1.1"' in apache


def test_writer_appends_lines_to_a_file_off_the_callers_thread(tmp_path):
    path = tmp_path / "access.log"
    dropped = []
    writer = AccessLog(str(path), dropped.append)
    callers = {threading.get_ident()}
    for status in (200, 404, 503):
        writer.record(entry(status=status))
    writer.close()
    statuses = [json.loads(text)["status"] for text in path.read_text().splitlines()]
    assert statuses == [200, 404, 503] and dropped == [] and writer.written == 3
    assert writer._thread is not None and writer._thread.ident not in callers


def stuck_writer(monkeypatch, queue_lines: int, floor: int | None = None):
    """An AccessLog writing into a pipe nobody reads yet (its writes block once the pipe is
    full): (the writer, the list its drops are reported to, the pipe's read end)."""
    monkeypatch.setattr(accesslog, "QUEUE_LINES", queue_lines)
    if floor is not None:
        monkeypatch.setattr(accesslog, "POD_FLOOR", floor)
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, True)
    monkeypatch.setattr(accesslog, "open_destination", lambda destination: write_end)
    dropped = []
    return AccessLog("pipe", dropped.append), dropped, read_end


def test_a_full_queue_drops_and_counts_without_waiting(tmp_path, monkeypatch):
    """The writer is stuck (its destination's reader is not reading): records still return at
    once, beyond QUEUE_LINES they are dropped and counted."""
    writer, dropped, read_end = stuck_writer(monkeypatch, queue_lines=50, floor=4)
    big = b"/" + b"x" * 4000
    try:
        for _ in range(5000):  # far more than the pipe's 64 KiB and the queue take: never blocks
            writer.record(entry(url=big, user_agent=b"u" * 1000))
        assert sum(dropped) == writer.dropped > 4000
    finally:
        os.close(read_end)  # the writer's next write fails (EPIPE): its batch is dropped, counted
        writer.close(timeout_s=5)  # closes write_end
    assert not writer._thread.is_alive()
    assert writer.dropped == sum(dropped) and writer.written + writer.dropped == 5000


def test_a_destination_that_cannot_be_opened_counts_its_lines(tmp_path):
    dropped = []
    writer = AccessLog(str(tmp_path / "missing-dir" / "access.log"), dropped.append)
    writer.record(entry())
    writer.record(entry())
    writer.close()
    assert sum(dropped) == 2 and writer.written == 0


def test_a_pod_flooding_a_stuck_writer_leaves_room_for_the_others(tmp_path, monkeypatch):
    """The writer is stuck on a full pipe while one pod floods: that pod stops at its half of
    the queue, another pod's lines are all queued, and written once the reader reads again."""
    writer, dropped, read_end = stuck_writer(monkeypatch, queue_lines=400)
    big = b"/" + b"x" * 4000
    read = []
    try:
        for _ in range(3000):  # fills the pipe: the writer's thread blocks in write
            writer.record(entry(pod="flood-0", url=big, user_agent=b"u" * 1000))
        for status in range(200, 250):
            writer.record(entry(pod="quiet-0", status=status))
        assert writer.shares.held(("default", "quiet-0")) == 50
        assert writer.shares.held(("default", "flood-0")) <= 200
        reader = threading.Thread(target=lambda: read.append(_read_all(read_end)))
        reader.start()
    finally:
        writer.close(timeout_s=10)  # closes write_end: the reader sees the end
    reader.join(10)
    quiet = [json.loads(text)["status"] for text in read[0].decode().splitlines() if '"pod":"quiet-0"' in text]
    assert quiet == list(range(200, 250))
    assert sum(dropped) == writer.dropped and writer.dropped + writer.written == 3050


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def test_a_new_destination_takes_the_lines_written_after_it_and_the_old_file_is_closed(tmp_path):
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    writer = AccessLog(str(first), [].append)
    writer.record(entry(status=200))
    deadline = time.monotonic() + 5
    while writer.written < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    old_fd = writer._fd
    writer.retarget(str(second))
    writer.record(entry(status=404))
    writer.close()
    assert [json.loads(text)["status"] for text in first.read_text().splitlines()] == [200]
    assert [json.loads(text)["status"] for text in second.read_text().splitlines()] == [404]
    assert not os.path.exists(f"/proc/self/fd/{old_fd}") or os.readlink(f"/proc/self/fd/{old_fd}") != str(first)
