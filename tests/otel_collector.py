"""A real OpenTelemetry Collector for tests (built by `make otelcol` into .tools/otelcol/):
its OTLP/HTTP receiver on a loopback port, its debug exporter printing every span it receives,
which `spans()` reads back as dicts. Stopped (and its files removed) on exit."""

import re
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BINARY = Path(__file__).resolve().parent.parent / ".tools" / "otelcol" / "otelcol"

CONFIG = """
receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:{port}
exporters:
  debug:
    verbosity: {verbosity}
service:
  telemetry:
    metrics:
      level: none
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [debug]
"""

_FIELD = re.compile(r"^\s+(Trace ID|Parent ID|ID|Name|Kind|Status code)\s*: ?(.*)$")
_ATTRIBUTE = re.compile(r"^\s+-> ([\w.]+): (Str|Int|Bool)\((.*)\)$")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Collector:
    def __init__(self, verbosity: str = "detailed"):
        """`detailed` prints every span (what `spans()` reads); `basic` only counts batches (for
        benchmarks, where printing would take the machine's CPU from what is measured)."""
        if not BINARY.exists():
            raise RuntimeError(f"{BINARY} is missing: run `make otelcol` (the Makefile's test targets do)")
        self.port = free_port()
        self.dir = tempfile.TemporaryDirectory(prefix="otelcol-")
        self.config = Path(self.dir.name) / "config.yaml"
        self.config.write_text(CONFIG.format(port=self.port, verbosity=verbosity))
        self.output = Path(self.dir.name) / "output.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Collector":
        with self.output.open("wb") as out:
            self.process = subprocess.Popen([str(BINARY), f"--config={self.config}"], stdout=out, stderr=out,
                                            stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while "Everything is ready" not in self.output.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"the collector did not start: {self.output.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.dir.cleanup()

    def spans(self) -> list[dict]:
        """Every span printed so far: its fields, and `attributes` as Python values."""
        spans, current = [], None
        for line in self.output.read_text(errors="replace").splitlines():
            if re.match(r"^Span #\d+", line):
                current = {"attributes": {}}
                spans.append(current)
                continue
            if current is None:
                continue
            field = _FIELD.match(line)
            if field and field[1] not in current:
                current[field[1]] = field[2].strip()
                continue
            attribute = _ATTRIBUTE.match(line)
            if attribute:
                kind, text = attribute[2], attribute[3]
                current["attributes"][attribute[1]] = (int(text) if kind == "Int" else text == "true" if kind == "Bool"
                                                       else text)
            elif line.startswith("\t{") or line.startswith("ResourceSpans"):
                current = None
        return spans

    def wait_for_spans(self, count: int, timeout_s: float = 20.0) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while len(found := self.spans()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(found)} spans reached the collector, not {count}: {found}")
            time.sleep(0.1)
        return found
