"""Fuzzing the proxy's HTTP/2 codec binding: mutated frame sequences from a seed corpus of real
captures (tests/data/h2corpus/, recorded by tests/h2_corpus.py) through real nghttp2 sessions
inside the proxy's own connection class (`H2Peer`: both sides, bodies forwarded and echoed),
over an in-memory transport. A case fails if an exception escapes, if a session callback
raised (the binding logs it: a bug of ours), or if a session is left behind; the run fails if
the process's memory grows.

    python tests/h2_fuzz.py [--cases N] [--seed S]    # a longer run: --cases 1000000
    python tests/h2_fuzz.py --atheris -max_total_time=3600   # coverage-guided (pip install atheris)

tests/test_h2_fuzz.py runs a bounded number of cases in `make test`.
"""

import argparse
import asyncio
import logging
import pathlib
import random
import sys

CORPUS = pathlib.Path(__file__).parent / "data" / "h2corpus"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_TYPES = range(11)  # DATA .. ALTSVC, and unknown types beyond


def load_corpus() -> dict[str, list[bytes]]:
    """{'client': [what clients sent], 'server': [what servers sent]}."""
    corpus = {"client": [], "server": []}
    for path in sorted(CORPUS.iterdir()):
        corpus[path.suffix[1:]].append(path.read_bytes())
    return corpus


def split_frames(data: bytes) -> tuple[bytes, list[bytes]]:
    """(the preface if any, each frame); a cut frame at the end is kept as it is."""
    prefix = PREFACE if data.startswith(PREFACE) else b""
    at, frames = len(prefix), []
    while at < len(data):
        length = int.from_bytes(data[at:at + 3], "big") if at + 3 <= len(data) else 0
        frames.append(data[at:at + 9 + length])
        at += 9 + length
    return prefix, frames


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + (stream & 0x7FFFFFFF).to_bytes(4, "big") + payload


class Mutator:
    def __init__(self, rng: random.Random, corpus: list[bytes]):
        self.rng, self.seeds = rng, [split_frames(seed) for seed in corpus]

    def __call__(self) -> bytes:
        rng = self.rng
        prefix, frames = rng.choice(self.seeds)
        frames = list(frames)
        for _ in range(rng.randint(1, 6)):
            getattr(self, rng.choice(["flip", "field", "drop", "duplicate", "swap", "insert", "splice",
                                      "truncate", "repeat"]))(frames)
        return prefix + b"".join(frames)

    def _pick(self, frames) -> int:
        return self.rng.randrange(len(frames)) if frames else -1

    def flip(self, frames):
        i = self._pick(frames)
        if i >= 0 and frames[i]:
            data = bytearray(frames[i])
            for _ in range(self.rng.randint(1, 4)):
                data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
            frames[i] = bytes(data)

    def field(self, frames):
        """A header field set to a value chosen to hurt: length, type, flags or stream id."""
        i = self._pick(frames)
        if i < 0 or len(frames[i]) < 9:
            return
        data = bytearray(frames[i])
        which = self.rng.choice(["length", "type", "flags", "stream"])
        if which == "length":
            data[0:3] = self.rng.choice([0, 1, 8, 16384, 16385, 2 ** 24 - 1, len(data) + 7]).to_bytes(3, "big")
        elif which == "type":
            data[3] = self.rng.choice(FRAME_TYPES)
        elif which == "flags":
            data[4] = self.rng.randrange(256)
        else:
            data[5:9] = self.rng.choice([0, 1, 2, 3, 5, 2 ** 31 - 1, 2 ** 32 - 1]).to_bytes(4, "big")
        frames[i] = bytes(data)

    def drop(self, frames):
        if (i := self._pick(frames)) >= 0:
            del frames[i]

    def duplicate(self, frames):
        if (i := self._pick(frames)) >= 0:
            frames.insert(self.rng.randrange(len(frames) + 1), frames[i])

    def repeat(self, frames):
        if (i := self._pick(frames)) >= 0:
            frames[i:i + 1] = [frames[i]] * self.rng.randint(2, 200)

    def swap(self, frames):
        if len(frames) > 1:
            i, j = self.rng.sample(range(len(frames)), 2)
            frames[i], frames[j] = frames[j], frames[i]

    def insert(self, frames):
        rng = self.rng
        payload = rng.choice([b"", b"\x00" * 8, rng.randbytes(rng.randint(1, 64)), b"\x00\x04\x00\x00\x00\x00",
                              b"\x80\x00\x00\x01\x10", b"\x00\x00\x00\x08", b"\x82\x84\x86\x01\x04test"])
        frames.insert(rng.randrange(len(frames) + 1),
                      frame(rng.choice(FRAME_TYPES), rng.randrange(256), rng.choice([0, 1, 3, 5, 7]), payload))

    def splice(self, frames):
        _, other = self.rng.choice(self.seeds)
        if other:
            at = self.rng.randrange(len(frames) + 1)
            frames[at:at] = other[self.rng.randrange(len(other)):][:self.rng.randint(1, 8)]

    def truncate(self, frames):
        i = self._pick(frames)
        if i >= 0 and frames[i]:
            frames[i] = frames[i][:self.rng.randrange(len(frames[i]))]
            del frames[i + 1:]


