"""How a run ends, and its exit code; the stop signals a run is interrupted by.

    finished     0    every step taken
    diverged     3    the loss, its gradient or the pixels became NaN or Inf (the last finite image kept)
    interrupted  130 / 143  stopped by SIGINT / SIGTERM (resume continues it)
    pending      —    a point of a sweep not run yet

A user error exits 2 and a file that could not be written 74 (:mod:`nstjax.errors`).
"""

from __future__ import annotations

import contextlib
import enum
import signal

EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}
"""The exit code of a run stopped by each signal (128 + its number)."""


class RunStatus(str, enum.Enum):
    """A run's (or a sweep point's) status, as metrics.json and sweep.csv write it."""

    FINISHED = "finished"
    DIVERGED = "diverged"
    INTERRUPTED = "interrupted"
    PENDING = "pending"

    @property
    def final(self) -> bool:
        """A run that ended on its own: there is nothing to resume."""
        return self in (RunStatus.FINISHED, RunStatus.DIVERGED)

    def exit_code(self, signum: int | None = None) -> int:
        """0 finished, 3 diverged; a run not ended on its own exits as the signal that stopped it
        (SIGINT's 130 when none did)."""
        if self is RunStatus.FINISHED:
            return 0
        if self is RunStatus.DIVERGED:
            return 3
        return EXIT_SIGNAL.get(signum, EXIT_SIGNAL[signal.SIGINT])

    def __str__(self) -> str:
        return self.value


class StopSignals:
    """SIGINT / SIGTERM as a flag that the chunk loop reads; installed once per process."""

    def __init__(self):
        self.received: int | None = None
        self._depth = 0

    def _handle(self, signum, frame):
        self.received = signum

    @contextlib.contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self._handle) for s in EXIT_SIGNAL} if self._depth == 0 else {}
        self._depth += 1
        try:
            yield self
        finally:
            self._depth -= 1
            for s, h in previous.items():
                signal.signal(s, h)


SIGNALS = StopSignals()
