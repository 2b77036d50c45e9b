"""The ports the agent owns inside every enrolled pod's network namespace. The data path
steers to them, the proxy listens on them, and neither ever takes one as a destination."""

OUTBOUND_PORT = 15001  # 127.0.0.1: connect4 sends the pod's TCP connects here
INBOUND_PORT = 15006  # 127.0.0.1: sk_lookup steers plaintext connections to the pod here
MESH_PORT = 4143  # the pod's IP: mutual TLS from other proxies (Linkerd's inbound port)
PROXY_PORTS = frozenset({OUTBOUND_PORT, INBOUND_PORT, MESH_PORT})