class MemoryTransport(asyncio.Transport):
    """A transport that keeps nothing: what the proxy writes is counted, then dropped."""

    def __init__(self):
        super().__init__()
        self.written, self.closing, self.reading = 0, False, True

    def write(self, data):
        self.written += len(data)

    def writelines(self, chunks):
        for chunk in chunks:
            self.write(chunk)

    def get_write_buffer_size(self):
        return 0

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def pause_reading(self):
        self.reading = False

    def resume_reading(self):
        self.reading = True

    def is_reading(self):
        return self.reading

    def can_write_eof(self):
        return True

    def write_eof(self):
        self.closing = True

    def close(self):
        self.closing = True

    def abort(self):
        self.closing = True

    def is_closing(self):
        return self.closing

    def get_extra_info(self, name, default=None):
        return ("fuzz", 0) if name == "peername" else default


def peers():
    """The two sides of the proxy, as in production, with owners that pass bodies on."""
    from nodeagent.proxy.h2peer import H2Peer, StreamEnd
    from nodeagent.proxy.h2upstream import H2Upstream

    class Owner:
        """Echoes a request's body as its response, with trailers when asked (server side);
        takes a response's body nowhere but acknowledges it (client side)."""

        def on_response(self, end, headers, ended):
            end.incoming.attach(Sink(), end.id)

        def on_informational(self, end, headers):
            pass

        def on_reset(self, end, code):
            pass

    class Sink:
        """A destination that takes everything at once (so the source is acknowledged)."""

        closed = False

        def __init__(self):
            self.bodies = {}

        def want_body(self, stream_id):
            body = self.bodies.get(stream_id)
            while body is not None and body.read(16384)[0]:
                pass

    class EchoServer(H2Peer):
        def on_request(self, stream_id, headers, ended):
            end = StreamEnd(self, stream_id, Owner())
            self.register(end)
            trailers = any(name == b"te" for name, _ in headers)
            if self.send_headers(stream_id, [(b":status", b"200")], end_stream=False):
                end.incoming.attach(self, stream_id)
                if trailers:
                    end.incoming.trailers = [(b"x-fuzz", b"1")]

    class Client(H2Upstream):
        idle_s = 3600.0

        def start(self):
            super().start()
            owner = Owner()
            self.open_stream(owner, [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"),
                                     (b":authority", b"f")], end_stream=True)
            post = self.open_stream(owner, [(b":method", b"POST"), (b":path", b"/"), (b":scheme", b"http"),
                                            (b":authority", b"f")], end_stream=False)
            post.incoming.push(b"u" * 1000, 0)

    return EchoServer, Client


