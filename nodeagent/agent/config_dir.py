"""The cluster settings' directory (`--config-dir`: the ConfigMap mounted as a volume), watched.

The kubelet writes a mounted ConfigMap as one file per key in a timestamped directory and
swaps the `..data` symlink to it, so a new generation appears at once, within about a minute
of the ConfigMap's change (its sync period plus its cache). Every key is read from the
generation `..data` points to when the read starts, so a read never mixes two generations; a
generation removed while it was read is read again at the next check. A directory without
`..data` (written by hand, or the lab's before its first change) is read as it is.

Why a mounted volume and not an API watch of the ConfigMap: the files are read the same way in
the lab and on a cluster (the lab writes them as the kubelet does), they need no RBAC rule, no
reflector and no namespace or name given to the agent, and the agent starts from them before it
talks to the API (the mesh label picks what its cluster view watches). The cost is the
kubelet's delay of up to a minute or so; settings are not changed often.
"""

import hashlib
import logging
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from nodeagent import live_settings, settings
from nodeagent.settings import AgentSettings, SettingsError

log = logging.getLogger("nodeagent.agent")
CHECK_S = 2.0  # how often the directory is read
DATA_LINK = "..data"
MAX_KEYS = 64  # a ConfigMap holds at most 1 MiB; the settings are about twenty short values
MAX_VALUE_BYTES = 4096


class ConfigDirError(ValueError):
    pass


def read_texts(directory: Path) -> dict[str, str]:
    """key -> text of one generation of the directory. OSError if it cannot be read now
    (a generation swapped away mid-read), ConfigDirError if it holds more than a ConfigMap of
    settings could."""
    link = directory / DATA_LINK
    root = directory / link.readlink() if link.is_symlink() else directory
    names = sorted(entry.name for entry in root.iterdir() if not entry.name.startswith(".") and entry.is_file())
    if len(names) > MAX_KEYS:
        raise ConfigDirError(f"{directory}: {len(names)} keys, more than the {MAX_KEYS} a settings ConfigMap has")
    texts = {}
    for name in names:
        with open(root / name, "rb") as file:
            data = file.read(MAX_VALUE_BYTES + 1)
        if len(data) > MAX_VALUE_BYTES:
            raise ConfigDirError(f"{directory}: {name}: longer than {MAX_VALUE_BYTES} bytes")
        try:
            texts[name] = data.decode()
        except UnicodeDecodeError:
            raise ConfigDirError(f"{directory}: {name}: not UTF-8 text") from None
    return texts


def _digest(texts: dict[str, str]) -> bytes:
    return hashlib.sha256(repr(sorted(texts.items())).encode()).digest()


class ConfigDir:
    """`texts` is the first read; `changed` gives each later content once, valid or not (the
    caller validates it and keeps its settings when it is not)."""

    def __init__(self, directory: Path, now: float):
        """OSError or ConfigDirError if it cannot be read."""
        self.directory = directory
        self.texts = read_texts(directory)
        self._seen = _digest(self.texts)
        self._next = now + CHECK_S

    def changed(self, now: float) -> dict[str, str] | None:
        """The directory's new content, once; None if unchanged or not readable now.
        ConfigDirError, once, for a content no settings ConfigMap could hold."""
        if now < self._next:
            return None
        self._next = now + CHECK_S
        try:
            texts = read_texts(self.directory)
        except OSError as e:  # the kubelet swapped generations while we read: next check
            log.debug("the settings in %s cannot be read now (%s): read again in %.0f s", self.directory, e, CHECK_S)
            return None
        except ConfigDirError as e:
            digest = hashlib.sha256(str(e).encode()).digest()
            if digest != self._seen:
                self._seen = digest
                raise
            return None
        digest = _digest(texts)
        if digest == self._seen:
            return None
        self._seen = digest
        self.texts = texts
        return texts


class SettingsReloads:
    """The agent's side: the directory over the command line's settings (`base`), each new
    content validated and planned (live_settings.plan), what happened counted and kept for
    /stats and /metrics. A refused content changes nothing and leaves readiness alone."""

    def __init__(self, directory: Path, base: AgentSettings, now: float):
        """OSError or ConfigDirError if the directory cannot be read; `initial` validates it."""
        self.files = ConfigDir(directory, now)
        self.base = base
        self.counts = {"applied": 0, "restart": 0, "unchanged": 0, "refused": 0}
        self.refusal: str | None = None  # why the directory's current content is not in use
        self.needs_restart: dict[str, str] = {}  # flag -> why its wanted value waits

    def initial(self) -> AgentSettings:
        """The settings to start with; SettingsError names a bad key or value (the agent does not start)."""
        return live_settings.overlay(self.files.texts, self.base)

    def check(self, running: AgentSettings, now: float) -> live_settings.Change | None:
        """A change to apply, once the directory holds a new valid content; else None."""
        try:
            texts = self.files.changed(now)
        except ConfigDirError as e:
            self._refuse(str(e))
            return None
        if texts is None:
            return None
        try:
            change = live_settings.plan(running, self.base, texts)
        except SettingsError as e:
            self._refuse(f"{self.files.directory}: {e}")
            return None
        self.refusal = None
        self.needs_restart = change.needs_restart
        applied, waiting = live_settings.describe(running, change)
        for line in applied:
            log.info("settings: %s", line)
        for line in waiting:
            log.warning("settings: %s", line)
        outcome = "applied" if change.applied else "restart" if change.needs_restart else "unchanged"
        self.counts[outcome] += 1
        return change

    def _refuse(self, why: str) -> None:
        self.refusal = why
        self.counts["refused"] += 1
        log.error("settings: the new ConfigMap is refused, the settings in use stay: %s", why)

    def status(self, running: AgentSettings) -> dict:
        return {"directory": str(self.files.directory), "reloads": dict(self.counts), "refused": self.refusal,
                "needs_restart": dict(self.needs_restart),
                "in_use": {o.flag: settings.show(running, o) for o in settings.cluster_options()}}


class SettingsCollector:
    """config_reloads_total{result} and config_needs_restart{setting}, read at scrape time."""

    def __init__(self, reloads: SettingsReloads):
        self.reloads = reloads

    def describe(self):
        return []

    def collect(self):
        reloads = CounterMetricFamily("config_reloads", "New contents of the settings' ConfigMap, by what came of "
                                      "them: applied live, waiting only for a restart, unchanged, refused",
                                      labels=["result"])
        for result, count in self.reloads.counts.items():
            reloads.add_metric([result], count)
        yield reloads
        waiting = GaugeMetricFamily("config_needs_restart", "Settings whose ConfigMap value differs from the one in "
                                    "use and needs a restart", labels=["setting"])
        for flag in self.reloads.needs_restart:
            waiting.add_metric([flag], 1)
        yield waiting
