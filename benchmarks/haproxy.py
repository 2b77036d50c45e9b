"""The HAProxy sidecar chain used as the C-proxy reference: a client-side
HAProxy in the client pod (plain in, mutual TLS out) and a server-side one in
the server pod (mutual TLS in, plain to the app), as a sidecar mesh built
from HAProxy would be. Certificates come from the same CA code as the mesh's."""

import datetime
from pathlib import Path

from nodeagent.identity import ca

HTTP_LOCAL, H2_LOCAL, BULK_LOCAL, DOWNLOAD_LOCAL = 7001, 7002, 7003, 7004  # client side, 127.0.0.1 in the client pod
HTTP_MESH, H2_MESH, BULK_MESH, DOWNLOAD_MESH = 7441, 7442, 7443, 7444  # server side, on the server pod's IP
APP_PORTS = {"http": 8090, "h2": 8091, "bulk": 9100, "download": 9101}
LOCAL_PORTS = {"http": HTTP_LOCAL, "h2": H2_LOCAL, "bulk": BULK_LOCAL, "download": DOWNLOAD_LOCAL}
MESH_PORTS = {"http": HTTP_MESH, "h2": H2_MESH, "bulk": BULK_MESH, "download": DOWNLOAD_MESH}
TCP_NAMES = ("bulk", "download")  # passed through as TCP
# HTTP/2 per request at both hops (h2c from the app, h2 over mutual TLS with ALPN between the
# sidecars, h2c to the app), as the mesh handles it per request: a like-for-like reference.


def _tcp_listen(name: str, bind: str, server: str) -> str:
    return f"listen {name}\n    mode tcp\n    bind {bind}\n    server s {server}\n"


def write_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """(CA bundle, client PEM, server PEM): each PEM holds certificate, chain and key, as HAProxy wants."""
    anchor = ca.Authority.new_anchor("cluster.local")
    issuer = anchor.new_issuer("cluster.local")
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in ("client", "server"):
        key = ca.new_key()
        cert = issuer.issue(f"spiffe://cluster.local/ns/default/sa/{name}", key.public_key(),
                            datetime.timedelta(hours=24))
        path = directory / f"{name}.pem"
        path.write_bytes(ca.certificate_pem(cert) + issuer.chain_pem() + ca.key_pem(key))
        path.chmod(0o600)
        paths.append(path)
    bundle = directory / "ca.pem"
    bundle.write_bytes(anchor.certificate_pem())
    return bundle, paths[0], paths[1]


def client_config(server_ip: str, bundle: Path, client_pem: Path) -> str:
    tls = f"ssl verify required ca-file {bundle} crt {client_pem}"  # identities are URIs: no hostname check
    return f"""global
    maxconn 2000
defaults
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend http_local
    mode http
    bind 127.0.0.1:{HTTP_LOCAL}
    default_backend http_mesh
backend http_mesh
    mode http
    http-reuse always
    server s {server_ip}:{HTTP_MESH} {tls} alpn http/1.1
frontend h2_local
    mode http
    bind 127.0.0.1:{H2_LOCAL} proto h2
    default_backend h2_mesh
backend h2_mesh
    mode http
    http-reuse always
    server s {server_ip}:{H2_MESH} {tls} alpn h2
""" + "".join(_tcp_listen(f"{name}_local", f"127.0.0.1:{LOCAL_PORTS[name]}", f"{server_ip}:{MESH_PORTS[name]} {tls}")
              for name in TCP_NAMES)


def server_config(server_ip: str, bundle: Path, server_pem: Path) -> str:
    tls = f"ssl crt {server_pem} ca-file {bundle} verify required"
    return f"""global
    maxconn 2000
defaults
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend http_mesh
    mode http
    bind {server_ip}:{HTTP_MESH} {tls} alpn http/1.1
    default_backend app
backend app
    mode http
    http-reuse always
    server app 127.0.0.1:{APP_PORTS['http']}
frontend h2_mesh
    mode http
    bind {server_ip}:{H2_MESH} {tls} alpn h2
    default_backend h2_app
backend h2_app
    mode http
    http-reuse always
    server app 127.0.0.1:{APP_PORTS['h2']} proto h2
""" + "".join(_tcp_listen(f"{name}_mesh", f"{server_ip}:{MESH_PORTS[name]} {tls}", f"127.0.0.1:{APP_PORTS[name]}")
              for name in TCP_NAMES)
