"""Stage 2: heads against scikit-learn, one-pass training against one-at-a-time, the run end to end."""
from __future__ import annotations


import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from regcache.cli import main
from regcache.probe import Split, accuracy, load_heads, predict, train_heads
from regcache.settings import Training
from regcache.store import FeatureSet

from conftest import PROBE_LAYOUT, make_set, relabel



def split(x: np.ndarray, y: np.ndarray, name: str = "s", feature: str = "cls") -> Split:
    return Split(name, {feature: x.astype(np.float16)}, y, np.array([f"k{i}" for i in range(len(y))]),
                 np.zeros(len(y), np.int16))


def test_subset_masking_changes_the_argmax():
    logits = np.array([[5.0, 1.0, 2.0, 0.0],   # full argmax 0; among {1, 2}: 2
                       [0.0, 3.0, 1.0, 9.0]])  # full argmax 3; among {1, 2}: 1
    subset = np.array([1, 2])
    assert predict(logits).tolist() == [0, 3]
    assert predict(logits, subset).tolist() == [2, 1]
    assert accuracy(logits, np.array([2, 1]), subset) == 1.0 and accuracy(logits, np.array([2, 1])) == 0.0


def test_linearly_separable_features_reach_99_percent():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 2000)
    x = rng.normal(size=(2000, 16)) * 0.3 + np.eye(5, 16)[y] * 3
    heads = train_heads(split(x, y), 5, Training(features=[("cls",)], iterations=300, batch_size=256, lr=(0.1,)))
    assert accuracy(heads[0].logits(split(x, y)), y) >= 0.99


def test_accuracy_within_one_point_of_sklearn_logistic_regression_on_digits():
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(y))
    tr, te = perm[:1200], perm[1200:]
    sk = LogisticRegression(max_iter=5000).fit(x[tr], y[tr]).score(x[te], y[te])
    # sklearn minimises C * sum(CE) + |w|^2 / 2, i.e. mean(CE) + |w|^2 / (2 C n): weight decay 1 / (C n)
    cfg = Training(features=[("cls",)], optimizer="sgd", lr=(0.3,), wd=(1 / len(tr),), iterations=1500,
                      batch_size=256)
    head = train_heads(split(x[tr], y[tr]), 10, cfg)[0]
    ours = accuracy(head.logits(split(x[te], y[te])), y[te])
    assert ours >= sk - 0.01, (ours, sk)


def test_many_heads_in_one_pass_equal_heads_trained_one_at_a_time():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 500)
    s = Split("s", {"cls": rng.normal(size=(500, 6)).astype(np.float16),
                    "reg": (rng.normal(size=(500, 5)) + y[:, None]).astype(np.float16)},
              y, np.arange(500).astype(str), np.zeros(500, np.int16))
    combos, lrs, wds = [("cls",), ("cls", "reg")], (0.01, 0.1), (0.0, 1e-3)
    together = train_heads(s, 3, Training(features=combos, lr=lrs, wd=wds, iterations=50, batch_size=64, seed=3))
    alone = [h for c in combos for lr in lrs for wd in wds
             for h in train_heads(s, 3, Training(features=[c], lr=(lr,), wd=(wd,), iterations=50, batch_size=64,
                                                    seed=3))]
    assert len(together) == len(alone) == 8
    for a, b in zip(together, alone):
        assert (a.features, a.lr, a.wd) == (b.features, b.lr, b.wd)
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.bias, b.bias, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(together[0].weight, together[1].weight)  # the lrs really differ


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_stacked_optimiser_equals_torch_optim(optimizer):
    """One head against nn.Linear trained by torch.optim (SGD + CosineAnnealingLR, or AdamW): same zero init,
    same batches, same loss; the weights agree to float32 rounding."""
    rng = np.random.default_rng(4)
    y = rng.integers(0, 4, 300)
    x = (rng.normal(size=(300, 7)) + y[:, None]).astype(np.float16)
    s = split(x, y)
    iters, lr, wd = 40, (0.05 if optimizer == "sgd" else 0.01), 1e-2
    cfg = Training(features=[("cls",)], lr=(lr,), wd=(wd,), optimizer=optimizer, iterations=iters,
                      batch_size=32, seed=5)
    ours = train_heads(s, 4, cfg)[0]

    lin = torch.nn.Linear(7, 4)
    torch.nn.init.zeros_(lin.weight), torch.nn.init.zeros_(lin.bias)
    if optimizer == "sgd":
        opt = torch.optim.SGD(lin.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    else:
        opt = torch.optim.AdamW(lin.parameters(), lr=lr, weight_decay=wd, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters)
    batches = s.batches(32, torch.Generator().manual_seed(5), torch.device("cpu"))  # the same batch order
    for _ in range(iters):
        xb, yb = next(batches)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(xb["cls"].float()), yb).backward()
        opt.step()
        sched.step()
    torch.testing.assert_close(ours.weight, lin.weight.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.bias, lin.bias.detach(), rtol=1e-4, atol=1e-5)
    assert lin.weight.abs().max() > 0.05  # it really trained


