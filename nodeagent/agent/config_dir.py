"""The cluster settings' directory (`--config-dir`: the ConfigMap mounted as a volume), watched.

The kubelet writes a mounted ConfigMap as one file per key in a timestamped directory and
swaps the `..data` symlink to it, so a new generation appears at once, up to about 2 minutes
after the ConfigMap's change by default (its sync period, 1 min plus jitter, plus its cache's
delay: a watch's propagation, or up to the cache's TTL, 1 min, under the TTL strategy). Every key is read from the
generation `..data` points to when the read starts, so a read never mixes two generations; a
generation removed while it was read is read again at the next check. A directory without
`..data` (written by hand, or the lab's before its first change) is read as it is.

Why a mounted volume and not an API watch of the ConfigMap: the files are read the same way in
the lab and on a cluster (the lab writes them as the kubelet does), they need no RBAC rule, no
reflector and no namespace or name given to the agent, and the agent starts from them before it
talks to the API (the mesh label picks what its cluster view watches). The cost is the
kubelet's delay of up to about 2 minutes; settings are not changed often.
"""

import enum
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from nodeagent import live_settings, settings
from nodeagent.settings import AgentSettings, SettingsError

log = logging.getLogger("nodeagent.agent")
CHECK_S = 2.0  # how often the directory is read
DATA_LINK = "..data"
MAX_KEYS = 64  # a ConfigMap holds at most 1 MiB; the settings are about twenty short values
MAX_VALUE_BYTES = 4096
MAX_COPY_BYTES = MAX_KEYS * 6 * (MAX_VALUE_BYTES + 256)  # a last-good copy: JSON escapes a byte in 6 at most
KEY = re.compile(r"[-._a-zA-Z0-9]{1,253}")  # a ConfigMap key, as the API server checks it
UNREADABLE_WARN_AFTER = 3  # failed reads in a row before a warning: the kubelet's swap fails one at most
UNREADABLE_WARN_EVERY_S = 60.0  # then at most one warning a minute while it stays unreadable


class ConfigDirError(ValueError):
    pass


def plain_key(name: str) -> bool:
    """A key that names a file in the directory itself: a ConfigMap key's characters, no leading
    dot (the kubelet's own entries, `..data`, start with one), no `..`, no `/`."""
    return KEY.fullmatch(name) is not None and not name.startswith(".") and ".." not in name


@dataclass
class Generation:
    texts: dict[str, str]  # key -> text
    ignored: list[str] = field(default_factory=list)  # entries that are no setting's file (names, why)


def read_generation(directory: Path) -> Generation:
    """One generation of the directory: key -> text, and the entries ignored (not a plain key's
    name, or not a regular file). OSError if it cannot be read now (a generation swapped away
    mid-read), ConfigDirError if it holds more than a ConfigMap of settings could."""
    link = directory / DATA_LINK
    root = directory / link.readlink() if link.is_symlink() else directory
    names, ignored = [], []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue  # the kubelet's generations and links, hidden files: not settings
        if not plain_key(entry.name):
            ignored.append(f"{entry.name!r}: not a plain key name")
        elif not entry.is_file():
            ignored.append(f"{entry.name!r}: not a regular file")
        else:
            names.append(entry.name)
    if len(names) + len(ignored) > MAX_KEYS:
        raise ConfigDirError(f"{directory}: {len(names) + len(ignored)} keys, more than the {MAX_KEYS} a settings ConfigMap has")
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
    return Generation(texts, ignored)


def read_texts(directory: Path) -> dict[str, str]:
    """key -> text of one generation of the directory (read_generation's, ignored entries left out)."""
    return read_generation(directory).texts


def _digest(generation: Generation) -> bytes:
    return hashlib.sha256(repr((sorted(generation.texts.items()), generation.ignored)).encode()).digest()


