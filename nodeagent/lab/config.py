"""The lab's settings ConfigMap: a directory written as the kubelet writes a mounted ConfigMap,
which the lab's agents watch (`nodeagent run --config-dir`, agent/config_dir.py).

Each write is a new generation: a timestamped directory holding every key, made visible at once
by renaming a `..data` symlink over the old one, each key a symlink through `..data`; then the
old generation and links to keys that went are removed (the kubelet's AtomicWriter does the same).
"""

import os
import time
from pathlib import Path

from nodeagent import live_settings
from nodeagent.settings import DEFAULT, SettingsError

DATA_LINK = "..data"


def read(directory: Path) -> dict[str, str]:
    from nodeagent.agent.config_dir import read_texts

    return read_texts(directory) if directory.exists() else {}


def check_keys(keys) -> None:
    """ValueError for a key that is not a plain file name (`../x` would be written outside the
    generation and linked outside the directory), whatever --no-check says: the API server
    refuses such ConfigMap keys too."""
    from nodeagent.agent.config_dir import plain_key

    bad = sorted(key for key in keys if not plain_key(key))
    if bad:
        raise ValueError(f"not written: {', '.join(map(repr, bad))}: a key is a plain file name of letters, digits, "
                         "'-', '_' and '.' (no leading '.', no '..')")


def write(directory: Path, data: dict[str, str]) -> None:
    """Replace the directory's content with `data`, atomically for a reader that goes through `..data`."""
    check_keys(data)
    directory.mkdir(parents=True, exist_ok=True)
    link = directory / DATA_LINK
    old = os.readlink(link) if link.is_symlink() else None
    generation = directory / time.strftime(f"..%Y_%m_%d_%H_%M_%S.{time.monotonic_ns()}")
    generation.mkdir()
    for key, value in data.items():
        (generation / key).write_text(value)
    staged = directory / f"{DATA_LINK}_tmp"
    staged.symlink_to(generation.name)
    os.rename(staged, link)
    for key in data:
        if not (directory / key).is_symlink():
            (directory / key).symlink_to(Path(DATA_LINK) / key)
    for entry in directory.iterdir():
        if entry.is_symlink() and not entry.name.startswith("..") and entry.name not in data:
            entry.unlink()
    if old is not None:
        for entry in (directory / old).iterdir():
            entry.unlink()
        (directory / old).rmdir()


def parse_changes(changes: list[str]) -> dict[str, str | None]:
    """KEY=VALUE sets a setting, KEY- removes it (back to the agents' command line or default)."""
    parsed: dict[str, str | None] = {}
    for change in changes:
        key, sep, value = change.partition("=")
        if sep:
            parsed[key] = value
        elif change.endswith("-") and len(change) > 1:
            parsed[change[:-1]] = None
        else:
            raise ValueError(f"{change!r}: KEY=VALUE to set a setting, KEY- to remove it")
    return parsed


def change(directory: Path, changes: list[str], check: bool = True) -> dict[str, str]:
    """Apply KEY=VALUE / KEY- changes to the directory; the new content. With `check`, a content
    the agents would refuse is refused here first (ValueError naming the flag), unwritten; a key
    that is not a plain file name is refused even without it."""
    data = read(directory)
    parsed = parse_changes(changes)
    check_keys(parsed)
    for key, value in parsed.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    if check:
        try:
            live_settings.overlay(data, DEFAULT)
        except SettingsError as e:
            raise ValueError(f"not written: the agents would refuse it: {e}") from None
    write(directory, data)
    return data