# --------------------------------------------------------------------------- a whole run on hand-made caches
# (the `caches` fixture, in conftest.py: train in 8 shards, val, a shifted class-subset set, anomalies)

def test_probe_run_end_to_end(caches, tmp_path):
    out = tmp_path / "run"
    args = ["probe", "-m", "m", "-f", "cls", "-f", "cls,reg", "--train", "train", "--val", "val", "--test", "test",
            "--eval", "shifted", "--anomaly", "far,single", "--cache", str(caches), "--out", str(out),
            "--lr", "0.01,0.1", "--iterations", "200", "--batch-size", "64", "--scorers",
            "msp,energy,maxlogit,knn,mahalanobis,vim", "--scorer-arg", "knn.k=5", "-q"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    for f in ("results.parquet", "results.md", "heads.safetensors", "config.json"):
        assert (out / f).is_file()
    pngs = list((out / "plots").glob("*.png"))
    assert len(pngs) == 2 * 2 * 2 and all(p.stat().st_size > 1000 for p in pngs)
    df = pd.read_parquet(out / "results.parquet")
    assert {"model", "features", "set", "metric", "scorer", "value", "n", "seed"} <= set(df.columns)
    assert len(df[df.role == "selection"]) == 4  # 2 combinations x 2 learning rates

    # recompute from the saved heads and the cached features, independently of the run
    heads = {h.name: h for h in load_heads(out / "heads.safetensors")}
    test = FeatureSet(caches / "test").load("cls,reg")
    far = FeatureSet(caches / "far").load("cls,reg")
    shifted = FeatureSet(caches / "shifted").load("cls,reg")
    h = heads["cls,reg"]
    logit = lambda x: x @ h.weight.numpy().T + h.bias.numpy()  # noqa: E731
    got = df[(df.features == "cls,reg") & (df.role != "selection")].set_index(["set", "metric", "scorer"]).value
    assert "val" not in set(got.index.get_level_values("set"))  # the selection set reports nothing
    assert got["test", "top1", ""] == pytest.approx(np.mean(logit(test.x).argmax(1) == test.labels))
    z = logit(shifted.x)[:, [1, 2]]
    assert got["shifted", "top1", ""] == pytest.approx(np.mean(np.array([1, 2])[z.argmax(1)] == shifted.labels))
    id_s, ood_s = logit(test.x).max(1), logit(far.x).max(1)
    y = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
    assert got["far", "auroc", "maxlogit"] == pytest.approx(roc_auc_score(y, np.r_[id_s, ood_s]), abs=1e-6)
    thr = np.sort(id_s)[::-1][int(np.ceil(0.95 * len(id_s))) - 1]
    assert got["far", "fpr95", "maxlogit"] == pytest.approx(np.mean(ood_s >= thr), abs=1e-6)
    means = got.xs("mean", level="set")
    assert means["fpr95", "msp"] == pytest.approx((got["far", "fpr95", "msp"] + got["single", "fpr95", "msp"]) / 2)
    # k-NN by brute force: negative distance to the 5th nearest L2-normalised training feature (float16 cache)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    bank = unit(FeatureSet(caches / "train").load("cls,reg", dtype=np.float16).x.astype(np.float64))
    knn = lambda a: -np.sort(np.linalg.norm(  # noqa: E731
        unit(a.astype(np.float16).astype(np.float64))[:, None] - bank[None], axis=2), axis=1)[:, 4]
    for anomaly in ("single", "far"):
        o = FeatureSet(caches / anomaly).load("cls,reg").x
        y = np.r_[np.ones(len(test.x)), np.zeros(len(o))]
        assert got[anomaly, "auroc", "knn"] == pytest.approx(roc_auc_score(y, np.r_[knn(test.x), knn(o)]), abs=1e-9)
    md = (out / "results.md").read_text()
    assert "[cls;reg]" in md and "| mean (2 sets) |" in md and "n=100" in md and "selected per combination on val" in md

    # the same seed gives the same numbers; score re-applies the heads; report merges
    r2 = CliRunner().invoke(main, [a if a != str(out) else str(tmp_path / "run2") for a in args])
    assert r2.exit_code == 0
    df2 = pd.read_parquet(tmp_path / "run2" / "results.parquet")
    np.testing.assert_array_equal(df.value.to_numpy(), df2.value.to_numpy())
    r3 = CliRunner().invoke(main, ["score", str(out), "--anomaly", "far", "--out", str(tmp_path / "s")])
    assert r3.exit_code == 0, r3.output
    s = pd.read_parquet(tmp_path / "s" / "results.parquet").set_index(["features", "set", "metric", "scorer"]).value
    assert s["cls,reg", "far", "auroc", "msp"] == pytest.approx(got["far", "auroc", "msp"])
    r4 = CliRunner().invoke(main, ["report", str(out), str(tmp_path / "run2"), "--out", str(tmp_path / "m")])
    assert r4.exit_code == 0 and "(run2)" in r4.output
    assert len(pd.read_csv(tmp_path / "m" / "results.csv")) == 2 * len(df)


def test_probe_without_val_selects_on_held_out_train_rows(caches, tmp_path):
    r = CliRunner().invoke(main, ["probe", "-m", "m", "-f", "cls", "--train", "train", "--cache", str(caches),
                                  "--out", str(tmp_path / "r"), "--iterations", "20", "-q"])
    assert r.exit_code == 0, r.output
    df = pd.read_parquet(tmp_path / "r" / "results.parquet")
    assert set(df.set) == {"train[held-out]"} and set(df.n) == {40}


def test_probe_errors_name_the_problem(caches, tmp_path, monkeypatch):
    base = ["probe", "-m", "m", "-f", "cls", "--train", "train", "--cache", str(caches), "--iterations", "5", "-q",
            "--out", str(tmp_path / "r")]
    r = CliRunner().invoke(main, base + ["--eval", "imagenet-x"])
    assert r.exit_code == 1 and "regcache extract --model m --data MANIFEST_OR_SHARDS" in r.output
    assert "no set of this dataset name was extracted before" in r.output
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # a checkout: its shipped manifest of that name
    r = CliRunner().invoke(main, base + ["--eval", "imagenet-a"])
    assert r.exit_code == 1 and "regcache extract --model m --data manifests/imagenet-a.yaml" in r.output
    r = CliRunner().invoke(main, base + ["--eval", "tset"])
    assert r.exit_code == 1 and "'tset' (did you mean test?)" in r.output
    r = CliRunner().invoke(main, base[:5] + ["--train", "far"] + base[7:])
    assert r.exit_code == 1 and "unlabelled" in r.output
    x = {"cls": np.ones((3, PROBE_LAYOUT.dim), np.float32), "reg": np.ones((3, PROBE_LAYOUT.dim), np.float32)}
    x["cls"][1, 2] = np.nan
    make_set(caches, "broken", x, np.zeros(3, int), classes=["a", "b", "c", "d"])
    r = CliRunner().invoke(main, base + ["--eval", "broken"])
    assert r.exit_code == 1 and "non-finite cls in 1 rows" in r.output and "broken-1" in r.output
    make_set(caches, "empty", {"cls": np.zeros((0, PROBE_LAYOUT.dim), np.float32),
                               "reg": np.zeros((0, PROBE_LAYOUT.dim), np.float32)}, np.zeros(0, int))
    r = CliRunner().invoke(main, base + ["--eval", "empty"])
    assert r.exit_code == 1 and "has no rows" in r.output
    make_set(caches, "other", *[{"cls": np.ones((2, PROBE_LAYOUT.dim), np.float32)}, np.zeros(2, int)], weights="w2")
    r = CliRunner().invoke(main, base + ["--eval", "other"])
    assert r.exit_code == 1 and "differ in checkpoint" in r.output


# --------------------------------------------------------------------------- protocol guards (issue 10)

def probe(caches, out, *extra, lr="0.1"):
    args = ["probe", "-m", "m", "-f", "cls", "--train", "train", "--cache", str(caches), "--out", str(out),
            "--lr", lr, "--iterations", "150", "--batch-size", "64", "-q", "--no-plots", *extra]
    return CliRunner().invoke(main, args)


def id_top1(out) -> float:
    df = pd.read_parquet(out / "results.parquet")
    return float(df[df.role == "id"].value.iloc[0])


def test_a_grid_never_reports_on_its_selection_set(caches, tmp_path):
    for extra in (["--val", "val"], [], ["--val", "val", "--test", "val"]):
        r = probe(caches, tmp_path / "r", *extra, lr="0.01,0.1")
        assert r.exit_code == 2, r.output  # refused as the options are read
        assert "name another ID set as test (--test" in r.output and "2 heads per feature combination" in r.output
    assert not (tmp_path / "r").exists()


def test_one_head_per_combination_may_report_on_val_and_says_so(caches, tmp_path):
    r = probe(caches, tmp_path / "r", "--val", "val")
    assert r.exit_code == 0, r.output
    md = (tmp_path / "r" / "results.md").read_text()
    assert "no selection: one head per combination; ID numbers are on the --val set (val)" in md
    df = pd.read_parquet(tmp_path / "r" / "results.parquet")
    ids = df[df.role == "id"]
    assert set(ids.set) == set(ids.selection_set) == {"val"} and set(ids.heads_per_combination) == {1}
    protocol = json.loads((tmp_path / "r" / "config.json").read_text())["protocol"]
    assert protocol["id_is_selection_set"] and protocol["id_set"] == "val" and protocol["heads_per_combination"] == 1


def test_labels_map_by_class_name(caches, tmp_path):
    """A test set in reversed class order scores what the original does; a subset set labelled 0..1 in its
    own order maps through its subset list."""
    rev = ["d", "c", "b", "a"]
    relabel(caches, "test", "test-rev", classes=rev)
    relabel(caches, "shifted", "shifted-own", subset=["c", "b"])  # unnamed: labels index the subset
    assert (FeatureSet(caches / "test-rev").index.label.to_numpy()
            == 3 - FeatureSet(caches / "test").index.label.to_numpy()).all()
    r = probe(caches, tmp_path / "a", "--val", "val", "--test", "test", "--eval", "shifted")
    assert r.exit_code == 0, r.output
    r = probe(caches, tmp_path / "b", "--val", "val", "--test", "test-rev", "--eval", "shifted-own")
    assert r.exit_code == 0, r.output
    assert id_top1(tmp_path / "a") > 0.8 and id_top1(tmp_path / "b") == id_top1(tmp_path / "a")
    ev = {k: pd.read_parquet(tmp_path / k / "results.parquet").query("role == 'ood-gen'").value.item() for k in "ab"}
    assert ev["a"] > 0.5 and ev["b"] == ev["a"]


def test_labels_that_cannot_be_mapped_are_refused(caches, tmp_path):
    base = ["--val", "val"]
    relabel(caches, "test", "test-other", classes=["a", "b", "x", "y"],
            labels=FeatureSet(caches / "test").index.label.to_numpy())
    r = probe(caches, tmp_path / "r", *base, "--test", "test-other")
    assert r.exit_code == 1 and "x, y" in r.output and "test-other" in r.output, r.output
    relabel(caches, "test", "test-ids", labels=FeatureSet(caches / "test").index.label.to_numpy())  # no names
    r = probe(caches, tmp_path / "r", *base, "--test", "test-ids")
    assert r.exit_code == 1 and "no class names" in r.output, r.output
    relabel(caches, "train", "train-ids", labels=FeatureSet(caches / "train").index.label.to_numpy())
    relabel(caches, "val", "val-ids", labels=FeatureSet(caches / "val").index.label.to_numpy())
    r = probe(caches, tmp_path / "r", "--train", "train-ids", "--val", "val-ids", "--test", "test")
    assert r.exit_code == 1 and "no class names" in r.output, r.output
    labels = FeatureSet(caches / "test").index.label.to_numpy().copy()
    labels[:3] = 5
    relabel(caches, "test", "test-beyond", labels=labels)  # integer ids beyond the head's 4 classes
    r = probe(caches, tmp_path / "r", "--train", "train-ids", "--val", "val-ids", "--test", "test-beyond")
    assert r.exit_code == 1 and "3 rows" in r.output and "beyond the 4 classes" in r.output, r.output
    r = probe(caches, tmp_path / "ok", "--train", "train-ids", "--val", "val-ids", "--test", "test-ids")
    assert r.exit_code == 0 and id_top1(tmp_path / "ok") > 0.8, r.output  # integer ids on both sides: allowed
    relabel(caches, "shifted", "shifted-q", classes=["a", "b", "c", "d"], subset=["b", "q"])
    r = probe(caches, tmp_path / "r", *base, "--test", "test", "--eval", "shifted-q")
    assert r.exit_code == 1 and "subset classes" in r.output and ": q" in r.output, r.output
    relabel(caches, "train", "train-one", classes=["a", "b", "c", "d"], labels=np.zeros(400, int))
    r = probe(caches, tmp_path / "r", "--train", "train-one", *base, "--test", "test")
    assert r.exit_code == 1 and "a single class" in r.output, r.output


def test_every_path_refuses_non_finite_features(caches, tmp_path):
    fs = FeatureSet(caches / "train")
    got = fs.load(concat=False)
    got.x["reg"][[5, 120, 399]] = np.inf
    got.x["reg"][120, 0] = np.nan
    make_set(caches, "train-nan", got.x, got.labels, classes=fs.meta.dataset.classes, units=8)
    for extra in ([], ["--stream", "--stream-window", "2"]):
        r = CliRunner().invoke(main, ["probe", "-m", "m", "-f", "cls,reg", "--train", "train-nan", "--val", "val",
                                      "--test", "test", "--cache", str(caches), "--out", str(tmp_path / "r"),
                                      "--iterations", "5", "-q", *extra])
        assert r.exit_code == 1 and "train-nan" in r.output and "non-finite reg in 3 rows" in r.output, r.output
    assert probe(caches, tmp_path / "run", "--val", "val", "--test", "test").exit_code == 0
    x = {"cls": np.ones((4, PROBE_LAYOUT.dim), np.float32), "reg": np.ones((4, PROBE_LAYOUT.dim), np.float32)}
    x["cls"][[0, 3], 1] = np.nan
    make_set(caches, "broken", x, -np.ones(4, int))
    r = CliRunner().invoke(main, ["score", str(tmp_path / "run"), "--anomaly", "broken", "--out", str(tmp_path / "s")])
    assert r.exit_code == 1 and "broken" in r.output and "non-finite cls in 2 rows" in r.output, r.output


@pytest.mark.parametrize("stream", [[], ["--stream"]])
def test_score_reads_the_training_set_only_for_feature_scorers(caches, tmp_path, monkeypatch, stream):
    assert probe(caches, tmp_path / "run", "--val", "val", "--test", "test", *stream).exit_code == 0
    reads: list[tuple[str, int]] = []
    real = FeatureSet.read_rows
    monkeypatch.setattr(FeatureSet, "read_rows", lambda self, name, rows, out=None: reads.append(
        (self.path.name, len(rows))) or real(self, name, rows, out))
    r = CliRunner().invoke(main, ["score", str(tmp_path / "run"), "--anomaly", "far", "--out", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    assert {p for p, _ in reads} == {"test", "far"}  # neither train nor the selection set
    reads.clear()
    r = CliRunner().invoke(main, ["score", str(tmp_path / "run"), "--anomaly", "far", "--scorers", "knn",
                                  "--out", str(tmp_path / "s2")])
    assert r.exit_code == 0, r.output
    assert {p for p, _ in reads} == {"train", "test", "far"}


def test_results_state_the_views_the_heads_trained_on(caches, tmp_path):
    assert probe(caches, tmp_path / "r", "--val", "val", "--test", "test").exit_code == 0
    assert "plain crop only" in (tmp_path / "r" / "results.md").read_text()
    assert json.loads((tmp_path / "r" / "config.json").read_text())["protocol"]["train_views"] == [0]
    fs = FeatureSet(caches / "train")
    got = fs.load(concat=False)
    # two views per image: view 1 is the plain crop plus noise, stored as extraction does (rows of a unit)
    x = {k: np.concatenate([v, v + 0.1]) for k, v in got.x.items()}
    sets = make_set(caches, "train-2v", x, np.r_[got.labels, got.labels], classes=fs.meta.dataset.classes)
    import pyarrow as pa
    import pyarrow.parquet as pq

    idx = pq.read_table(sets.path / "index.parquet").to_pandas()
    idx["key"] = np.r_[got.keys, got.keys]
    idx["view"] = np.r_[np.zeros(400), np.ones(400)].astype(np.int16)
    from regcache.store import INDEX_SCHEMA
    from regcache.store.tables import parquet_bytes
    table = pa.Table.from_pandas(idx, preserve_index=False, schema=INDEX_SCHEMA)  # as the set's writer binds it:
    (sets.path / "index.parquet").write_bytes(parquet_bytes(table.replace_schema_metadata({"set": sets.fingerprint})))
    r = probe(caches, tmp_path / "v", "--train", "train-2v", "--val", "val", "--test", "test")
    assert r.exit_code == 0, r.output
    assert "trained on 2 views per image" in (tmp_path / "v" / "results.md").read_text()
    df = pd.read_parquet(tmp_path / "v" / "results.parquet")
    assert set(df.train_views) == {2}


def test_report_says_when_it_merges_rows(caches, tmp_path):
    for seed in ("0", "1"):
        assert probe(caches, tmp_path / seed / "run", "--val", "val", "--test", "test", "--seed", seed).exit_code == 0
    r = CliRunner().invoke(main, ["report", str(tmp_path / "0" / "run"), str(tmp_path / "1" / "run")])
    assert r.exit_code == 0, r.output
    assert "merged" not in r.output and r.output.count("| m (") == 2  # same folder name: still kept apart
    both = pd.concat([pd.read_parquet(tmp_path / s / "run" / "results.parquet") for s in "01"])
    both.to_parquet(tmp_path / "both.parquet")
    r = CliRunner().invoke(main, ["report", str(tmp_path / "both.parquet")])
    assert r.exit_code == 0 and "merged 2 rows per cell" in r.output and "seed" in r.output, r.output
    values = both[(both.role == "id")].value
    assert f"{100 * values.mean():.2f}" in r.output


def test_report_pools_runs_that_differ_only_in_their_seed_as_mean_and_sample_sd(caches, tmp_path):
    """--pool-seeds: one row per group of runs that differ only in --seed, each cell the mean ± the sample standard
    deviation over the seeds (statistics.stdev here); another lr stays apart; a seed twice is refused."""
    import statistics

    runs = []
    for seed, lr in (("0", "0.1"), ("1", "0.1"), ("2", "0.1"), ("0", "0.05")):
        out = tmp_path / f"s{seed}-lr{lr}"
        assert probe(caches, out, "--val", "val", "--test", "test", "--seed", seed, lr=lr).exit_code == 0
        runs.append(str(out))
    r = CliRunner().invoke(main, ["report", "--pool-seeds", *runs])
    assert r.exit_code == 0, r.output
    top1 = [100 * id_top1(Path(run)) for run in runs[:3]]
    assert len(set(top1)) > 1  # the seeds drew differently, so the spread is not 0 by construction
    assert f"| {statistics.mean(top1):.2f} ± {statistics.stdev(top1):.2f} |" in r.output, r.output
    assert f"| {100 * id_top1(Path(runs[3])):.2f} (1 of 1 seed) |" in r.output  # lr 0.05: its own row, one seed
    assert "mean over seeds 0,1,2 ± their sample standard deviation" in r.output
    again = tmp_path / "s0-again"
    assert probe(caches, again, "--val", "val", "--test", "test", "--seed", "0").exit_code == 0
    r = CliRunner().invoke(main, ["report", "--pool-seeds", runs[0], str(again), runs[1]])
    assert r.exit_code == 1 and "same seed 0" in r.output and "count one draw twice" in r.output, r.output


def test_a_pooled_cell_with_fewer_seeds_than_its_table_says_how_many():
    """A seed whose value is missing (a skipped scorer) was dropped silently under 'the mean over seeds 0,1,2'."""
    from regcache.report import markdown

    rows = []
    for seed, auroc in ((0, 0.7), (1, float("nan")), (2, 0.9)):
        base = {"model": "m", "features": "cls", "run": "g", "seed": seed, "n": 10, "split": None, "lr": 0.1}
        rows += [{**base, "set": "t", "role": "id", "metric": "top1", "scorer": "", "value": 0.5 + seed / 10},
                 {**base, "set": "a", "role": "anomaly", "metric": "auroc", "scorer": "msp", "value": auroc},
                 {**base, "set": "a", "role": "anomaly", "metric": "fpr95", "scorer": "msp", "value": 0.3}]
    text = markdown(pd.DataFrame(rows), pooled=True)
    assert "| 60.00 ± 10.00 |" in text  # every seed: no count
    assert "30.00 ± 0.00 / 80.00 ± 14.14 (2 of 3 seeds)" in text, text
