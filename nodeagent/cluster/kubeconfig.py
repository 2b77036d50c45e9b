"""Where the API is and who we are to it: in-cluster configuration or a kubeconfig file.

Credentials are read when they are used, not once: the projected ServiceAccount token is
rotated by the kubelet (bound tokens live about an hour), so its file is read again every
TOKEN_REREAD_S and after any 401, as client-go does. A kubeconfig user may be a bearer
token, a tokenFile (relative paths are relative to the kubeconfig), a client certificate, or
an exec plugin (client.authentication.k8s.io: EKS, GKE, AKS), whose ExecCredential is kept
until its expirationTimestamp and fetched again after a 401. A server URL may carry a path
prefix (https://host/k8s/clusters/c-1): every request goes below it.
"""

import base64
import datetime
import json
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TOKEN_REREAD_S = 60.0
EXEC_TIMEOUT_S = 30.0
EXEC_EXPIRY_MARGIN_S = 30.0


class ConfigError(RuntimeError):
    pass


@dataclass(frozen=True)
class ExecPlugin:
    """A kubeconfig user's `exec` section."""

    command: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    api_version: str = "client.authentication.k8s.io/v1"
    cluster: dict | None = field(default=None, hash=False)  # given to the plugin if provideClusterInfo

    def run(self) -> dict:
        """The ExecCredential's status: token or clientCertificateData/clientKeyData, expiry."""
        info = {"apiVersion": self.api_version, "kind": "ExecCredential", "spec": {"interactive": False}}
        if self.cluster is not None:
            info["spec"]["cluster"] = self.cluster
        env = {**os.environ, **dict(self.env), "KUBERNETES_EXEC_INFO": json.dumps(info)}
        try:
            done = subprocess.run([self.command, *self.args], env=env, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=EXEC_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ConfigError(f"exec credential plugin {self.command}: {e}") from e
        if done.returncode != 0:
            raise ConfigError(f"exec credential plugin {self.command} exited with {done.returncode}: "
                              f"{done.stderr.strip()[:300]}")
        try:
            status = json.loads(done.stdout)["status"]
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"exec credential plugin {self.command}: not an ExecCredential: {e!r}") from e
        if not status.get("token") and not status.get("clientCertificateData"):
            raise ConfigError(f"exec credential plugin {self.command}: neither a token nor a certificate")
        return status


@dataclass(frozen=True)
class Credential:
    token: str | None = None
    client_cert_pem: str | None = None
    client_key_pem: str | None = None
    expires: float | None = None  # time.time() after which it must be fetched again


@dataclass(frozen=True)
class KubeConfig:
    server: str  # https://host:port[/prefix] (http:// only for test doubles)
    ca_pem: str | None = None
    token: str | None = None
    client_cert_pem: str | None = None
    client_key_pem: str | None = None
    token_file: Path | None = None  # read again as it rotates
    exec_plugin: ExecPlugin | None = None

    @classmethod
    def in_cluster(cls, env: dict = os.environ, directory: Path = SERVICE_ACCOUNT_DIR) -> "KubeConfig":
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise ConfigError("not in a cluster: KUBERNETES_SERVICE_HOST is not set")
        host = f"[{host}]" if ":" in host else host
        token_file = directory / "token"
        return cls(f"https://{host}:{port}", (directory / "ca.crt").read_text(),
                   token_file.read_text().strip(), token_file=token_file)

    @classmethod
    def from_kubeconfig(cls, path: Path, context: str | None = None) -> "KubeConfig":
        config = yaml.safe_load(path.read_text()) or {}
        name = context or config.get("current-context")
        ctx = next((c["context"] for c in config.get("contexts") or [] if c["name"] == name), None)
        if ctx is None:
            raise ConfigError(f"no context {name!r} in {path}")
        cluster = next((c["cluster"] for c in config.get("clusters") or [] if c["name"] == ctx["cluster"]), None)
        if cluster is None:
            raise ConfigError(f"no cluster {ctx['cluster']!r} in {path}")
        user = next((u["user"] for u in config.get("users") or [] if u["name"] == ctx.get("user")), None) or {}
        here = path.parent

        def data(section: dict, key: str) -> str | None:
            if section.get(f"{key}-data"):
                return base64.b64decode(section[f"{key}-data"]).decode()
            if section.get(key):
                return (here / section[key]).read_text()
            return None

        token_file = here / user["tokenFile"] if user.get("tokenFile") else None
        token = user.get("token") or (token_file.read_text().strip() if token_file else None)
        plugin = None
        if user.get("exec"):
            section = user["exec"]
            command = section["command"]
            if "/" in command and not command.startswith("/"):
                command = str(here / command)  # as client-go: relative to the kubeconfig
            plugin = ExecPlugin(command, tuple(section.get("args") or ()),
                                tuple((e["name"], e["value"]) for e in section.get("env") or []),
                                section.get("apiVersion", ExecPlugin.api_version),
                                {"server": cluster["server"],
                                 **({"certificate-authority-data": cluster["certificate-authority-data"]}
                                    if cluster.get("certificate-authority-data") else {})}
                                if section.get("provideClusterInfo") else None)
        return cls(cluster["server"], data(cluster, "certificate-authority"), token,
                   data(user, "client-certificate"), data(user, "client-key"), token_file, plugin)


class Credentials:
    """The credential to send now, fetched again when it expires or the server said 401."""

    def __init__(self, config: KubeConfig, clock=time.time):
        self.config = config
        self.clock = clock
        self._lock = threading.Lock()
        self._current: Credential | None = None
        self._read_at = 0.0

    def current(self) -> Credential:
        with self._lock:
            now = self.clock()
            if self._current is None or self._stale(now):
                self._current = self._fetch()
                self._read_at = now
            return self._current

    def invalidate(self) -> None:
        """The server refused the credential: the next request fetches a new one."""
        with self._lock:
            self._current = None

    def _stale(self, now: float) -> bool:
        if self.config.exec_plugin:
            expires = self._current.expires
            return expires is not None and now > expires - EXEC_EXPIRY_MARGIN_S
        return self.config.token_file is not None and now - self._read_at >= TOKEN_REREAD_S

    def _fetch(self) -> Credential:
        c = self.config
        if c.exec_plugin:
            status = c.exec_plugin.run()
            expires = None
            if status.get("expirationTimestamp"):
                stamp = status["expirationTimestamp"].replace("Z", "+00:00")
                expires = datetime.datetime.fromisoformat(stamp).timestamp()
            return Credential(status.get("token"), status.get("clientCertificateData"),
                              status.get("clientKeyData"), expires)
        token = c.token
        if c.token_file is not None:
            try:
                token = c.token_file.read_text().strip()
            except OSError:
                if self._current is not None:  # keep the one we have; it may still be valid
                    return self._current
                raise
        return Credential(token, c.client_cert_pem, c.client_key_pem)
