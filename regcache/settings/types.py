"""Value types that settings share: comma lists, feature combinations, KEY=VALUE pairs, finite numbers.

Each accepts what a person types (``"0.01,0.1"``, a repeated option) and what a YAML file holds (a
list, a single number), so the command line and a pipeline block go through the same checks.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import AfterValidator, BeforeValidator, Field

from ..features import FEATURES, LAYER_FEATURES, FeatureError, parse_features, parse_layers


def split(value: Any) -> Any:
    """``"a,b"``, ``("a,b", "c")`` (a repeated option) or a YAML scalar -> a flat list; other values as they are."""
    if isinstance(value, str):
        return [s.strip() for s in value.split(",") if s.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value):
        return [s.strip() for x in value for s in x.split(",") if s.strip()]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    return value


def _features(value: Any) -> Any:
    if isinstance(value, (str, list, tuple)):
        try:
            return parse_features(value)
        except FeatureError as e:
            raise ValueError(str(e)) from None
    return value


def _combos(value: Any) -> Any:
    """Feature combinations: ``["cls", "cls,patch"]``, ``[["cls"], ["cls", "patch"]]`` or one ``"cls,patch"``."""
    if isinstance(value, str):
        return [value]
    return value


def _layers(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        value = ",".join(str(v) for v in value)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str):
        try:
            return parse_layers(value)
        except FeatureError as e:
            raise ValueError(str(e)) from None
    return value


def parse_pairs(value: Any) -> Any:
    """``("depth=2", "name=x")`` -> {"depth": 2, "name": "x"}: values read as JSON when they can be."""
    if not isinstance(value, (list, tuple)):
        return value
    out = {}
    for item in value:
        key, eq, text = str(item).partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{item!r} is not KEY=VALUE")
        try:
            out[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            out[key.strip()] = text
    return out


def _expand(value: Any) -> Any:
    return Path(os.path.expanduser(value)) if isinstance(value, (str, Path)) else value


def _once(values: list) -> list:
    """One rule for every list-valued setting: a value given twice is refused (a repeated seed would be averaged
    as an independent draw, a set listed twice counted twice in a mean, a repeated grid value trained twice)."""
    twice = [v for i, v in enumerate(values) if v in values[:i]]
    if twice:
        shown = ", ".join(dict.fromkeys(",".join(v) if isinstance(v, tuple) else str(v) for v in twice))
        raise ValueError(f"{shown} given more than once (each value counts once: give it once)")
    return values


Once = AfterValidator(_once)
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Positive = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=1)]


def comma_list(item: str, what: str) -> Any:
    """A comma list of ``item`` (a regular expression) as typed on the command line: its JSON Schema."""
    return Annotated[str, Field(pattern=rf"^\s*(?:{item})(?:\s*,\s*(?:{item}))*\s*$", description=what)]


_DIGITS = r"(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_END = r"(?=\s*(?:,|$))"
PositiveText = comma_list(rf"\+?(?!0*\.?0*(?:[eE][-+]?\d+)?{_END}){_DIGITS}", "a comma list of positive numbers")
NonNegativeText = comma_list(rf"\+?{_DIGITS}", "a comma list of numbers >= 0")
CountText = comma_list(r"\+?0*[1-9]\d*", "a comma list of integers >= 1")
IntText = comma_list(r"[-+]?\d+", "a comma list of integers")
_PER_BLOCK = "|".join(LAYER_FEATURES)
_FEATURE = rf"(?:{_PER_BLOCK})(?:@-\d+)?|" + "|".join(n for n in FEATURES if n not in LAYER_FEATURES)
FeatureName = Annotated[str, Field(pattern=rf"^(?:{_FEATURE})$")]
FeatureText = comma_list(_FEATURE, "features joined by commas")
LayersText = Annotated[str, Field(pattern=r"^\s*(?:last\d+|[-+]?\d+(?:\s*,\s*[-+]?\d+)*)\s*$")]
PairText = Annotated[str, Field(pattern=r"^[^=]+=", description="KEY=VALUE")]


def listed(item: Any, text: Any = None) -> Any:
    """What a list setting accepts (the JSON Schema of its input): one value, or a list of them; with ``text``
    (a `comma_list`) also that, alone or in the list."""
    one = item if text is None else Union[item, text]
    return Union[one, list[one]]


Names = Annotated[list[str], BeforeValidator(split, json_schema_input_type=listed(str)), Once]
PositiveFloats = Annotated[list[Positive], BeforeValidator(split, json_schema_input_type=listed(Positive, PositiveText)),
                           Field(min_length=1), Once]
NonNegativeFloats = Annotated[list[NonNegative], BeforeValidator(
    split, json_schema_input_type=listed(NonNegative, NonNegativeText)), Field(min_length=1), Once]
Counts = Annotated[list[Count], BeforeValidator(split, json_schema_input_type=listed(Count, CountText)),
                   Field(min_length=1), Once]
Ints = Annotated[list[int], BeforeValidator(split, json_schema_input_type=listed(int, IntText)), Field(min_length=1),
                 Once]
#: a feature list, checked and normalised (``cls@-1`` is ``cls``; duplicates dropped)
FeatureList = Annotated[tuple[str, ...], BeforeValidator(_features,
                                                         json_schema_input_type=Union[FeatureText, list[FeatureName]])]


def _one_order(combos: list) -> list:
    """A combination given twice in two orders would train the same head twice (up to its inputs' order)."""
    seen: dict[frozenset, tuple] = {}
    for c in combos:
        other = seen.setdefault(frozenset(c), c)
        if other != c:
            raise ValueError(f"{','.join(other)} and {','.join(c)} are one combination in two orders: give it once")
    return combos


def _paths_once(paths: list) -> list:
    """Paths, each given once (``run`` and ``./run`` and its absolute path are one)."""
    _once([Path(p).resolve() for p in paths])
    return paths


#: feature combinations, each normalised: ``cls@-1`` and ``cls`` are one combination, given once, in one order
Combos = Annotated[list[FeatureList], BeforeValidator(
    _combos, json_schema_input_type=Union[FeatureText, list[Union[FeatureText, list[FeatureName]]]]), Once,
    AfterValidator(_one_order)]
#: paths (runs to merge), each once
UniquePaths = Annotated[list[Annotated[Path, BeforeValidator(_expand)]], AfterValidator(_paths_once)]
Layers = Annotated[tuple[int, ...], BeforeValidator(_layers, json_schema_input_type=Union[LayersText, int, list[int]])]
Pairs = Annotated[dict[str, Any], BeforeValidator(parse_pairs, json_schema_input_type=Union[dict[str, Any],
                                                                                              list[PairText]])]
RGB = Annotated[tuple[FiniteFloat, FiniteFloat, FiniteFloat], BeforeValidator(
    split, json_schema_input_type=Union[tuple[FiniteFloat, FiniteFloat, FiniteFloat],
                                        comma_list(rf"[-+]?{_DIGITS}", "three numbers")])]
PositiveRGB = Annotated[tuple[Positive, Positive, Positive], BeforeValidator(
    split, json_schema_input_type=Union[tuple[Positive, Positive, Positive], PositiveText])]
UserPath = Annotated[Path, BeforeValidator(_expand)]


def finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
