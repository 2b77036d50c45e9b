"""The agent's side of its live settings: the settings' directory (config_dir.py) over the command
line's, each new content validated and planned (live_settings.plan), what came of it counted for
/stats and /metrics (config_reloads_total, config_needs_restart, config_dir_unreadable_total);
a refused content changes nothing, and an agent that starts on one starts from the last content
applied on its node (last_good.py)."""

import enum
import logging
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from nodeagent import live_settings, settings
from nodeagent.agent.config_dir import ConfigDir, ConfigDirError
from nodeagent.agent.last_good import LastGood
from nodeagent.settings import AgentSettings, SettingsError

log = logging.getLogger("nodeagent.agent")


def termination_grace(environ) -> float | None:
    """The pod's terminationGracePeriodSeconds, as the chart passes it (GRACE_ENV); None if not."""
    text = environ.get(live_settings.GRACE_ENV)
    try:
        return float(text) if text else None
    except ValueError:
        log.warning("settings: %s=%r is not a number of seconds: ignored", live_settings.GRACE_ENV, text)
        return None



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
