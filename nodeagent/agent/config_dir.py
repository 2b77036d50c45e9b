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

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from nodeagent.periodic import Every

log = logging.getLogger("nodeagent.agent")
CHECK_S = 2.0  # how often the directory is read
DATA_LINK = "..data"
MAX_KEYS = 64  # a ConfigMap holds at most 1 MiB; the settings are about twenty short values
MAX_VALUE_BYTES = 4096
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
        self._poll = Every(CHECK_S, now)

    def changed(self, now: float) -> dict[str, str] | None:
        """The directory's new content, once; None if unchanged or not readable now.
        ConfigDirError, once, for a content no settings ConfigMap could hold."""
        if not self._poll.due(now):
            return None
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