class Failures(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(self.format(record))


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


async def fuzz(cases: int, seed: int) -> dict:
    """Run `cases` mutated sequences, half against each side: what went wrong, and memory."""
    from nodeagent.proxy import nghttp2
    corpus = load_corpus()
    rng = random.Random(seed)
    mutators = {"client": Mutator(rng, corpus["client"]), "server": Mutator(rng, corpus["server"])}
    echo_server, client = peers()
    failures = Failures()
    logging.getLogger("nodeagent.proxy").addHandler(failures)
    logging.getLogger("nodeagent.proxy.h2peer").setLevel(logging.ERROR)  # flood warnings: expected
    escaped, rss = [], {}
    sessions_before = len(nghttp2._sessions)  # others' (another test's) are not this run's
    try:
        for case in range(cases):
            if case == cases // 2:
                rss["warm"] = rss_kib()
            side = "client" if case % 2 else "server"
            data = mutators[side]()
            peer = echo_server(256) if side == "client" else client()
            if case % 3 == 0:
                peer.budget = Unlimited()  # nghttp2 alone, as if our flood limits were not in front
            peer.connection_made(MemoryTransport()) if side == "client" else _start_client(peer)
            at = 0
            try:
                while at < len(data):
                    step = rng.choice([1, 9, 100, 4096, 65536, len(data)])
                    peer.data_received(data[at:at + step])
                    at += step
                    await asyncio.sleep(0)  # the flushes and callbacks the loop runs between reads
            except Exception as e:  # what must never happen: recorded with the input
                escaped.append((case, side, repr(e), data[:200]))
            peer.connection_lost(None)
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        rss["end"] = rss_kib()
        left = len(nghttp2._sessions) - sessions_before
    finally:
        logging.getLogger("nodeagent.proxy").removeHandler(failures)
    return {"escaped": escaped, "callback_errors": failures.records, "sessions_left": left,
            "rss_growth_kib": rss["end"] - rss.get("warm", rss["end"])}


class Unlimited:
    """In place of a connection's FrameBudget: no limit of ours."""

    streams = data_sent = 0

    def drained(self):
        pass

    def scan(self, data):
        return None


def _start_client(peer) -> None:
    transport = MemoryTransport()
    peer.connection_made(transport)
    peer.transport = transport
    peer.start()


def run_atheris(libfuzzer_args: list[str]) -> None:
    """Coverage-guided (libFuzzer through atheris; pip install atheris): the client side of the
    proxy, from a copy of the clients' captures (libFuzzer adds what it finds to that copy)."""
    import shutil
    import tempfile

    import atheris  # noqa: optional, for long runs
    with atheris.instrument_imports():  # coverage of the proxy's Python side (nghttp2 is not instrumented)
        echo_server, _ = peers()
    logging.getLogger("nodeagent.proxy.h2peer").setLevel(logging.ERROR)
    loop = asyncio.new_event_loop()
    work = pathlib.Path(tempfile.mkdtemp(prefix="h2fuzz-"))
    for path in CORPUS.glob("*.client"):
        shutil.copy(path, work)

    def one(data: bytes) -> None:
        async def case():
            peer = echo_server(256)
            peer.connection_made(MemoryTransport())
            peer.data_received(data)
            await asyncio.sleep(0)
            peer.connection_lost(None)
        loop.run_until_complete(case())
    print(f"corpus copy: {work}")
    atheris.Setup(sys.argv[:1] + libfuzzer_args + [str(work)], one)
    atheris.Fuzz()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--atheris", action="store_true")
    args, libfuzzer_args = parser.parse_known_args()
    sys.path.insert(0, str(pathlib.Path(__file__).parent.parent))
    if args.atheris:
        run_atheris(libfuzzer_args)
        return
    result = asyncio.run(fuzz(args.cases, args.seed))
    print(result if result["escaped"] or result["callback_errors"] else
          f"{args.cases} cases: nothing escaped, no callback failed, {result['sessions_left']} sessions left, "
          f"RSS grew {result['rss_growth_kib']} KiB after warm-up")
    sys.exit(1 if result["escaped"] or result["callback_errors"] or result["sessions_left"] else 0)


if __name__ == "__main__":
    main()
