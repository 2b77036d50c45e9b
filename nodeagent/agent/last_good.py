"""The last settings this node's agent applied, kept in its state directory: what an agent starts
from when the settings' directory holds a content it refuses (settings_reloads.py)."""

import json
import logging
import os
from pathlib import Path

from nodeagent.agent.config_dir import MAX_KEYS, MAX_VALUE_BYTES

log = logging.getLogger("nodeagent.agent")
MAX_COPY_BYTES = MAX_KEYS * 6 * (MAX_VALUE_BYTES + 256)  # a copy: JSON escapes a byte in 6 at most


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

