"""The tables the docs show of the registries (features, model aliases, scorers, metrics), made from them.

A doc holds each between ``<!-- table:NAME -->`` and ``<!-- /table -->``; tests/test_doctables.py fails
when one differs from its registry, and ``python -m regcache.doctables DOC...`` rewrites them. The CLI's
listings (`regcache models`, `regcache scorers`) print the same rows.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Callable

from .features import FEATURES
from .models import model_facts, preprocess_for
from .ood import METRICS, SCORERS
from .registry import MODELS
from .settings import Backbone


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def features_table() -> str:
    return _table(["name", "what", "per block (`NAME@-k`)", "stored by default"],
                  [[f"`{n}`", s.description, "yes" if s.per_block else "", "yes" if s.default else ""]
                   for n, s in FEATURES.items()])


def alias_rows() -> list[list[str]]:
    """alias, timm model, eval transform, registers, patch, GFLOP per image at its crop, notes."""
    rows = []
    for name, a in MODELS.items():
        pre = preprocess_for(name)
        facts = model_facts(Backbone(model=name, random_init=0), pre.size)
        notes = [f"{k}={v}" for k, v in a.kwargs.items()] + ([a.summary] if a.summary else [])
        rows.append([name, a.timm_name, f"{pre.size} px crop of {pre.resize}", str(facts.layout.num_reg),
                     str(facts.patch_size), f"{facts.gflops:.1f}", "; ".join(notes)])
    return rows


def aliases_table() -> str:
    return _table(["alias", "timm model", "eval transform", "registers", "patch", "GFLOP/img", "notes"],
                  [[f"`{r[0]}`", f"`{r[1]}`", *r[2:]] for r in alias_rows()])


def scorer_rows() -> list[list[str]]:
    """name, what it reads, hyperparameters with their defaults, where the defaults come from, reference."""
    rows = []
    for name, cls in SCORERS.items():
        params = ", ".join(f"{k}={f.default}" for k, f in cls.Params.model_fields.items()) or "-"
        rows.append([name, cls.inputs + (" + training bank" if cls.needs_bank else ""), params, cls.defaults,
                     cls.reference])
    return rows


def scorers_table() -> str:
    return _table(["scorer", "reads", "hyperparameters", "defaults from", "reference"],
                  [[f"`{r[0]}`", r[1], f"`{r[2]}`" if r[2] != "-" else "", r[3], r[4]] for r in scorer_rows()])


def metrics_table() -> str:
    return _table(["metric", "definition", "label in reports"],
                  [[f"`{n}`", m.definition, f"`{m.label}`"] for n, m in METRICS.items()])


TABLES: dict[str, Callable[[], str]] = {"features": features_table, "aliases": aliases_table,
                                        "scorers": scorers_table, "metrics": metrics_table}
_BLOCK = re.compile(r"(<!-- table:(\w+) -->\n)(.*?)(<!-- /table -->)", re.S)


def render(text: str) -> str:
    """``text`` with every generated table made afresh from its registry."""
    return _BLOCK.sub(lambda m: f"{m[1]}{TABLES[m[2]]()}\n{m[4]}", text)


def main(paths: list[str]) -> None:
    for p in map(Path, paths):
        text = p.read_text()
        if render(text) != text:
            p.write_text(render(text))
            print(f"rewrote {p}")


if __name__ == "__main__":
    main(sys.argv[1:])
