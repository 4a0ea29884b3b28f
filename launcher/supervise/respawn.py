"""A replica group whose host was lost, started there again (``--fault-tolerant`` across hosts).

A group's torchrun restarts its rank when the rank dies. When the whole host goes (its ranks, torchrun and
node agent killed, or the machine gone) the ssh that ran the group ends with ssh's own code, 255, and nothing
on that host is left to restart anything: the launcher starts the group's command again over ssh, after a
backoff that doubles, within the group's ``--max-restarts``. While the host is down each try fails at once
(255 again) and counts; once it answers, the group starts, heals from a live peer and rejoins, and the other
groups never stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from launcher.plan.ssh import SSH_FAILED
from launcher.plan.types import Cmd


@dataclass
class Respawn:
    build: Callable[[int, int], Cmd]  # (command index, the group's next attempt) -> its command, to start again
    budget: int  # starts again per command
    backoff_s: float  # before the first; doubled for each further one
    used: dict[int, int] = field(default_factory=dict)
    due: dict[int, float] = field(default_factory=dict)  # command index -> when it starts again

    def lost(self, index: int, code: int | None) -> str | None:
        """Schedule command ``index``, which ended with ``code``, to start again if its host was lost and its
        budget allows; returns the console line saying so, else None."""
        tries = self.used.get(index, 0)
        if code != SSH_FAILED or index in self.due or tries >= self.budget:
            return None
        self.used[index] = tries + 1
        delay = self.backoff_s * 2 ** tries
        self.due[index] = time.monotonic() + delay
        return f"starting it there again in {delay:g} s ({tries + 1}/{self.budget}); the other groups go on"

    def ready(self) -> list[int]:
        """The commands whose time to start again has come (taken off the schedule)."""
        now = time.monotonic()
        ready = [i for i, at in self.due.items() if at <= now]
        for i in ready:
            del self.due[i]
        return ready
