"""Pipelines (issue 11): a small pipeline end to end, reruns that do nothing, resume after an interruption,
the shipped pipelines' plans, and refusals that name the file and the field."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import REG, RESIZE, SIZE
from regcache.pipeline import PipelineError, load_pipeline, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["t-shirt", "trouser", "pullover"]


def _images(split: str, n_per_class: int, skip: int = 0):
    """Fashion-MNIST images of three classes (the demo's source), or random images where it is missing."""
    try:
        from regcache.demo import fashion_mnist, per_class

        x, y = fashion_mnist(split)
        idx = per_class(y, n_per_class, skip, classes=range(3))
        return [(f"{split}{i:05d}", x[i], int(y[i])) for i in idx]
    except Exception:
        rng = np.random.default_rng(skip)
        return [(f"{split}{i:05d}", rng.integers(0, 256, (28, 28), dtype=np.uint8), i % 3)
                for i in range(3 * n_per_class)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, reg_ckpt) -> Path:
    """Three small sets (train in 2 shards, test, anomaly textures) and a pipeline over them."""
    from regcache.demo import texture_crops
    from regcache.shards import write_set

    root = tmp_path_factory.mktemp("pipeline")
    sets = {"tiny-train": ("id-train", _images("train", 6), 9), "tiny-test": ("id-val", _images("test", 3), 9),
            "tiny-tex": ("anomaly", [(f"tex{i}", t, None) for i, t in enumerate(texture_crops(6, size=32))], 9)}
    for name, (role, items, per) in sets.items():
        extra = {"classes": CLASSES} if role != "anomaly" else {}
        write_set(root / "data" / name, name, items, len(items), per, role=role, image="png", **extra)
    (root / "tiny.yaml").write_text(f"""
name: tiny
vars: {{DATA: data}}
cache: cache
out: ${{OUT}}
models:
  - {{name: {REG}, checkpoint: {reg_ckpt}}}
datasets:
  - ${{DATA}}/tiny-train/tiny-train.yaml
  - ${{DATA}}/tiny-test/tiny-test.yaml
  - ${{DATA}}/tiny-tex/tiny-tex.yaml
extract: {{size: {SIZE}, resize: {RESIZE}, batch_size: 8, workers: 0, precision: fp32}}
probes:
  - name: p
    features: [cls, "cls,patch", "cls,reg"]
    train: tiny-train
    test: tiny-test
    anomaly: [tiny-tex]
    scorers: [msp, energy]
    lr: [0.01, 0.1]
    iterations: 20
    batch_size: 8
    plots: false
    augmented: true
analyses:
  - {{name: norms, kind: norms, datasets: [tiny-test]}}
""")
    return root


def _statuses(out: Path) -> dict[str, list[str]]:
    rec = json.loads((out / "pipeline.json").read_text())
    return {k: [j["status"] for j in rec[k]] for k in ("extract", "probes", "analyses")}


def _run(tiny: Path, out: str, **kw):
    pl = load_pipeline(tiny / "tiny.yaml", {"vars.OUT": out, **kw.pop("overrides", {})})
    return run_pipeline(pl, progress=False, echo=kw.pop("echo", lambda s: None), **kw)


def test_end_to_end_then_rerun_does_nothing(tiny, monkeypatch):
    from regcache.extract import extract
    from regcache.probe import run_probe

    said = []
    run = _run(tiny, "out1", overrides={"probes.p.seed": 3}, echo=said.append)
    out = tiny / "out1"
    # the block names an augmented protocol, and tiny-train was extracted with one view
    assert any(s.startswith("warning: probe") and "plain crop only" in s for s in said), said
    assert _statuses(out) == {"extract": ["ran"] * 3, "probes": ["ran"], "analyses": ["ran"]}
    rec = json.loads((out / "pipeline.json").read_text())
    assert rec["overrides"] == {"vars.OUT": "out1", "probes.p.seed": 3} and rec["finished"]
    assert len(rec["text_sha256"]) == 64 and rec["versions"]["regcache"]
    assert all(j["fingerprint"] and Path(j["path"]).is_dir() for j in rec["extract"])
    assert "| " + REG in (out / "report.md").read_text()
    (job,) = run.probes
    assert (job.run / "results.md").read_text() in (out / "report.md").read_text()

    # the same sets and numbers as the hand-typed commands (the API the CLI calls)
    j = run.extract[0]
    res = extract(j.config(tiny / "cache", progress=False))
    assert res.reused and str(res.path) == j.path
    from regcache.pipeline.run import probe_call

    pj, cfg = probe_call(job, run.pipeline)
    assert (pj.train, pj.test, pj.anomaly, cfg.lrs, cfg.iterations, cfg.seed) == \
        ("tiny-train", "tiny-test", ["tiny-tex"], (0.01, 0.1), 20, 3)
    again = run_probe(pj, cfg, progress=False).results
    import pandas as pd

    pd.testing.assert_frame_equal(again, pd.read_parquet(job.run / "results.parquet"))

    # a rerun loads no backbone and trains no head: both would fail here
    def refuse(*a, **k):
        raise AssertionError("a finished pipeline did work again")

    monkeypatch.setattr("regcache.extract.run.load_model", refuse)
    monkeypatch.setattr("regcache.probe.run.fit_heads", refuse)
    _run(tiny, "out1", overrides={"probes.p.seed": 3})
    assert _statuses(out) == {"extract": ["cached"] * 3, "probes": ["cached"], "analyses": ["cached"]}
    # a changed probe setting is a new probe job, the sets stay cached
    monkeypatch.undo()
    _run(tiny, "out1", overrides={"probes.p.seed": 4}, stages=("extract", "probe"))
    assert _statuses(out)["extract"] == ["cached"] * 3 and _statuses(out)["probes"] == ["ran"]


def test_interrupted_run_does_only_what_is_missing(tiny):
    class Killed(Exception):
        pass

    done = []

    def kill_after_two(job):
        done.append(job)
        if len(done) == 2:
            raise Killed

    with pytest.raises(Killed):
        _run(tiny, "out2", overrides={"cache": "cache2", "analyses": []}, after_job=kill_after_two)
    assert _statuses(tiny / "out2")["extract"] == ["ran", "ran", "to do"]
    _run(tiny, "out2", overrides={"cache": "cache2", "analyses": []})
    assert _statuses(tiny / "out2") == {"extract": ["cached", "cached", "ran"], "probes": ["ran"], "analyses": []}


def test_two_entries_of_one_model_keep_their_own_sets(tiny, reg_ckpt):
    """One model twice (plain, and with block features), told apart by label: each probe reads the sets its own
    entry made, although a lookup by model name alone would find two candidates for every dataset."""
    models = [{"name": REG, "checkpoint": str(reg_ckpt)},
              {"name": REG, "label": "reg-blocks", "checkpoint": str(reg_ckpt), "extract": {"layers": [-2]}}]
    run = _run(tiny, "out-labels", overrides={"cache": "cache-labels", "analyses": [], "models": models})
    assert _statuses(tiny / "out-labels") == {"extract": ["ran"] * 6, "probes": ["ran", "ran"], "analyses": []}
    made = {(j.model.label, j.dataset.name): j.path for j in run.extract}
    assert len(set(made.values())) == 6
    for job in run.probes:
        used = json.loads((job.run / "config.json").read_text())["sets"]  # what the probe read, by role
        assert (used["train"], used["test"], used["tiny-tex"]) == \
            tuple(made[(job.model.label, n)] for n in ("tiny-train", "tiny-test", "tiny-tex"))
    report = (tiny / "out-labels" / "report.md").read_text()
    assert "| reg-blocks " in report and f"| {REG} " in report


def test_paper_table1_dry_run_lists_88_extractions(monkeypatch):
    from regcache.cli import main

    def refuse(*a, **k):
        raise AssertionError("a dry run loaded a model")

    monkeypatch.setattr("regcache.extract.run.load_model", refuse)
    monkeypatch.setattr("regcache.models.load_model", refuse)
    res = CliRunner().invoke(main, ["run", str(ROOT / "pipelines" / "paper-table1.yaml"), "--dry-run"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert "extraction jobs: 88 (" in res.output
    assert sum(1 for s in lines if "GFLOP = " in s) == 88
    assert "device-hours at 396 TFLOP/s" in res.output
    assert "probe jobs: 8" in res.output
    assert next(s for s in lines if "table1 × vitl_reg" in s).count("[") == 4  # [CLS;muR] for registers only
    assert next(s for s in lines if "table1 × vitl " in s).count("[") == 2


def test_registers_study_plans():
    run = run_pipeline(load_pipeline(ROOT / "pipelines" / "registers-study.yaml", allow_unset=True), dry_run=True,
                       echo=lambda s: None)
    assert len(run.extract) == 27 and len(run.probes) == 9  # S/B/L: plain, trained registers, test-time registers
    ttr = {j.model.label: j for j in run.probes if j.model.label.endswith("_ttr")}
    assert set(ttr) == {"vits_ttr", "vitb_ttr", "vitl_ttr"} and all(("cls", "reg") in j.combos for j in ttr.values())
    plain = next(j for j in run.probes if j.model.label == "vits")
    assert ("cls", "reg") not in plain.combos  # a model without registers skips the register combinations
    keys = {j.model.label: j.key for j in run.extract if j.dataset.name == "imagenet1k-val"}
    assert keys["vits"] != keys["vits_ttr"]  # the test-time registers are part of the extraction's identity
    assert {k.kind for k in (a.spec for a in run.analyses)} == {"norms", "featuremap", "tokenprobe", "attention"}


@pytest.mark.parametrize("edit, field", [
    ({"probes.p.trian": "x"}, "probes[0]"),                       # unknown field
    ({"probes.p.train": "imagenet"}, "probes[0].train"),          # not a dataset of the pipeline
    ({"extract.precision": "bf8"}, "extract.precision"),
    ({"probes.p.iterations": "many"}, "probes[0].iterations"),
    ({"probes.p.test": None}, "probes[0].test"),                  # an lr grid needs a separate test set
    ({"probes.p.features": ["cls,nope"]}, "probes[0].features[0]"),
    ({"models": [{"name": "x", "weights": "y"}]}, "models[0]"),
    ({"report.tables": ["q"]}, "report.tables"),
    ({"probes.p.scorer_args": {"react": {"percentile": 2}}}, "probes[0].scorer_args"),  # out of range
    ({"probes.p.scorer_args": {"react": {"k": 2}}}, "probes[0].scorer_args"),           # no such parameter
    ({"models": [{"name": "a"}, {"name": "a"}]}, "models"),                              # one model twice, no labels
])
def test_malformed_pipeline_is_refused_naming_the_field(tiny, edit, field):
    with pytest.raises(PipelineError) as e:
        load_pipeline(tiny / "tiny.yaml", {"vars.OUT": "x", **edit})
    assert str(tiny / "tiny.yaml") in str(e.value) and f"field '{field}" in str(e.value)


def test_scorers_all_and_scorer_args_reach_the_probe(tiny):
    from regcache.ood import SCORERS
    from regcache.pipeline.jobs import probe_jobs
    from regcache.pipeline.run import probe_call

    pl = load_pipeline(tiny / "tiny.yaml", {"vars.OUT": "x", "probes.p.scorers": ["all"],
                                            "probes.p.scorer_args": {"react": {"percentile": 0.8}}})
    (job,) = probe_jobs(pl, [])
    pj, _ = probe_call(job, pl)
    assert pj.scorer_args == {"react": {"percentile": 0.8}} and pj.scorers == ("all",)
    from regcache.ood import resolve

    assert resolve(pj.scorers) == list(SCORERS)


def test_unset_variable_and_missing_manifest_are_named(tiny):
    with pytest.raises(PipelineError, match=r"\$\{OUT\} \(field 'out'\)"):
        load_pipeline(tiny / "tiny.yaml")
    with pytest.raises(PipelineError, match=r"field 'datasets\[0\]\.manifest'"):
        load_pipeline(tiny / "tiny.yaml", {"vars.OUT": "x", "vars.DATA": "elsewhere"})


def test_submitit_local_array_per_extraction(tiny):
    """launcher.kind local: submitit's local executor runs each extraction as an array of parts, then finalize."""
    pytest.importorskip("submitit")
    overrides = {"cache": "cache3", "launcher": {"kind": "local", "parts": 2, "params": {"timeout_min": 10}},
                 "datasets": ["${DATA}/tiny-train/tiny-train.yaml"], "probes": [], "analyses": []}
    run = _run(tiny, "out3", overrides=overrides, stages=("extract",))
    (job,) = run.extract
    assert job.status == "ran" and any((tiny / "out3" / "submitit").iterdir())
    from regcache.store import FeatureSet

    fs = FeatureSet(job.path)  # two shards, one per part, both committed and indexed
    assert fs.complete and len(fs.index) == 18 and fs.committed_units() == {0, 1}
    assert sorted(fs.index.shard.unique()) == ["tiny-train-000000.tar", "tiny-train-000001.tar"]
    _run(tiny, "out3", overrides=overrides, stages=("extract",))
    assert _statuses(tiny / "out3")["extract"] == ["cached"]
