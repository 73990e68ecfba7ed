"""From the demo to the researcher's own data, second round (issue 29): each wrong turn a new user met, as a test."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from regcache.cli import main

from conftest import make_set

ROOT = Path(__file__).resolve().parents[1]


def cli(*args, code=0):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == code, r.output
    return r


def probe(cache, out, *extra, train="train", code=0):
    return cli("probe", "-m", "m", "-f", "cls", "--train", train, "--test", "test", "--cache", cache, "--lr", "0.1",
               "--iterations", "30", "--batch-size", "64", "--out", out, "--no-plots", "-q", *extra, code=code)


def test_a_run_reads_its_sets_however_they_were_named(caches, tmp_path):
    """The training set named by its dataset name, by its name as `ls` prints it, and by its path; then `score` and
    `report` of each run (score re-matched the name and failed for the last two)."""
    nested = make_set(caches / "digits", "train2", *FeatureSet_x(caches, "train"), classes=["a", "b", "c", "d"],
                      role="id-train", shards_of="digits-train")
    for ref, out in (("train2", "by-name"), ("digits/train2", "by-ls-name"), (str(nested.path), "by-path")):
        probe(caches, tmp_path / out, train=ref)
        r = cli("score", tmp_path / out, "--anomaly", "far", "--out", tmp_path / f"{out}-score", "-q")
        assert "far" in r.output
    r = cli("report", *(tmp_path / o for o in ("by-name", "by-ls-name", "by-path")))
    assert "test (ID)" in r.output


def FeatureSet_x(caches, name):
    from regcache.store import FeatureSet

    got = FeatureSet(caches / name).load(concat=False)
    return got.x, got.labels


def test_rm_and_gc_keep_what_a_run_reads(caches, tmp_path):
    from regcache.store import FeatureSet

    probe(caches, tmp_path / "run")  # reads train and test
    r = cli("rm", "train", "-m", "m", "--cache", caches)
    assert "kept" in r.output and "--force" in r.output and (caches / "train").is_dir()
    r = cli("rm", "far", "--cache", caches, "--dry-run")
    assert "would remove" in r.output and (caches / "far").is_dir()
    cli("rm", "far", "--cache", caches)
    assert not (caches / "far").exists()
    empty = FeatureSet.create(caches / "ds" / "empty", {"model": "x"}, _record())  # its model failed, say
    r = cli("gc", "--cache", caches)
    assert str(empty.path) in r.output and "empty" in r.output and "--delete removes" in r.output
    assert empty.path.is_dir()
    r = cli("gc", "--cache", caches, "--unreferenced")
    assert str(caches / "shifted") in r.output and str(caches / "train") not in r.output  # a run reads train
    cli("gc", "--cache", caches, "--delete")
    assert not empty.path.exists() and (caches / "shifted").is_dir()
    shutil.rmtree(tmp_path / "run")  # its run removed: nothing reads train any more
    cli("rm", "train", "-m", "m", "--cache", caches)
    assert not (caches / "train").exists()


def _record():
    from conftest import PROBE_LAYOUT, record

    return record(["cls"], PROBE_LAYOUT, "float32", 4, 2, "empty")


def test_the_demo_says_how_to_run_the_command_in_the_users_shell(monkeypatch, tmp_path):
    import regcache.demo as demo

    monkeypatch.setattr(demo.sys, "argv", [".venv/bin/regcache", "demo"])
    monkeypatch.setattr(demo.shutil, "which", lambda name: None)  # not on PATH: the venv is not activated
    assert demo.command_name() == ".venv/bin/regcache"
    steps = demo.next_steps(None, demo.command_name())
    assert "  .venv/bin/regcache ls" in steps and "source .venv/bin/activate" in steps
    exe = tmp_path / "regcache"
    exe.write_text("")
    monkeypatch.setattr(demo.sys, "argv", [str(exe), "demo"])
    monkeypatch.setattr(demo.shutil, "which", lambda name: str(exe))  # on PATH, this very program
    assert demo.command_name() == "regcache"


def test_every_check_comes_before_any_head_trains(caches, tmp_path, monkeypatch):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.txt").write_text("a run's file")
    monkeypatch.setattr("regcache.probe.run.fit_heads", lambda *a, **k: pytest.fail("trained before refusing"))
    r = probe(caches, tmp_path / "full", code=1)
    assert "is not empty" in r.output
    r = cli("probe", "-m", "m", "-f", "cls+reg", "--train", "train", "--cache", caches, code=2)
    assert "cls,reg" in r.output and "comma" in r.output


def test_ambiguous_names_say_what_differs(caches, tmp_path):
    x, y = FeatureSet_x(caches, "shifted")  # the same name extracted twice, from 80 and from 60 images
    for folder, n in (("one", 80), ("two", 60)):
        make_set(caches / folder, "shifty", {k: v[:n] for k, v in x.items()}, y[:n], classes=["a", "b", "c", "d"],
                 role="ood-gen", shards_of=f"shifty-{n}")
    r = probe(caches, tmp_path / "r", "--eval", "shifty", code=1)
    assert "differ in data (80 rows" in r.output and "60 rows" in r.output, r.output


def test_data_given_as_a_folder_names_its_manifest(tmp_path):
    from regcache.data import DataError, load_dataset

    (tmp_path / "digits-train").mkdir()
    (tmp_path / "digits-train" / "digits-train.yaml").write_text("name: d\nshards: x.tar\n")
    with pytest.raises(DataError, match=r"is a folder: pass its manifest: .*digits-train.yaml"):
        load_dataset(tmp_path / "digits-train")


def test_a_manifest_with_an_unset_variable_finds_its_set_by_name(caches, tmp_path, monkeypatch):
    monkeypatch.delenv("NOT_SET_HERE", raising=False)
    m = tmp_path / "shifted.yaml"
    m.write_text("name: shifted\nrole: ood-gen\nshards: ${NOT_SET_HERE}/s-{000..001}.tar\nclasses: [a, b, c, d]\n")
    r = probe(caches, tmp_path / "run", "--eval", m)
    assert "shifted" in r.output
    m2 = tmp_path / "nowhere.yaml"
    m2.write_text("name: nowhere\nshards: ${NOT_SET_HERE}/s.tar\n")
    r = probe(caches, tmp_path / "run2", "--eval", m2, code=1)
    assert "no complete feature set of 'nowhere'" in r.output and "NOT_SET_HERE" in r.output


def test_a_pipeline_whose_shards_are_elsewhere_says_which_variable_points_there(tmp_path):
    from regcache.pipeline import PipelineError, load_pipeline, run_pipeline

    (tmp_path / "m.yaml").write_text("name: m\nshards: ${DATA}/m-{000..001}.tar\n")
    (tmp_path / "p.yaml").write_text("name: p\nvars: {DATA: /nowhere/shards}\ndatasets: [m.yaml]\n"
                                     "models: [{model: vits, random_init: 0, model_args: {depth: 1}}]\n")
    with pytest.raises(PipelineError, match=r"DATA=/nowhere/shards.*--set vars.NAME=PATH.*make extract ARGS"):
        run_pipeline(load_pipeline(tmp_path / "p.yaml"), stages=("extract",), progress=False, echo=lambda s: None)


def test_one_head_per_combination_trains_on_every_training_row(caches, tmp_path):
    probe(caches, tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["protocol"]["held_out"] is None and config["protocol"]["selection_set"] is None
    md = (tmp_path / "run" / "results.md").read_text()
    assert "no selection" in md and "held-out" not in md
    probe(caches, tmp_path / "grid", "--lr", "0.1,0.3")  # two heads: selected on a held-out part
    assert json.loads((tmp_path / "grid" / "config.json").read_text())["protocol"]["held_out"]["fraction"] == 0.1


def test_report_labels_roles_averages_the_same_sets_and_draws_the_table(caches, tmp_path):
    probe(caches, tmp_path / "a", "--eval", "shifted", "--anomaly", "far,single")
    probe(caches, tmp_path / "b", "--anomaly", "far")  # a run without 'single'
    assert (tmp_path / "a" / "results.csv").is_file()
    r = cli("report", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "rep", "--plot")
    head = next(line for line in r.output.splitlines() if line.startswith("| model | features | test"))
    assert "test (ID)" in head and "shifted (OOD)" in head
    rows = [line for line in r.output.splitlines() if line.startswith("| m (") and "| msp |" in line]
    assert len(rows) == 2
    b = next(line for line in rows if "(b)" in line)
    assert b.split("|")[-2].strip() == "", b  # its mean over far and single: none (it has no 'single')
    assert (tmp_path / "rep" / "report.png").is_file() and (tmp_path / "rep" / "results.csv").is_file()


def test_the_demos_own_settings_raise_no_warning():
    import yaml

    from regcache.demo import DemoSizes

    demo = yaml.safe_load((ROOT / "regcache" / "pipeline" / "demo.yaml").read_text())
    (table,) = demo["probes"]
    rows = 9 * DemoSizes().train_per_class  # 90% of the training images: the rest selects
    assert table["iterations"] * table["batch_size"] / rows <= 200  # minibatch.py warns past 200 passes


def test_make_says_what_it_is_doing():
    text = (ROOT / "Makefile").read_text()
    assert "@echo" in text and "minutes" in text
