"""`regcache run --schema` is what validation accepts (issue 27, item 4): every shipped pipeline and every pipeline
example in the docs validates with the `jsonschema` package, generated values are accepted by both or by neither,
and settings survive a round trip from command-line text through the model and its dump."""
from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from regcache.cli import main
from regcache.features import FEATURES
from regcache.ood import SCORERS
from regcache.pipeline.blocks import PipelineFile, ProbeBlock
from regcache.settings import ProbeSettings, SettingsError

ROOT = Path(__file__).resolve().parents[1]


def _schema() -> dict:
    r = CliRunner().invoke(main, ["run", "--schema"])
    assert r.exit_code == 0, r.output
    return json.loads(r.output)


SCHEMA = _schema()
PIPELINE = jsonschema.Draft202012Validator(SCHEMA)
#: a probe block alone, as the schema describes it
BLOCK = jsonschema.Draft202012Validator({"$defs": SCHEMA["$defs"], "$ref": "#/$defs/ProbeBlock"})


def _doc_examples():
    """Every ```yaml block of the docs whose top-level keys are pipeline fields, completed to a whole file."""
    for doc in sorted([*(ROOT / "docs").glob("*.md"), ROOT / "README.md"]):
        for i, block in enumerate(re.findall(r"```yaml\n(.*?)```", doc.read_text(), re.S)):
            data = yaml.safe_load(block)
            if isinstance(data, dict) and set(data) <= set(PipelineFile.model_fields):
                yield f"{doc.name}#{i}", {"name": "x", "models": ["vits"], "datasets": ["a.yaml"], **data}


SHIPPED = sorted([*(ROOT / "pipelines").glob("*.yaml"), ROOT / "regcache" / "pipeline" / "demo.yaml"])
EXAMPLES = dict(_doc_examples())


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_pipeline_validates_against_the_schema(path):
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in PIPELINE.iter_errors(yaml.safe_load(path.read_text()))]
    assert not errors, errors


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_pipeline_example_in_the_docs_validates(name):
    assert len(EXAMPLES) >= 2  # the file format (pipelines.md) and the launcher (scaling.md)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in PIPELINE.iter_errors(EXAMPLES[name])]
    assert not errors, errors


# --------------------------------------------------------------------------- generated values, both ways

WORDS = [*FEATURES, "cls@-2", "patch@-4", "tokens@-2", "cls@2", "clss", "cls+reg", *list(SCORERS)[:4], "all",
         "nosuch", "0.1", "1e-3", "-2", "0", "x", "last4"]
scalar = st.one_of(st.sampled_from(WORDS), st.integers(-3, 5), st.floats(-1, 10, allow_nan=False),
                   st.booleans(), st.none())
joined = st.lists(st.sampled_from(WORDS), min_size=1, max_size=3, unique=True).map(",".join)


@st.composite
def listed_words(draw):
    """A list of words and comma-joined words, no word twice (validation splits the joined ones first)."""
    words = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=4, unique=True))
    cuts = draw(st.lists(st.booleans(), min_size=len(words) - 1, max_size=len(words) - 1))
    items, item = [], [words[0]]
    for w, cut in zip(words[1:], cuts):
        if cut:
            items.append(",".join(item))
            item = []
        item.append(w)
    return items + [",".join(item)]


value = st.one_of(scalar, joined, listed_words(), st.lists(scalar, max_size=3, unique_by=repr),
                  st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=2, unique=True), max_size=2,
                           unique_by=repr))
#: list settings (one value, a comma list, or a list); scalar numbers, which validation also reads from text (the
#: command line's per-model lists) where the schema asks for a number, get no text here
LISTS = ["features", "lr", "wd", "C", "scorers", "eval", "anomaly"]
SCALARS = ["iterations", "val_fraction", "batch_size", "init_std", "momentum", "seed"]
not_text = st.one_of(st.integers(-3, 5), st.floats(-1, 10, allow_nan=False), st.booleans(), st.none(),
                     st.lists(st.integers(0, 3), max_size=2))


def _model_accepts(block: dict) -> bool:
    try:
        ProbeBlock.model_validate(block)
    except (ValueError, TypeError):  # pydantic's ValidationError is a ValueError
        return False
    return True


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fv=st.one_of(st.tuples(st.sampled_from(LISTS), value), st.tuples(st.sampled_from(SCALARS), not_text)))
def test_the_schema_accepts_a_value_exactly_when_validation_does(fv):
    """The schema of a probe block's field accepts what the settings model accepts and refuses what it refuses
    (values of other fields fixed and valid; no value given twice, which only validation counts in a comma list)."""
    field, v = fv
    block = {"name": "p", "train": "a", "features": ["cls"], field: v}
    schema_ok = BLOCK.is_valid(block)
    assert schema_ok == _model_accepts(block), (block, schema_ok)


# --------------------------------------------------------------------------- command-line text round trip

combo = st.lists(st.sampled_from(["cls", "patch", "reg", "cls@-2", "norms"]), min_size=1, max_size=3, unique=True)
numbers = st.lists(st.sampled_from([1e-4, 0.001, 0.01, 0.1, 1.0, 3.5]), min_size=1, max_size=3, unique=True)


@hsettings(max_examples=60, deadline=None)
@given(features=st.lists(combo, min_size=1, max_size=3, unique_by=frozenset), lr=numbers,
       scorers=st.lists(st.sampled_from(list(SCORERS)), min_size=1, max_size=3, unique=True),
       seed=st.integers(0, 99), k=st.integers(1, 200))
def test_settings_round_trip_from_command_line_text(features, lr, scorers, seed, k):
    """CLI text -> model -> JSON dump -> model: the same settings (what a run records is what it ran)."""
    args = ["-m", "m", "--train", "a", "--test", "b", "--lr", ",".join(map(str, lr)), "--scorers", ",".join(scorers),
            "--seed", str(seed), "--scorer-arg", f"knn.k={k}"]
    for c in features:
        args += ["-f", ",".join(c)]
    cmd = main.commands["probe"]
    ctx = cmd.make_context("probe", args)
    from regcache.cli.options import settings as from_cli

    with ctx:
        s = from_cli(ProbeSettings, ctx.params)
    again = ProbeSettings.model_validate(json.loads(s.model_dump_json()))
    assert again == s
    assert s.scorer_args == {"knn": {"k": k}} and s.lr == lr and [list(c) for c in s.features] == features


def test_a_preset_fills_a_pipeline_block_as_it_fills_the_command():
    block = {"name": "p", "train": "a", "test": "b", "preset": "dinov2-linear"}
    assert _model_accepts(block)
    assert BLOCK.is_valid(block) and not BLOCK.is_valid({k: v for k, v in block.items() if k != "preset"})
    with pytest.raises(SettingsError, match="features"):
        ProbeSettings.make({"model": "m", "train": "a"})
