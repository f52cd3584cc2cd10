"""Ctrl-C and SIGTERM stop a run at the next safe point instead of killing it mid-step.

A KeyboardInterrupt raised inside XLA's compiler or a checkpoint write either
waits for the C++ call and then tears the interpreter down around live XLA
threads (a segmentation fault at exit) or is swallowed by a callback. So a
long command instead installs handlers that only record the request:

    with interrupts.stop_requests() as stop:
        for chunk in chunks:
            ...                      # compile, train, checkpoint
            if stop.requested:
                break                # checkpoint, say where, exit 130 / 143

A second Ctrl-C (or SIGTERM) while the first is pending ends the process at
once with the same exit status, without running Python's teardown; what was
already written is safe (checkpoints and small files are written through
renames; metrics.csv is cut back to the newest checkpoint on resume).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

# Exit statuses of a stopped command: 128 + the signal number, as a shell reports it.
EXIT_STATUS = {signal.SIGINT: 128 + signal.SIGINT, signal.SIGTERM: 128 + signal.SIGTERM}


class StopRequests:
    """Records SIGINT/SIGTERM while installed (see `stop_requests`).

    Outside the main thread (where Python cannot install handlers) it is
    inert: `requested` stays False and signals behave as usual.

    Attributes:
        signal_number: the first signal received, or None.
    """

    def __init__(self, message: str = "moraljax: stopping after the current chunk (press Ctrl-C again to"
                 " stop at once)"):
        self._message = message
        self._previous: dict[int, object] = {}
        self.signal_number: int | None = None

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return self.signal_number is not None

    @property
    def exit_status(self) -> int:
        """130 after Ctrl-C, 143 after SIGTERM (0 when none was received)."""
        return EXIT_STATUS.get(self.signal_number, 0) if self.signal_number else 0

    def _handle(self, signal_number, frame) -> None:
        del frame
        # os.write, not print: the handler may interrupt a write to stderr
        # (the progress bar's), and a re-entrant print would raise there.
        if self.signal_number is not None:
            os.write(2, f"\nmoraljax: stopped at once by {signal.Signals(signal_number).name}\n".encode())
            os._exit(EXIT_STATUS[signal_number])
        self.signal_number = signal_number
        os.write(2, f"\n{self._message}\n".encode())

    def install(self) -> None:
        """Installs the handlers (main thread only)."""
        if threading.current_thread() is threading.main_thread():
            for number in EXIT_STATUS:
                self._previous[number] = signal.signal(number, self._handle)

    def uninstall(self) -> None:
        """Puts the previous handlers back."""
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


_active: StopRequests | None = None


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequests]:
    """The process's StopRequests for the body: a new one, or the enclosing one.

    Nested commands (a suite that trains programs) share one, so a Ctrl-C
    seen while training a program also stops the suite.
    """
    global _active
    if _active is not None:
        yield _active
        return
    _active = StopRequests()
    _active.install()
    try:
        yield _active
    finally:
        _active.uninstall()
        _active = None


class Stopped(Exception):
    """A command stopped at a safe point because a stop was requested.

    Attributes:
        exit_status: 130 (Ctrl-C) or 143 (SIGTERM), for the process to exit with.
    """

    def __init__(self, exit_status: int, message: str):
        super().__init__(message)
        self.exit_status = exit_status
