"""No wrong number at the edges (issue 19): each case here gave a wrong number, or a traceback, with exit 0 before,
and is reproduced as the user met it, through the command line."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from regcache.cli import main

from conftest import REG, RESIZE, SIZE, make_set, make_shards


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def base(caches, out, *extra):
    train = [] if "--train" in extra else ["--train", "train"]
    return ["probe", "-m", "m", "-f", "cls", *train, "--cache", caches, "--out", out, "--iterations", 60,
            "--batch-size", 64, "-q", "--no-plots", *extra]


# --------------------------------------------------------------------------- 1: a set named like a role

def test_a_set_named_test_or_train_never_stands_in_for_that_role(caches, tmp_path):
    """An eval set *named* test and an anomaly set *named* train keep their own rows, apart from the ID test
    set and the training set (sets given by path, since by name the two 'test's would be ambiguous)."""
    roles = ["--train", caches / "train", "--val", caches / "val", "--test", caches / "test"]
    r = cli(*base(caches, tmp_path / "r", *roles, "--eval", caches / "shifted", "--anomaly", caches / "far"))
    assert r.exit_code == 0, r.output
    ref = pd.read_parquet(tmp_path / "r" / "results.parquet")
    named = ["--eval", make_named(caches, "shifted", "test"), "--anomaly", make_named(caches, "far", "train")]
    r = cli(*base(caches, tmp_path / "n", *roles, *named))
    assert r.exit_code == 0, r.output
    df = pd.read_parquet(tmp_path / "n" / "results.parquet")
    ids, evals = df[df.role == "id"], df[df.role == "ood-gen"]
    assert list(ids.set) == ["test"] and ids.n.item() == 100 and ids.value.item() == ref[ref.role == "id"].value.item()
    assert list(evals.set) == ["test"] and evals.n.item() == 80
    assert evals.value.item() == ref[ref.role == "ood-gen"].value.item()
    ano = df[(df.role == "anomaly") & (df.set == "train")]
    assert set(ano.n) == {60}
    np.testing.assert_array_equal(ano.value, ref[(ref.role == "anomaly") & (ref.set == "far")].value)
    md = (tmp_path / "n" / "results.md").read_text()
    assert "| test (ID) | test (OOD) |" in md  # two columns, never one that mixes both


def make_named(caches, src: str, name: str):
    """A copy of cached set ``src`` whose dataset is named ``name``, in a folder of its own; its path."""
    from regcache.store import FeatureSet

    fs = FeatureSet(caches / src)
    got = fs.load(concat=False)
    d = fs.meta.dataset
    made = make_set(caches / f"as-{name}", name, got.x, got.labels, classes=d.classes, subset=d.subset, role=d.role,
                    shards_of=src)  # the shards of src: the rows of src, under another name
    return made.path


# --------------------------------------------------------------------------- 4: checkpoints by their bytes

def test_a_same_size_checkpoint_with_other_weights_is_another_set_and_verify_finds_the_change(tmp_path, reg_ckpt):
    """Only the final LayerNorm changed, the file size the same: a pipeline job is not 'cached' with the old
    features, and `regcache verify` of the old set names the checkpoint."""
    import shutil

    from safetensors.torch import load_file, save_file

    from regcache.pipeline import load_pipeline, run_pipeline

    ckpt = tmp_path / "w.safetensors"
    shutil.copy(reg_ckpt, ckpt)
    make_shards(tmp_path / "s", n_shards=1, per_shard=3)
    (tmp_path / "m.yaml").write_text("name: m\nshards: s/part-000.tar\n")
    (tmp_path / "p.yaml").write_text(f"name: p\ncache: c\nout: o\nmodels: [{{model: {REG}, checkpoint: w.safetensors}}]"
                                     f"\ndatasets: [m.yaml]\nextract: {{size: {SIZE}, resize: {RESIZE}, workers: 0}}\n")
    first = run_pipeline(load_pipeline(tmp_path / "p.yaml"), progress=False, echo=lambda s: None).extract[0]
    assert cli("verify", first.path).exit_code == 0
    sd = load_file(ckpt)
    sd["norm.weight"] = sd["norm.weight"] * 2
    size = ckpt.stat().st_size
    save_file(sd, str(ckpt))
    assert ckpt.stat().st_size == size
    second = run_pipeline(load_pipeline(tmp_path / "p.yaml"), progress=False, echo=lambda s: None).extract[0]
    assert second.status == "ran" and second.path != first.path
    from regcache.store import FeatureSet

    a, b = FeatureSet(first.path).load("cls").x, FeatureSet(second.path).load("cls").x
    assert np.abs(a - b).max() > 0.1
    r = cli("verify", first.path)
    assert r.exit_code == 1 and "w.safetensors" in r.output and "other weights" in r.output, r.output


# --------------------------------------------------------------------------- 5-9: values accepted before

@pytest.mark.parametrize("extra, says", [
    (["--anomaly", "far,far"], "--anomaly: far given more than once"),                        # 5
    (["--anomaly", "far", "--anomaly", "far"], "--anomaly: far given more than once"),
    (["--lr", "inf"], "--lr[0]: Input should be a finite number"),                              # 7
    (["--wd", "inf"], "--wd[0]: Input should be a finite number"),
    (["--solver", "lbfgs", "--C", "nan"], "--C[0]: Input should be a finite number"),
    (["--solver", "lbfgs", "--tol", "inf"], "--tol: Input should be a finite number"),
])
def test_probe_refuses_values_that_report_chance_or_count_twice(caches, tmp_path, extra, says):
    r = cli(*base(caches, tmp_path / "r", "--val", "val", *extra))
    assert r.exit_code == 2 and says in r.output, r.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("command, extra, says", [
    ("knn", ["--temperature", "0"], "--temperature: Input should be greater than 0"),         # 6
    ("knn", ["--temperature", "nan"], "--temperature: Input should be a finite number"),
    ("fewshot", ["--C", "-1"], "--C: Input should be greater than 0"),                         # 8
    ("fewshot", ["--C", "nan"], "--C: Input should be a finite number"),
    ("fewshot", ["--C", "0"], "--C: Input should be greater than 0"),
    ("fewshot", ["--shots", "0"], "--shots[0]: Input should be greater than or equal to 1"),
])
def test_knn_and_fewshot_refuse_values_that_report_chance(caches, tmp_path, command, extra, says):
    r = cli(command, "-m", "m", "--train", "train", "--test", "test", "--cache", caches, "--out", tmp_path / "r",
            *extra)
    assert r.exit_code == 2 and says in r.output and "Traceback" not in r.output, r.output


def test_knn_refuses_more_neighbours_than_training_rows(caches, tmp_path):   # 9
    r = cli("knn", "-m", "m", "--train", "train", "--test", "test", "--cache", caches, "--k", "5,1000",
            "--out", tmp_path / "r")
    assert r.exit_code == 1 and "k=1000 neighbours, but train has 400 training rows" in r.output, r.output


# --------------------------------------------------------------------------- 11: one run a directory

def test_probe_refuses_a_run_directory_that_holds_files(caches, tmp_path):
    out = tmp_path / "run"
    assert cli(*base(caches, out, "--val", "val")).exit_code == 0
    before = sorted(p.name for p in out.iterdir())
    r = cli(*base(caches, out, "--val", "val", "--seed", "1"))
    assert r.exit_code == 1 and "is not empty" in r.output, r.output
    assert sorted(p.name for p in out.iterdir()) == before
    (tmp_path / "empty").mkdir()
    assert cli(*base(caches, tmp_path / "empty", "--val", "val")).exit_code == 0  # an empty one is fine


# --------------------------------------------------------------------------- 13: another writer holds shards

def test_extract_that_ends_while_another_writer_holds_shards_exits_1_naming_it(tmp_path, reg_ckpt, monkeypatch):
    import socket

    from regcache.store.writer import Claims

    data = make_shards(tmp_path / "s", n_shards=3, per_shard=2)
    other = f"{socket.gethostname()}:4242"
    monkeypatch.setattr(Claims, "take", lambda self, unit: unit != 2)  # unit 2: another live writer has it
    monkeypatch.setattr(Claims, "holders", lambda self: {2: other})
    r = cli("extract", "-m", REG, "--checkpoint", reg_ckpt, "-d", data, "--size", SIZE, "--resize", RESIZE, "-j", 0,
            "--cache", tmp_path / "c", "-q")
    assert r.exit_code == 1, r.output
    assert "incomplete: 1 of its 1 missing shards are held by pid 4242 on host" in r.output, r.output
    monkeypatch.undo()
    assert cli("extract", "-m", REG, "--checkpoint", reg_ckpt, "-d", data, "--size", SIZE, "--resize", RESIZE,
               "-j", 0, "--cache", tmp_path / "c", "-q").exit_code == 0  # once it is done: complete, exit 0


def test_json_of_an_anomaly_listed_in_a_pipeline_twice_is_refused(tmp_path):
    from regcache.pipeline import PipelineError, load_pipeline

    (tmp_path / "a.yaml").write_text("name: a\nshards: a.tar\nrole: anomaly\n")
    (tmp_path / "t.yaml").write_text("name: t\nshards: t.tar\n")
    (tmp_path / "p.yaml").write_text(json.dumps({
        "name": "p", "models": ["vits"], "datasets": ["t.yaml", "a.yaml"],
        "probes": [{"name": "x", "features": ["cls"], "train": "t", "anomaly": ["a", "a"]}]}))
    with pytest.raises(PipelineError, match=r"probes\[0\]\.anomaly: a given more than once"):
        load_pipeline(tmp_path / "p.yaml")
