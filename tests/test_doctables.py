"""The docs' tables of the registries are the registries (`regcache.doctables`), and the README's counts too."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from regcache.doctables import TABLES, render
from regcache.ood import SCORERS

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_generated_table_is_its_registry(doc):
    text = doc.read_text()
    assert render(text) == text, f"run: python -m regcache.doctables {doc.relative_to(ROOT)}"


def test_each_table_appears_in_the_docs():
    shown = {m for d in DOCS for m in re.findall(r"<!-- table:(\w+) -->", d.read_text())}
    assert shown == set(TABLES)


def test_the_readme_counts_the_registries():
    readme = (ROOT / "README.md").read_text()
    assert f"the {len(SCORERS)} OOD scorers" in readme
