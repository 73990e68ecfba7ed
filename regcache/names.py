"""Names: "did you mean" for a name that is not one of the known ones (a set, a feature, a model, a scorer), and the
one rule that makes a name safe as a file or folder name."""
from __future__ import annotations

import difflib
import re
from collections.abc import Iterable


def slug(text: str) -> str:
    """``text`` as a file name: runs of anything but letters, digits, ``.``, ``_`` and ``-`` become one ``_``."""
    return re.sub(r"[^\w.-]+", "_", text).strip("_") or "x"


def did_you_mean(name: str, known: Iterable[str], n: int = 3) -> str:
    """`` (did you mean X or Y?)`` for the known names closest to ``name``, or nothing when none is close."""
    close = difflib.get_close_matches(name, list(dict.fromkeys(known)), n=n, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""
