"""The scorer registry: every post-hoc OOD scorer behind one protocol, registered by name (as timm registers models).

A scorer is made with its hyperparameters (`make("react", percentile=0.9)`), fitted once per head on
the training bank (`fit(bank, head)`, streamed: see `fit.py`), and then scores query chunks
(`score(features, logits)`, float64, larger = more in-distribution). Scorers that need no training
statistics ignore the bank. Defaults are OpenOOD v1.5's ImageNet settings where it has the method,
else the paper's; each class says which. The entries live by what they read: `from_logits`,
`from_head` (features and the linear head), `from_bank` (features and training statistics).

ReAct, ASH, SCALE and DICE were designed for non-negative post-ReLU features. They are implemented
here as published; on signed LayerNorm features (ViT) clipping, pruning and the sum-based scalings act
on signed values, which docs/ood.md discusses and measures.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from ..names import did_you_mean
from .fit import Bank, FitError


@dataclass
class Linear:
    """The linear head a scorer works with: ``logits = x @ weight.T + bias`` (float64)."""

    weight: np.ndarray
    bias: np.ndarray

    def __post_init__(self) -> None:
        self.weight, self.bias = np.asarray(self.weight, np.float64), np.asarray(self.bias, np.float64)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight.T + self.bias


class Params(BaseModel):
    """A scorer's hyperparameters, each a field with its default, range and meaning: one validation for the
    command line (values arrive as text), pipeline files and Python, and the source of `regcache scorers`, the
    JSON Schema and docs/ood.md's table."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Scorer:
    """One OOD scorer. Subclasses set ``name``, ``reference``, ``defaults`` (where the defaults come from)
    and ``Params`` (a `Params` model of its hyperparameters), and implement ``score``; those that need
    training statistics set ``needs_bank`` and implement ``fit``.

    ``notes``: one line each about what the last fit met and how it was handled (a rank-deficient covariance
    inverted on its support, …), so that a caller can record why a number is what it is; also logged.
    """

    name: ClassVar[str]
    reference: ClassVar[str]
    defaults: ClassVar[str] = "the paper"
    Params: ClassVar[type[Params]] = Params
    needs_bank: ClassVar[bool] = False
    inputs: ClassVar[str] = "logits"  # what it reads, for `regcache scorers`

    def __init__(self, **params: Any):
        self.args = check_params(self.name, self.Params, params)
        self.head: Linear | None = None
        self.notes: list[str] = []

    def fit(self, bank: Bank | None, head: Linear) -> "Scorer":
        """Training statistics from ``bank`` (read in chunks); the base class keeps the head and clears the notes."""
        if self.needs_bank and bank is None:
            raise FitError(f"scorer {self.name} needs the training features")
        self.head, self.notes = head, []
        return self

    def note(self, message: str) -> None:
        """Record a line in ``notes`` and log it as a warning (the CLI prints warnings even with -q)."""
        self.notes.append(message)
        logging.getLogger("regcache").warning(message)

    def score(self, features: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """Scores of a chunk of queries (float64 features and the head's logits); larger = more in-distribution."""
        raise NotImplementedError


def check_params(name: str, model: type[Params], given: dict[str, Any]) -> dict[str, Any]:
    """``given`` validated by the scorer's `Params` (text cast as the field's type), all its values returned;
    the first problem as one line that names the scorer, the hyperparameter and what it must be."""
    try:
        return model(**given).model_dump()
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            msg = f"scorer {name} has no hyperparameter {key!r} (it has: {', '.join(model.model_fields) or 'none'})"
        else:
            msg = f"{name}.{key}={err['input']!r}: {err['msg'][0].lower()}{err['msg'][1:]}"
        raise ValueError(msg) from None


SCORERS: dict[str, type[Scorer]] = {}


def register(cls: type[Scorer]) -> type[Scorer]:
    if cls.name in SCORERS:
        raise ValueError(f"scorer {cls.name!r} registered twice")
    SCORERS[cls.name] = cls
    return cls


def resolve(names: Sequence[str]) -> list[str]:
    """Scorer names in order, ``all`` expanded to every registered scorer; unknown names refused."""
    out: list[str] = []
    twice = sorted({n for n in names if list(names).count(n) > 1})
    if twice:
        raise ValueError(f"{', '.join(twice)} given more than once (each value counts once: give it once)")
    for n in names:
        for m in (SCORERS if n == "all" else [n]):
            if m not in SCORERS:
                raise ValueError(f"unknown scorer {m!r}{did_you_mean(m, SCORERS)}; known: {', '.join(SCORERS)} "
                                 "(or all)")
            if m not in out:
                out.append(m)
    return out


def parse_args(items: Sequence[str]) -> dict[str, dict[str, str]]:
    """``["react.percentile=0.9", …]`` → ``{"react": {"percentile": "0.9"}}``; names checked, values cast by `make`."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, eq, value = item.partition("=")
        scorer, dot, param = key.strip().partition(".")
        if not (eq and dot and scorer and param):
            raise ValueError(f"scorer argument {item!r}: expected SCORER.PARAM=VALUE, e.g. react.percentile=0.9")
        if scorer not in SCORERS:
            raise ValueError(f"scorer argument {item!r}: unknown scorer {scorer!r}; known: {', '.join(SCORERS)}")
        if param not in SCORERS[scorer].Params.model_fields:
            raise ValueError(f"scorer argument {item!r}: {scorer} has no hyperparameter {param!r} "
                             f"(it has: {', '.join(SCORERS[scorer].Params.model_fields) or 'none'})")
        if param in out.get(scorer, {}):
            raise ValueError(f"scorer argument {scorer}.{param} given more than once ({scorer}.{param}="
                             f"{out[scorer][param]} and {item!r}): give it once")
        out.setdefault(scorer, {})[param] = value.strip()
    return out


def make(name: str, **params: Any) -> Scorer:
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; known: {', '.join(SCORERS)}")
    return SCORERS[name](**params)
