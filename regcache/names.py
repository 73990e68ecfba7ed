"""Near misses: "did you mean" for a name that is not one of the known ones (a set, a feature, a model, a scorer)."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, known: Iterable[str], n: int = 3) -> str:
    """`` (did you mean X or Y?)`` for the known names closest to ``name``, or nothing when none is close."""
    close = difflib.get_close_matches(name, list(dict.fromkeys(known)), n=n, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""
