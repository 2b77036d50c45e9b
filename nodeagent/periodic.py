"""A check due every so often on the caller's clock: the watched directories (the settings'
ConfigMap, agent/config_dir.py; the issuer's Secret, identity/reload.py) are read at most once a period,
however often the agent's loop asks."""


class Every:
    """Due at `now + period_s` after it is made, then a period after each time it was due."""

    def __init__(self, period_s: float, now: float):
        self.period_s = period_s
        self._next = now + period_s

    def due(self, now: float) -> bool:
        if now < self._next:
            return False
        self._next = now + self.period_s
        return True
