"""Progress for the phases that take seconds to minutes: probing and recognizing a model,
compiling its first call of each kind, compiling a decode step, each prompt length ``explain``
runs.

On a terminal a phase is a tqdm line whose elapsed time ticks while the phase runs (compiling
gives no count to show, so the clock is the progress), and stays as "what  12.3 s" afterwards.
Elsewhere (a log, a pipe) it is one line when the phase starts and one when it ends (done
or failed). Library
calls show it only on a terminal; the command line and the examples turn it on everywhere
(``show(True)``); ``GRAPHDELTA_PROGRESS=0`` or ``1`` overrides both.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from typing import Iterator

from tqdm import tqdm

_shown: bool | None = None  # None: on a terminal only
# False while streamed text (TokenPrinter) has left stdout mid-line: a progress line written to
# the same terminal would land inside the text, so it starts on a new line.
stdout_at_line_start = True


def show(on: bool | None) -> None:
    """Turn progress lines on or off for this process (None: on a terminal only)."""
    global _shown
    _shown = on


def setting() -> bool | None:
    """What ``show`` last set."""
    return _shown


def _mode() -> str | None:
    """'bar' (a terminal), 'lines', or None (off)."""
    env = os.environ.get("GRAPHDELTA_PROGRESS")
    if sys.stderr is None:  # (pythonw, detached daemons)
        return None
    tty = sys.stderr.isatty()
    on = (env != "0") if env in ("0", "1") else (tty if _shown is None else _shown)
    return None if not on else ("bar" if tty else "lines")


class Phase:
    """What ``phase`` yields: ``note(text)`` says what the phase is doing now."""

    def __init__(self, bar: tqdm | None = None):
        self.bar = bar

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)


@contextlib.contextmanager
def phase(what: str) -> Iterator[Phase]:
    """Show ``what`` (e.g. "compiling the first call (about a minute on CPU)") while the block runs."""
    mode = _mode()
    if mode is None:
        yield Phase()
        return
    global stdout_at_line_start
    start = time.perf_counter()
    if not stdout_at_line_start:
        print(file=sys.stderr, flush=True)
        stdout_at_line_start = True
    if mode == "lines":
        print(f"graphdelta: {what} ...", file=sys.stderr, flush=True)
        failed = True
        try:
            yield Phase()
            failed = False
        finally:
            end = "failed after" if failed else "done in"
            print(f"graphdelta: {what}: {end} {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        return
    bar = tqdm(total=None, desc=f"graphdelta: {what}", bar_format="{desc} {elapsed}{postfix}",
               file=sys.stderr, leave=True, dynamic_ncols=True)
    stop = threading.Event()

    def tick() -> None:  # compiling holds the main thread for minutes: the clock moves anyway
        while not stop.wait(0.5):
            bar.refresh()

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    failed = True
    try:
        yield Phase(bar)
        failed = False
    finally:
        stop.set()
        ticker.join()
        bar.set_postfix_str("failed" if failed else "")
        bar.close()
