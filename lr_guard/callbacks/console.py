"""The guard's lines on the console: every decision printed on rank zero with no logging set-up, as Lightning's own
messages are, each on a line of its own, not glued onto a progress bar.

Lightning gives its ``pytorch_lightning`` logger a handler of its own when the root logger has none; the guard does
the same for its ``lr_guard`` logger when a run starts (:func:`show_on_console`). A user who configured logging
keeps what they chose: a handler on ``lr_guard``, ``propagate=False``, a level set on it, or handlers on the root
logger (the guard's lines then go there) are left as they are. The handler writes through ``tqdm.write``, which
clears a TQDM progress bar before the line and redraws it after, and it reads ``sys.stderr`` at each line, so a
rich progress bar's redirection (and pytest's capture) sees it.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["ConsoleHandler", "show_on_console"]

log = logging.getLogger("lr_guard")


class ConsoleHandler(logging.Handler):
    """Writes each record's message to ``sys.stderr`` (as it is at that moment) on a line of its own, clearing any
    TQDM progress bar first and redrawing it after."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            stream = sys.stderr
            try:
                from tqdm import tqdm
            except ImportError:  # no tqdm: no bar to keep clear of
                stream.write(line + "\n")
            else:
                tqdm.write(line, file=stream)
            stream.flush()
        except Exception:
            self.handleError(record)


def show_on_console() -> None:
    """Make the ``lr_guard`` logger's INFO lines and warnings reach the console, unless the user configured where
    they go (see the module's docstring). Adds the handler once, however many guards and fits there are."""
    if any(isinstance(h, ConsoleHandler) for h in log.handlers):
        return
    if log.handlers or not log.propagate or log.level != logging.NOTSET:
        return  # configured by the user: their choice stands
    if logging.getLogger().hasHandlers():
        log.setLevel(logging.INFO)  # as Lightning's logger: its INFO lines go to the handlers the user set up
        return
    log.setLevel(logging.INFO)
    log.addHandler(ConsoleHandler())
    log.propagate = False  # as Lightning does when it adds its own handler