class ConfigDir:
    """`texts` is the first read; `changed` gives each later content once, valid or not (the
    caller validates it and keeps its settings when it is not)."""

    def __init__(self, directory: Path, now: float):
        """OSError if it cannot be read; a content no settings ConfigMap could hold is kept in
        `error` (and `texts` left empty)."""
        self.directory = directory
        self.error: ConfigDirError | None = None
        self.ignored: list[str] = []  # the current content's entries that are no setting's file
        self.unreadable = 0  # failed reads, since start (config_dir_unreadable_total)
        self._failing = 0  # failed reads in a row
        self._warned_at: float | None = None
        try:
            generation = read_generation(directory)
            self._take(generation)
            self._seen = _digest(generation)
        except ConfigDirError as e:
            self.error, self.texts = e, {}
            self._seen = hashlib.sha256(str(e).encode()).digest()
        self._next = now + CHECK_S

    def changed(self, now: float) -> dict[str, str] | None:
        """The directory's new content, once; None if unchanged or not readable now.
        ConfigDirError, once, for a content no settings ConfigMap could hold."""
        if now < self._next:
            return None
        self._next = now + CHECK_S
        try:
            generation = read_generation(self.directory)
        except OSError as e:
            self._unreadable(e, now)
            return None
        except ConfigDirError as e:
            self._failing = 0
            digest = hashlib.sha256(str(e).encode()).digest()
            if digest != self._seen:
                self._seen = digest
                raise
            return None
        self._failing = 0
        digest = _digest(generation)
        if digest == self._seen:
            return None
        self._seen = digest
        self._take(generation)
        return self.texts

    def _take(self, generation: Generation) -> None:
        self.texts, self.ignored = generation.texts, generation.ignored
        if self.ignored:  # the API server admits no such key: a directory written by other hands
            log.warning("settings: %s: ignored, not a setting's file: %s", self.directory, "; ".join(self.ignored))

    def _unreadable(self, error: OSError, now: float) -> None:
        """One failed read: the kubelet swapped generations while we read (the next check reads
        the new one), or the directory is gone or unreadable (a broken mount, permissions),
        which would otherwise go unnoticed while the agent runs on its settings: counted, and
        warned of once it fails a few times in a row, at most once a minute."""
        self.unreadable += 1
        self._failing += 1
        if self._failing < UNREADABLE_WARN_AFTER:
            log.debug("the settings in %s cannot be read now (%s): read again in %.0f s", self.directory, error,
                      CHECK_S)
        elif self._warned_at is None or now - self._warned_at >= UNREADABLE_WARN_EVERY_S:
            self._warned_at = now
            log.warning("settings: %s cannot be read (%d reads in a row failed, %s): the settings in use stay; "
                        "changes to the ConfigMap are not seen", self.directory, self._failing, error)


def termination_grace(environ) -> float | None:
    """The pod's terminationGracePeriodSeconds, as the chart passes it (GRACE_ENV); None if not."""
    text = environ.get(live_settings.GRACE_ENV)
    try:
        return float(text) if text else None
    except ValueError:
        log.warning("settings: %s=%r is not a number of seconds: ignored", live_settings.GRACE_ENV, text)
        return None


class LastGood:
    """The last content of the directory this node's agent applied, copied to the agent's state
    directory (`--state-dir`, a hostPath on the node: it outlives the container and the pod).
    An agent that starts while the directory holds a bad content starts from it instead of
    refusing to start (every agent that (re)starts after a bad edit would crash-loop, and its
    pods fail closed). Written whole (a temporary file renamed over it), so an agent killed
    mid-write leaves the previous copy; the surge roll's two agents write the same content."""

    NAME = "config-last-good.json"

    def __init__(self, state_dir: Path | None):
        self.path = state_dir / self.NAME if state_dir else None

    def save(self, texts: dict[str, str]) -> None:
        if self.path is None:
            return
        staged = self.path.with_name(f".{self.NAME}.{os.getpid()}")
        try:
            staged.write_text(json.dumps(texts, sort_keys=True))
            os.replace(staged, self.path)
        except OSError as e:  # the copy only helps a later start: the agent runs on without it
            log.warning("settings: cannot keep a copy of the settings applied in %s: %s", self.path, e)

    def load(self) -> dict[str, str] | None:
        """The copy, or None when there is none (or it is not a copy we wrote: logged)."""
        if self.path is None or not self.path.exists():
            return None
        try:
            with open(self.path, "rb") as file:
                data = file.read(MAX_COPY_BYTES + 1)
            if len(data) > MAX_COPY_BYTES:
                raise ValueError(f"longer than the {MAX_COPY_BYTES} bytes of a settings ConfigMap's copy")
            texts = json.loads(data)
        except (OSError, ValueError) as e:
            log.warning("settings: the copy of the last settings applied, %s, cannot be read: %s", self.path, e)
            return None
        if not (isinstance(texts, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in texts.items())):
            log.warning("settings: %s is not a copy of settings applied: ignored", self.path)
            return None
        return texts


