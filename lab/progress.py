"""Progress bars: tqdm on a terminal or in a notebook; elsewhere (a log file, CI, a pipe) ONE line per bar
when it closes, instead of a carriage-return stream of every update, plus one line every LINE_EVERY
seconds while a long bar runs (a 20-minute fine-tune in a log file shows where it is).

    from lab.progress import tqdm          # a drop-in for `from tqdm.auto import tqdm`
"""
from __future__ import annotations

import io
import sys
import time

from tqdm.auto import tqdm as _auto
from tqdm.autonotebook import tqdm as _console_or_notebook
from tqdm.std import tqdm as _std

IN_NOTEBOOK = _console_or_notebook is not _std      # tqdm.auto picked the notebook widget


LINE_EVERY = 60.0   # seconds between the interim lines of a LineBar


class LineBar(_std):
    """A tqdm that counts as usual but prints its state on one line at close, and every LINE_EVERY s."""

    def __init__(self, *args, line_every: float | None = None, **kwargs):
        self._line_file = kwargs.get("file") or sys.stderr
        self._line_every = LINE_EVERY if line_every is None else line_every
        self._last_line = time.monotonic()
        self._printed_n = None      # the count of the last line printed (close does not repeat it)
        kwargs["file"] = io.StringIO()
        super().__init__(*args, **kwargs)

    def update(self, n=1):
        out = super().update(n)
        now = time.monotonic()
        if self._line_file is not None and not self.disable and now - self._last_line >= self._line_every:
            self._last_line, self._printed_n = now, self.n
            print(self.format_meter(**self.format_dict), file=self._line_file, flush=True)
        return out

    def __del__(self):          # a bar abandoned by an exception prints nothing (the error says what happened)
        self._line_file = None
        super().__del__()

    def close(self):
        out, self._line_file = self._line_file, None
        if out is not None and not self.disable and self.n != self._printed_n:
            print(self.format_meter(**self.format_dict), file=out, flush=True)
        super().close()


def _isatty(f) -> bool:
    return bool(getattr(f, "isatty", None)) and f.isatty()


def tqdm(*args, **kwargs):
    """tqdm.auto's bar, or a LineBar when it would write to something that is not a terminal."""
    if IN_NOTEBOOK or kwargs.get("disable") or _isatty(kwargs.get("file") or sys.stderr):
        return _auto(*args, **kwargs)
    return LineBar(*args, **kwargs)
