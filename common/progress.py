"""Progress bars that stay readable when the output is a log file rather than a terminal.

On a terminal tqdm redraws one line in place. Written to a file or a CI log, every redraw becomes
text: one comparison run left 13 KB of bar updates before its first result line. Off a terminal
the bar therefore redraws at most every 30 s. Under torchrun only rank 0 draws (N bars would interleave).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from tqdm import tqdm


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs) -> tqdm:
    """`tqdm(iterable, **kwargs)`, disabled unless `enabled` (and on ranks other than 0), throttled when
    stderr is not a terminal."""
    kwargs.setdefault("mininterval", 0.1 if sys.stderr.isatty() else 30.0)
    main_rank = os.environ.get("RANK", "0") == "0"
    return tqdm(iterable, disable=not (enabled and main_rank), **kwargs)