class Start(enum.Enum):
    """Where the settings an agent started with came from."""
    DIRECTORY = "directory"  # the directory's content, valid
    LAST_GOOD = "last-good"  # the directory's was refused: the last content applied on this node
    COMMAND_LINE = "command-line"  # refused, and no valid copy: the command line's values and defaults


class SettingsReloads:
    """The agent's side: the directory over the command line's settings (`base`), each new
    content validated and planned (live_settings.plan), what happened counted and kept for
    /stats and /metrics. A refused content changes nothing and leaves readiness alone."""

    def __init__(self, directory: Path, base: AgentSettings, now: float, state_dir: Path | None = None,
                 grace_s: float | None = None):
        """OSError if the directory cannot be read (the command line names no directory we can
        read: the agent does not start); `initial` validates its content."""
        self.files = ConfigDir(directory, now)
        self.base = base
        self.last_good = LastGood(state_dir)
        self.counts = {"applied": 0, "restart": 0, "unchanged": 0, "refused": 0}
        self.refusal: str | None = None  # why the directory's current content is not in use
        self.needs_restart: dict[str, str] = {}  # flag -> why its wanted value waits
        self.start = Start.DIRECTORY
        self.grace_s = grace_s  # the pod's terminationGracePeriodSeconds, when the chart tells it

    def initial(self) -> AgentSettings:
        """The settings to start with: the directory's over the command line's; if its content
        is bad, refused as at runtime (logged naming the flag, counted, in /stats) and the agent
        starts from the last content applied on this node, else from the command line alone."""
        try:
            if self.files.error is not None:
                raise self.files.error
            wanted = live_settings.overlay(self.files.texts, self.base)
        except (ConfigDirError, SettingsError) as e:
            self._refuse(f"{self.files.directory}: {e}" if isinstance(e, SettingsError) else str(e))
            return self._fallback()
        self.last_good.save(self.files.texts)
        self._warn_drain(wanted)
        return wanted

    def _fallback(self) -> AgentSettings:
        texts = self.last_good.load()
        if texts is not None:
            try:
                settings_ = live_settings.overlay(texts, self.base)
            except SettingsError as e:  # a copy of another version's settings, say
                log.warning("settings: the last settings applied on this node (%s) are refused too: %s",
                            self.last_good.path, e)
            else:
                self.start = Start.LAST_GOOD
                log.warning("settings: starting from the last settings applied on this node (%s)",
                            self.last_good.path)
                self._warn_drain(settings_)
                return settings_
        self.start = Start.COMMAND_LINE
        log.warning("settings: starting from the command line's settings and the defaults alone")
        self._warn_drain(self.base)
        return self.base

    def _warn_drain(self, settings_: AgentSettings) -> None:
        why = live_settings.drain_beyond_grace(settings_.drain_timeout, self.grace_s)
        if why:
            log.warning("settings: %s", why)

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
        self.last_good.save(texts)
        self.needs_restart = change.needs_restart
        applied, waiting = live_settings.describe(running, change)
        for line in applied:
            log.info("settings: %s", line)
        for line in waiting:
            log.warning("settings: %s", line)
        if "drain-timeout" in change.applied:
            self._warn_drain(change.settings)
        outcome = "applied" if change.applied else "restart" if change.needs_restart else "unchanged"
        self.counts[outcome] += 1
        return change

    def _refuse(self, why: str) -> None:
        self.refusal = why
        self.counts["refused"] += 1
        log.error("settings: the new ConfigMap is refused, the settings in use stay: %s", why)

    def status(self, running: AgentSettings) -> dict:
        return {"directory": str(self.files.directory), "started_from": self.start.value,
                "reloads": dict(self.counts), "refused": self.refusal, "ignored": list(self.files.ignored),
                "unreadable": self.files.unreadable,
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
        unreadable = CounterMetricFamily("config_dir_unreadable", "Reads of the settings' directory that failed "
                                         "(one now and then: the kubelet swapped it mid-read; many in a row: a "
                                         "broken mount, changes unseen)")
        unreadable.add_metric([], self.reloads.files.unreadable)
        yield unreadable
