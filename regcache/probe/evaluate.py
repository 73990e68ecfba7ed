"""Evaluating a head: ID and OOD-generalisation top-1, and every scorer's detection metrics per anomaly set with
their means (docs/design.md, "Probing" and "OOD metrics"), as rows of the long results table."""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .. import ood
from ..ood.fit import BankSource
from .data import ProbeError, Split
from .head import Head, accuracy

log = logging.getLogger("regcache")


@dataclass
class Row:
    """One number of the long results table."""

    features: str
    set: str
    role: str
    metric: str
    value: float
    n: int
    scorer: str = ""
    lr: float = float("nan")
    wd: float = float("nan")
    scorer_args: str = ""  # the scorer's hyperparameters (JSON), defaults included
    iterations: int = -1   # selection rows: the iterations the head trained (an lbfgs head's own count)
    split: str = ""        # anomaly rows: the set's manifest split where it groups means (near-ood, far-ood, ood-val)
    note: str = ""         # how the number was made (a scorer's notes), or why there is none ("skipped: ...")


def evaluate(head: Head, id_split: Split, ood_gen: list[Split], anomalies: list[Split],
             scorers: Sequence[str], bank: "BankSource | None" = None, scorer_args: dict | None = None,
             scores_out: dict | None = None, device: str = "cpu", groups: dict[str, str] | None = None) -> list[Row]:
    """ID and OOD accuracy, and per-anomaly-set metrics (`ood.METRICS`) for every scorer, plus their means:
    over all anomaly sets (set ``mean``) and over each group of ``groups`` (set ``mean near-ood``, …); a set
    of the OOD validation split (``ood-val``, for choosing hyperparameters) is reported alone, in no mean.

    ``scorer_args``: hyperparameters by scorer name (``{"react": {"percentile": 0.9}}``); each row records
    the scorer's full set. Feature scorers fit on ``bank(head.features, device)``, streamed in chunks.
    A scorer that cannot fit on this head's training features, or gives non-finite scores, is skipped alone:
    its rows hold NaN and say why (``note``), and so do the means over the sets it could not score.
    """
    f, hp = head.name, dict(lr=head.lr, wd=head.wd)
    rows = [Row(f, id_split.name, "id", "top1", accuracy(head.logits(id_split), id_split.labels, id_split.subset),
               len(id_split), **hp)]
    for s in ood_gen:
        rows.append(Row(f, s.name, "ood-gen", "top1", accuracy(head.logits(s), s.labels, s.subset), len(s), **hp))
    if not anomalies:
        return rows
    fitted, skipped = _scorers(head, scorers, bank, scorer_args or {}, device)
    args = {name: json.dumps(sc.args, sort_keys=True) for name, sc in fitted.items()}
    id_scores = {}
    for name, sc in fitted.items():
        try:
            id_scores[name] = _score(sc, head, id_split)
        except ood.FitError as e:  # a scorer that cannot apply to these features (a percentile of too few)
            skipped[name] = f"cannot score [{f}]: {e}"
            continue
        if not np.isfinite(id_scores[name]).all():
            skipped[name] = f"{_non_finite(id_scores[name])} on the ID set {id_split.name}"
    per: dict[tuple[str, str, str], list[tuple[float, int]]] = {}
    for s in anomalies:
        group = (groups or {}).get(s.name)
        means = [] if group == OOD_VALIDATION else ["mean"] + ([f"mean {group}"] if group else [])
        for name in ood.resolve(scorers):
            o = _score(fitted[name], head, s) if name not in skipped else None
            why = skipped.get(name) or (f"{_non_finite(o)} on {s.name}" if not np.isfinite(o).all() else None)
            note = (f"skipped: {name} on [{f}]: {why}" if why else "; ".join(fitted[name].notes))
            if why:
                log.warning("warning: %s", note)
            elif scores_out is not None:
                scores_out[(f, s.name, name)] = (id_scores[name], o)
            for metric, m in ood.METRICS.items():
                v = float("nan") if why else m(id_scores[name], o)
                rows.append(Row(f, s.name, "anomaly", metric, v, len(s), name, **hp, scorer_args=args.get(name, ""),
                                split=group or "", note=note))
                for mean in means:
                    per.setdefault((mean, name, metric), []).append((v, len(s)))
    for (mean, name, metric), got in per.items():
        gaps = sum(np.isnan(v) for v, _ in got)
        rows.append(Row(f, mean, "anomaly", metric, float(np.mean([v for v, _ in got])), sum(n for _, n in got),
                        name, **hp, scorer_args=args.get(name, ""),
                        note=f"skipped: {name} on [{f}] could not score {gaps} of the {len(got)} sets" if gaps else ""))
    return rows


def _non_finite(scores: np.ndarray) -> str:
    return f"{int((~np.isfinite(scores)).sum())} of its {len(scores)} scores are NaN or inf"


def _scorers(head: Head, names: Sequence[str], bank: "BankSource | None", args: dict,
             device: str) -> tuple[dict, dict[str, str]]:
    """Each scorer made with its arguments and fitted once for this head (the bank read only if one needs it), and
    the reason of each that cannot fit on this head's training features (it is skipped, the others go on)."""
    lin = ood.Linear(head.weight.numpy(), head.bias.numpy())
    made = {name: ood.make(name, **args.get(name, {})) for name in ood.resolve(names)}
    need = [n for n, sc in made.items() if sc.needs_bank]
    if need and bank is None:
        raise ProbeError(f"scorers {', '.join(need)} need the training features")
    b = bank(head.features, device) if need else None
    fitted, skipped = {}, {}
    for name, sc in made.items():
        try:
            fitted[name] = sc.fit(b, lin)
        except (ood.FitError, np.linalg.LinAlgError) as e:  # degenerate training features, not a bug
            skipped[name] = f"cannot fit on the training features of {b.name if b is not None else 'the head'}: {e}"
    return fitted, skipped


def _score(scorer: "ood.Scorer", head: Head, split: Split, chunk: int = 8192) -> np.ndarray:
    """A fitted scorer's scores of a split, a chunk of rows at a time in float64 (features, and the head's
    logits over all its classes: anomaly sets have no class subset)."""
    out = []
    with np.errstate(divide="ignore", invalid="ignore"):  # non-finite scores are reported by name (`evaluate`)
        for i in range(0, len(split), chunk):
            x = split.combo(head.features, np.arange(i, min(i + chunk, len(split)))).numpy().astype(np.float64)
            out.append(scorer.score(x, scorer.head(x)))
    return np.concatenate(out)


OOD_GROUPS = ("near-ood", "far-ood")  # manifest splits whose anomaly sets get their own mean, as OpenOOD reports
OOD_VALIDATION = "ood-val"            # the manifest split of OOD validation sets: in no mean
OOD_SPLITS = (*OOD_GROUPS, OOD_VALIDATION)


