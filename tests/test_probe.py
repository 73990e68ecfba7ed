"""Stage 2: heads against scikit-learn, one-pass training against one-at-a-time, the run end to end."""
from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from regcache.cli import main
from regcache.probe import (ProbeConfig, Split, accuracy, load_heads, predict, train_heads)
from regcache.store import FeatureSet

from conftest import PROBE_LAYOUT, make_set



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
    heads = train_heads(split(x, y), 5, ProbeConfig(features=[("cls",)], iterations=300, batch_size=256, lrs=(0.1,)))
    assert accuracy(heads[0].logits(split(x, y)), y) >= 0.99


def test_accuracy_within_one_point_of_sklearn_logistic_regression_on_digits():
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(y))
    tr, te = perm[:1200], perm[1200:]
    sk = LogisticRegression(max_iter=5000).fit(x[tr], y[tr]).score(x[te], y[te])
    # sklearn minimises C * sum(CE) + |w|^2 / 2, i.e. mean(CE) + |w|^2 / (2 C n): weight decay 1 / (C n)
    cfg = ProbeConfig(features=[("cls",)], optimizer="sgd", lrs=(0.3,), wds=(1 / len(tr),), iterations=1500,
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
    together = train_heads(s, 3, ProbeConfig(features=combos, lrs=lrs, wds=wds, iterations=50, batch_size=64, seed=3))
    alone = [h for c in combos for lr in lrs for wd in wds
             for h in train_heads(s, 3, ProbeConfig(features=[c], lrs=(lr,), wds=(wd,), iterations=50, batch_size=64,
                                                    seed=3))]
    assert len(together) == len(alone) == 8
    for a, b in zip(together, alone):
        assert (a.features, a.lr, a.wd) == (b.features, b.lr, b.wd)
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.bias, b.bias, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(together[0].weight, together[1].weight)  # the lrs really differ


# --------------------------------------------------------------------------- a whole run on hand-made caches
# (the `caches` fixture, in conftest.py: train in 8 shards, val, a shifted class-subset set, anomalies)

def test_probe_run_end_to_end(caches, tmp_path):
    out = tmp_path / "run"
    args = ["probe", "-m", "m", "-f", "cls", "-f", "cls,reg", "--train", "train", "--val", "val",
            "--eval", "shifted", "--anomaly", "far,single", "--cache", str(caches), "--out", str(out),
            "--lr", "0.01,0.1", "--iterations", "200", "--batch-size", "64", "--scorers",
            "msp,energy,maxlogit,knn,mahalanobis,vim", "--knn-k", "5", "-q"]
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
    val = FeatureSet(caches / "val").load("cls,reg")
    far = FeatureSet(caches / "far").load("cls,reg")
    shifted = FeatureSet(caches / "shifted").load("cls,reg")
    h = heads["cls,reg"]
    logit = lambda x: x @ h.weight.numpy().T + h.bias.numpy()  # noqa: E731
    got = df[(df.features == "cls,reg") & (df.role != "selection")].set_index(["set", "metric", "scorer"]).value
    assert got["val", "top1", ""] == pytest.approx(np.mean(logit(val.x).argmax(1) == val.labels))
    z = logit(shifted.x)[:, [1, 2]]
    assert got["shifted", "top1", ""] == pytest.approx(np.mean(np.array([1, 2])[z.argmax(1)] == shifted.labels))
    id_s, ood_s = logit(val.x).max(1), logit(far.x).max(1)
    y = np.r_[np.ones(len(id_s)), np.zeros(len(ood_s))]
    assert got["far", "auroc", "maxlogit"] == pytest.approx(roc_auc_score(y, np.r_[id_s, ood_s]), abs=1e-6)
    thr = np.sort(id_s)[::-1][int(np.ceil(0.95 * len(id_s))) - 1]
    assert got["far", "fpr95", "maxlogit"] == pytest.approx(np.mean(ood_s >= thr), abs=1e-6)
    means = got.xs("mean", level="set")
    assert means["fpr95", "msp"] == pytest.approx((got["far", "fpr95", "msp"] + got["single", "fpr95", "msp"]) / 2)
    assert got["single", "auroc", "knn"] in (0.0, 1.0) or 0 <= got["single", "auroc", "knn"] <= 1
    md = (out / "results.md").read_text()
    assert "[cls;reg]" in md and "mean FPR95" in md and "n=100" in md

    # the same seed gives the same numbers; score re-applies the heads; report merges
    r2 = CliRunner().invoke(main, [a if a != str(out) else str(tmp_path / "run2") for a in args])
    assert r2.exit_code == 0
    df2 = pd.read_parquet(tmp_path / "run2" / "results.parquet")
    np.testing.assert_array_equal(df.value.to_numpy(), df2.value.to_numpy())
    r3 = CliRunner().invoke(main, ["score", str(out), "--anomaly", "far", "--out", str(tmp_path / "s")])
    assert r3.exit_code == 0, r3.output
    s = pd.read_parquet(tmp_path / "s" / "results.parquet").set_index(["features", "set", "metric", "scorer"]).value
    assert s["cls,reg", "far", "auroc", "msp"] == pytest.approx(got["far", "auroc", "msp"])
    r4 = CliRunner().invoke(main, ["report", str(out), str(tmp_path / "run2"), "--out", str(tmp_path / "m.csv")])
    assert r4.exit_code == 0 and "(run2)" in r4.output
    assert len(pd.read_csv(tmp_path / "m.csv")) == 2 * len(df)


def test_probe_without_val_selects_on_held_out_train_rows(caches, tmp_path):
    r = CliRunner().invoke(main, ["probe", "-m", "m", "-f", "cls", "--train", "train", "--cache", str(caches),
                                  "--out", str(tmp_path / "r"), "--iterations", "20", "-q"])
    assert r.exit_code == 0, r.output
    df = pd.read_parquet(tmp_path / "r" / "results.parquet")
    assert set(df.set) == {"train[held-out]"} and set(df.n) == {40}


def test_probe_errors_name_the_problem(caches, tmp_path):
    base = ["probe", "-m", "m", "-f", "cls", "--train", "train", "--cache", str(caches), "--iterations", "5", "-q",
            "--out", str(tmp_path / "r")]
    r = CliRunner().invoke(main, base + ["--eval", "imagenet-a"])
    assert r.exit_code == 1 and "regcache extract --model m --data manifests/imagenet-a.yaml" in r.output
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
    assert r.exit_code == 1 and "differ in weights" in r.output
