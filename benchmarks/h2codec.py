"""What one HTTP/2 request costs the proxy's codec, with nothing else in the way.

Per request the proxy plays both roles once: server on the client's connection (decode
the request's headers, encode the response's) and client on the endpoint's connection
(encode the request's headers, decode the response's). This runs that pair in memory, a
client session and a server session handing each other bytes, for:

- `h2`, the Python HTTP/2 stack the proxy uses (with the proxy's settings: header encoding
  off, the server validating what arrives, the client not);
- libnghttp2 (C; Debian's libnghttp2-14, which curl already pulls in) through ctypes, by the
  proxy's own binding (`nodeagent/proxy/nghttp2.py`: header lists, bodies from data
  providers, windows acknowledged by hand), which the proxy uses since it left h2.

    python -m benchmarks.h2codec [--requests N]

It measures the codec's share only: no sockets, no event loop, no TLS; in CPU time of this
process (time.process_time), so that other work on a shared machine does not count.
"""

import argparse
import statistics
import time

import h2.config
import h2.connection
import h2.events

REQUEST = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http"), (b":authority", b"svc.default"),
           (b"user-agent", b"h2load nghttp2/1.52.0"), (b"accept", b"*/*")]
RESPONSE = [(b":status", b"200"), (b"content-type", b"text/plain"), (b"x-pod", b"http-n0-0")]
BODY = b"ok\n"


def h2_per_request(requests: int) -> float:
    server = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=False, header_encoding=None, validate_outbound_headers=False,
        normalize_outbound_headers=False))
    client = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=True, header_encoding=None, validate_inbound_headers=False,
        normalize_inbound_headers=False, validate_outbound_headers=False, normalize_outbound_headers=False))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    got = 0
    started = time.process_time()
    for _ in range(requests):
        stream_id = client.get_next_available_stream_id()
        client.send_headers(stream_id, REQUEST, end_stream=True)
        for event in server.receive_data(client.data_to_send()):
            if isinstance(event, h2.events.RequestReceived):
                server.send_headers(event.stream_id, RESPONSE)
                server.send_data(event.stream_id, BODY, end_stream=True)
        for event in client.receive_data(server.data_to_send()):
            if isinstance(event, h2.events.DataReceived):
                client.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                got += 1
        server.receive_data(client.data_to_send())  # window updates
    elapsed = time.process_time() - started
    assert got == requests
    return elapsed / requests


# --- libnghttp2 through the proxy's own binding (nodeagent/proxy/nghttp2.py) ---

class _Side:
    """A handler that does what the proxy's does per request: header lists, bodies, ends."""

    def __init__(self):
        self.requests, self.done, self.session = [], 0, None

    def h2_headers(self, stream_id, headers, category, end_stream):
        if category == 0:  # a request
            self.requests.append(stream_id)
        elif end_stream:
            self.done += 1

    def h2_data(self, stream_id, data):
        self.session.consume(stream_id, len(data))

    def h2_end_stream(self, stream_id):
        pass

    def h2_reset(self, stream_id, code):
        pass

    def h2_closed(self, stream_id, code):
        pass

    def h2_goaway(self, last_stream_id, code):
        pass

    def h2_connection_error(self, code):
        raise RuntimeError(f"connection error {code}")

    def h2_invalid(self, stream_id, lib_error):
        pass

    def read_body(self, stream_id, length):
        return BODY, True, None


def nghttp2_per_request(requests: int) -> float:
    from nodeagent.proxy import nghttp2
    server, client = _Side(), _Side()
    server.session = nghttp2.Session(server, server=True, settings={}, connection_window=1 << 20)
    client.session = nghttp2.Session(client, server=False, settings={nghttp2.SETTINGS_ENABLE_PUSH: 0},
                                     connection_window=1 << 20)
    finished = [0]
    client.h2_end_stream = lambda stream_id: finished.__setitem__(0, finished[0] + 1)

    def pump(sender, receiver):
        while data := sender.session.send():
            receiver.session.receive(data)

    pump(client, server)
    pump(server, client)
    pump(client, server)
    started = time.process_time()
    for _ in range(requests):
        client.session.submit_request(REQUEST, body=False)
        pump(client, server)
        while server.requests:
            server.session.submit_response(server.requests.pop(), RESPONSE, body=True)
        pump(server, client)
        pump(client, server)
    elapsed = time.process_time() - started
    server.session.close()
    client.session.close()
    assert finished[0] == requests, finished[0]
    return elapsed / requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    measures = (("h2 (Python)", h2_per_request), ("libnghttp2 via ctypes", nghttp2_per_request))
    times = {name: [] for name, _ in measures}
    for _ in range(args.runs):  # interleaved, so that a busy moment hits both
        for name, measure in measures:
            times[name].append(measure(args.requests) * 1e6)
    for name, values in times.items():
        print(f"{name:24} {statistics.median(values):7.1f} us per request (both roles; median of {args.runs} x "
              f"{args.requests}, min {min(values):.1f}, max {max(values):.1f})")


if __name__ == "__main__":
    main()
