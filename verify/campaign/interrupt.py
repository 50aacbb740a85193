"""Ctrl-C during a campaign: `CtrlC` makes sure it ends the campaign (exit 130), even where
Python drops the interrupt."""
from __future__ import annotations

import signal
import threading

__all__ = ["CtrlC"]


# [Note: a Ctrl-C that is not lost]
# Python raises KeyboardInterrupt wherever the main thread is when SIGINT arrives. Raised inside a
# finalizer (a tensor's or a pipe's __del__, a weakref callback) it is printed as "Exception
# ignored" and dropped, and the campaign would run on to its end as if never interrupted. While
# a campaign runs, SIGINT also sets a flag that is checked after every case, so a Ctrl-C lost
# that way still ends the campaign there (exit 130, no rank left behind, as any other Ctrl-C).
class CtrlC:
    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "CtrlC":
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum, frame) -> None:
        self.requested = True
        signal.default_int_handler(signum, frame)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def check(self) -> None:
        """Raise KeyboardInterrupt if a Ctrl-C came (whether or not it was raised already)."""
        if self.requested:
            raise KeyboardInterrupt
