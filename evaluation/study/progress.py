"""Progress display of the study: tqdm bars on a terminal, plain timestamped lines otherwise.

On a terminal, a ``seeds`` bar and a per-seed ``methods`` bar whose postfix names the running
step (``kfoc: rotation 30°``). Without a terminal (a log file, CI), tqdm's cursor escapes would
fill the log, so every bar and step becomes one plain line, ``[  12.3 s] seed 0 · kfoc · OOD
uniform``. ``enabled=False`` prints nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO, TypeVar

from tqdm.auto import tqdm

__all__ = ["Progress"]

T = TypeVar("T")


class Progress:
    """One run's progress output.

    Args:
        enabled: Show anything at all (``--no-progress`` turns it off).
        stream: Where to write (default: standard error).
        tty: Force bars (``True``) or plain lines (``False``); default: ``stream.isatty()``.
    """

    def __init__(self, enabled: bool, stream: TextIO | None = None, tty: bool | None = None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.tty = bool(isatty()) if tty is None else tty
        self._start = time.perf_counter()
        self._bars: list[Any] = []

    def line(self, text: str) -> None:
        """A message on its own line (above the bars on a terminal)."""
        if not self.enabled:
            return
        if self.tty:
            tqdm.write(text, file=self.stream)
        else:
            stamp = f"[{time.perf_counter() - self._start:7.1f} s]"
            print(f"{stamp} {text}", file=self.stream, flush=True)

    def bar(self, items: Iterable[T], desc: str, *, leave: bool = True) -> Iterator[T]:
        """Iterate over ``items`` with a bar (terminal) or a line per item (plain)."""
        seq = list(items)
        if not self.enabled:
            yield from seq
            return
        if not self.tty:
            for i, item in enumerate(seq):
                self.line(f"{desc} {i + 1}/{len(seq)}: {item}")
                yield item
            return
        bar = tqdm(seq, desc=desc, leave=leave, file=self.stream, position=len(self._bars))
        self._bars.append(bar)
        try:
            yield from bar
        finally:
            bar.close()
            self._bars.remove(bar)

    def step(self, text: str) -> None:
        """The step now running inside the innermost bar (its postfix), or a plain line."""
        if not self.enabled:
            return
        if self.tty and self._bars:
            self._bars[-1].set_postfix_str(text, refresh=True)
        else:
            self.line(text)
