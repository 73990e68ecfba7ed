"""The L-BFGS grid against scikit-learn, kNN against a brute-force loop, few-shot and presets against
independent computations, and the CLI paths that use them."""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

from regcache.cli import main
from regcache.probe import Split, fit_heads, load_heads
from regcache.probe.knn import few_shot, knn_scores, shots
from regcache.probe.solvers import lbfgs_grid
from regcache.settings import ProbeSettings, SettingsError, Training
from regcache.store import FeatureSet


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    perm = np.random.default_rng(0).permutation(len(y))
    return x[perm[:1200]], y[perm[:1200]], x[perm[1200:]], y[perm[1200:]]


def sklearn_fit(x, y, C, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning at a small max_iter is part of the comparison
        return LogisticRegression(C=C, **kw).fit(x, y)


def test_lbfgs_grid_is_sklearn_logistic_regression(digits):
    """Tightly converged, every head of the grid is sklearn's optimum: held-out probabilities and weights agree."""
    xtr, ytr, xte, yte = digits
    Cs = [1e-3, 0.1, 1.0]
    w, b, iters = lbfgs_grid(torch.tensor(xtr), torch.tensor(ytr), 10, Cs, tol=1e-9, max_iter=2000)
    for i, C in enumerate(Cs):
        sk = sklearn_fit(xtr, ytr, C, tol=1e-10, max_iter=10_000)
        ours = torch.softmax(torch.tensor(xte) @ w[i].T + b[i], 1).numpy()
        np.testing.assert_allclose(ours, sk.predict_proba(xte), atol=1e-5)
        np.testing.assert_allclose(w[i].numpy(), sk.coef_, atol=1e-4)
        # sklearn's intercept is defined up to a constant shift (softmax); compare after centring
        np.testing.assert_allclose(b[i] - b[i].mean(), sk.intercept_ - sk.intercept_.mean(), atol=1e-4)
    assert (iters > 1).all()


def test_float32_grid_with_defaults_predicts_as_sklearn(digits):
    """The default path (float32, sklearn's tol 1e-4) through fit_heads: two combinations x three C."""
    xtr, ytr, xte, yte = digits
    half = xtr.shape[1] // 2
    s = Split("s", {"cls": xtr[:, :half].astype(np.float16), "patch": xtr[:, half:].astype(np.float16)}, ytr,
              np.arange(len(ytr)).astype(str), np.zeros(len(ytr), np.int16))
    Cs = (0.01, 0.3, 3.0)
    heads = fit_heads(s, 10, Training(features=[("patch",), ("patch", "cls")], solver="lbfgs", C=Cs))
    assert [(h.features, h.C) for h in heads] == [(c, C) for c in [("patch",), ("patch", "cls")] for C in Cs]
    x16 = xtr.astype(np.float16).astype(np.float64)
    te16 = xte.astype(np.float16).astype(np.float64)
    for h in heads:
        cols = np.r_[half:xtr.shape[1], 0:half] if h.features == ("patch", "cls") else np.r_[half:xtr.shape[1]]
        sk = sklearn_fit(x16[:, cols], ytr, h.C, max_iter=1000)
        ours = (torch.tensor(te16[:, cols], dtype=torch.float32) @ h.weight.T + h.bias).numpy()
        assert np.mean(ours.argmax(1) == sk.predict(te16[:, cols])) >= 0.98
        assert abs(np.mean(ours.argmax(1) == yte) - sk.score(te16[:, cols], yte)) <= 0.01
        assert h.wd == pytest.approx(1 / (h.C * len(ytr)))


def test_lbfgs_refuses_what_it_cannot_do():
    base = {"model": "m", "train": "t", "val": "v", "features": ["cls"], "solver": "lbfgs"}
    with pytest.raises(SettingsError, match=r"C\[0\]: Input should be greater than 0"):
        ProbeSettings.make(base, C=[0.0])
    with pytest.raises(SettingsError, match="in memory"):
        ProbeSettings.make(base, stream=True)
    assert ProbeSettings.make(base).max_iter == 1000
    assert ProbeSettings.make(base, solver="minibatch").max_iter == 10_000


def brute_force_knn(train, ytr, test, k, T, classes):
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    tr, te = unit(train), unit(test)
    out = np.zeros((len(te), classes))
    for i, q in enumerate(te):
        sims = tr @ q
        for j in np.argsort(-sims, kind="stable")[:k]:
            out[i, ytr[j]] += np.exp(sims[j] / T)
    return out


def test_knn_equals_a_brute_force_loop():
    rng = np.random.default_rng(0)
    ytr = rng.integers(0, 7, 300)
    centres = rng.normal(size=(7, 12))
    tr = centres[ytr] + rng.normal(size=(300, 12))
    te = centres[rng.integers(0, 7, 50)] + rng.normal(size=(50, 12))
    # tiny blocks: the running top-k over training blocks and the test chunks are exercised
    got = knn_scores(torch.tensor(tr), torch.tensor(ytr), torch.tensor(te), 7, ks=(1, 10, 20), temperature=0.07,
                     max_bytes=4 * 300 * 8)
    for k, scores in got.items():
        ref = brute_force_knn(tr, ytr, te, k, 0.07, 7)
        # ours scales every row by exp(-max sim / T): compare normalised votes, and the predictions
        np.testing.assert_allclose(scores / scores.sum(1, keepdims=True), ref / ref.sum(1, keepdims=True),
                                   rtol=1e-4, atol=1e-6)
        assert (scores.argmax(1) == ref.argmax(1)).all()
    assert not np.array_equal(got[1].argmax(1), got[20].argmax(1))  # k matters on this data


def test_few_shot_metrics_against_sklearn(digits):
    xtr, ytr, xte, yte = digits
    split = lambda x, y: Split("s", {"cls": x.astype(np.float16)}, y, np.arange(len(y)).astype(str),  # noqa: E731
                               np.zeros(len(y), np.int16))
    rows = shots(ytr, 3, seed=1)
    assert np.bincount(ytr[rows]).tolist() == [3] * 10 and not np.array_equal(rows, shots(ytr, 3, seed=2))
    res = few_shot(split(xtr, ytr), split(xte, yte), ["cls"], 10, [3], [1], C=1.0)[0]
    x16 = xtr.astype(np.float16).astype(np.float64)[rows]
    te16 = xte.astype(np.float16).astype(np.float64)
    sk = sklearn_fit(x16, ytr[rows], 1.0, tol=1e-8, max_iter=5000)
    assert res["top1"] == pytest.approx(sk.score(te16, yte), abs=0.01)
    assert res["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(yte, sk.predict(te16)), abs=0.01)
    assert res["top5"] == pytest.approx(top_k_accuracy_score(yte, sk.predict_proba(te16), k=5), abs=0.01)
    assert res["top5"] > res["top1"]


#: the published grids, as their repositories write them (DINOv2 eval/linear.py; DINOv3's logistic regression)
DINOV2_LRS = [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1]


def test_presets_are_the_published_grids():
    """Settings made from a preset carry the published grid (computed here independently), and what the user
    gives wins."""
    base = {"model": "m", "train": "t", "test": "x"}
    v3 = ProbeSettings.make(base, preset="dinov3-logreg")
    np.testing.assert_allclose(v3.C, 10.0 ** np.linspace(-6, 5, 45), rtol=1e-12)
    assert (v3.solver, v3.refit, v3.tol, v3.max_iter, v3.features) == ("lbfgs", True, 1e-12, 1000, [("cls",)])
    v2 = ProbeSettings.make(base, preset="dinov2-linear")
    np.testing.assert_allclose(v2.lr, np.array(DINOV2_LRS) * 1024 / 256)
    assert (v2.max_iter, v2.batch_size, v2.momentum, v2.wd) == (12_500, 1024, 0.9, [0.0])
    small = ProbeSettings.make(base, preset="dinov2-linear", batch_size=512)
    np.testing.assert_allclose(small.lr, np.array(DINOV2_LRS) * 512 / 256)  # lr follows the batch it trains with
    assert ProbeSettings.make(base, preset="dinov2-linear", lr="0.5").lr == [0.5]  # typed options win
    last4 = ProbeSettings.make(base, preset="dinov2-linear-last4")
    assert ("cls@-4", "cls@-3", "cls@-2", "cls") in last4.features and ("cls", "patch") in last4.features
    with pytest.raises(SettingsError, match="preset"):
        ProbeSettings.make(base, preset="nope")
    help_text = "".join(CliRunner().invoke(main, ["probe", "--help"]).output.split())  # unwrapped
    assert all(n in help_text for n in ("dinov3-logreg", "dinov2-linear", "dinov2-linear-last4"))


def test_lbfgs_preset_run_selects_then_refits(caches, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["probe", "-m", "m", "--preset", "dinov3-logreg", "-f", "cls,reg", "--train", "train",
                                  "--val", "val", "--test", "test", "--cache", str(caches), "--out", str(out),
                                  "--C", "0.001,0.1,10", "--tol", "1e-4", "-q", "--no-plots"])
    assert r.exit_code == 0, r.output
    df = pd.read_parquet(out / "results.parquet")
    assert len(df[df.role == "selection"]) == 3
    (head,) = load_heads(out / "heads.safetensors")
    # the refit head is sklearn's fit at the chosen C on train + val
    tr, va, te = (FeatureSet(caches / n).load("cls,reg") for n in ("train", "val", "test"))
    x, y = np.concatenate([tr.x, va.x]).astype(np.float64), np.concatenate([tr.labels, va.labels])
    sk = sklearn_fit(x, y, head.C, max_iter=1000)
    ours = te.x @ head.weight.numpy().T + head.bias.numpy()
    assert np.mean(ours.argmax(1) == sk.predict(te.x)) >= 0.98
    top1 = df[(df.role == "id") & (df.metric == "top1")].value.item()
    assert top1 == pytest.approx(np.mean(ours.argmax(1) == te.labels))


def test_knn_and_fewshot_commands(caches, tmp_path):
    r = CliRunner().invoke(main, ["knn", "-m", "m", "-f", "cls,reg", "--train", "train", "--test", "test",
                                  "--eval", "shifted", "--cache", str(caches), "--k", "5,20",
                                  "--out", str(tmp_path / "k")])
    assert r.exit_code == 0, r.output
    df = pd.read_parquet(tmp_path / "k" / "results.parquet")
    assert set(df.k) == {5, 20} and set(df.set) == {"test", "shifted"} and set(df.metric) == {"top1"}  # 4 classes
    tr, te = (FeatureSet(caches / n).load("cls,reg") for n in ("train", "test"))
    ref = brute_force_knn(tr.x.astype(np.float16).astype(np.float64), tr.labels,
                          te.x.astype(np.float16).astype(np.float64), 20, 0.07, 4)
    got = df.set_index(["set", "k", "metric"]).value
    assert got["test", 20, "top1"] == pytest.approx(np.mean(ref.argmax(1) == te.labels))
    r = CliRunner().invoke(main, ["fewshot", "-m", "m", "-f", "cls", "--train", "train", "--test", "test",
                                  "--cache", str(caches), "--shots", "1,5", "--seeds", "0,1", "--out", str(tmp_path / "f")])
    assert r.exit_code == 0, r.output
    assert "mean_per_class_recall" in r.output and "seeds" in r.output


# --------------------------------------------------------------------------- issue 26: the presets' own numbers

def _objective(w, b, x, y, C) -> float:
    """scikit-learn's objective, C·Σ CE + ½‖W‖², in float64 from its definition."""
    z = x @ np.asarray(w, np.float64).T + np.asarray(b, np.float64)
    z = z - z.max(1, keepdims=True)
    return float(C * (np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]).sum() + 0.5 * (np.asarray(w) ** 2).sum())


def test_lbfgs_reaches_sklearns_optimum_across_the_dinov3_grid(digits):
    """float32 features, DINOv3's tol (1e-12) and cap (1,000): every C from 1e-6 to 1e5 ends within 1e-4 of the
    objective scikit-learn reaches when run to convergence (float64, 20,000 iterations)."""
    xtr, ytr, _, _ = digits
    x32 = xtr.astype(np.float32)
    Cs = [1e-6, 1.0, 1e5]
    w, b, iters = lbfgs_grid(torch.tensor(x32), torch.tensor(ytr), 10, Cs, tol=1e-12, max_iter=1000)
    for i, C in enumerate(Cs):
        sk = sklearn_fit(x32.astype(np.float64), ytr, C, tol=1e-12, max_iter=20_000)
        best = _objective(sk.coef_, sk.intercept_, x32.astype(np.float64), ytr, C)
        ours = _objective(w[i].double().numpy(), b[i].double().numpy(), x32.astype(np.float64), ytr, C)
        assert ours <= best * (1 + 1e-4), (C, ours, best)
    assert (iters < 1000).all(), iters  # converged, not stopped by the cap


def test_heads_start_as_dinov2s_linear_classifier():
    """--init normal: weights from N(0, 0.01²) (DINOv2's ``weight.normal_(0, 0.01)``), bias zero; zeros by default."""
    from regcache.probe.minibatch import initial_weights

    s = Training(features=["cls"], init="normal")
    w = initial_weights((13, 384, 1000), s, torch.Generator().manual_seed(0)).numpy().ravel()
    assert abs(w.mean()) < 1e-4 and abs(w.std() - 0.01) < 1e-4
    assert abs(np.mean(np.abs(w) < 0.01) - 0.6827) < 0.002  # a normal's mass within one std
    assert not initial_weights((2, 3, 4), Training(features=["cls"]), torch.Generator()).any()
    x, y = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float16), np.arange(64) % 4
    split = Split("s", {"cls": x}, y, np.arange(64).astype(str), np.zeros(64, np.int16))
    [head] = train_heads_once(split, Training(features=["cls"], init="normal", init_std=0.5, lr=[1e-12],
                                              iterations=1, batch_size=8))
    assert 0.3 < float(head.weight.std()) < 0.7 and not head.bias.abs().gt(1e-9).any()
    assert ProbeSettings.make({"model": "m", "train": "t", "test": "u", "preset": "dinov2-linear"}).init == "normal"
    with pytest.raises(SettingsError, match="lbfgs starts every head at zero"):
        Training.make({"features": ["cls"], "solver": "lbfgs", "init": "normal"})


def train_heads_once(split, s):
    from regcache.probe import train_heads

    return train_heads(split, 4, s)


def test_a_stratified_holdout_takes_a_tenth_of_each_class():
    """DINOv3's split: per class floor(10%) of its images (at least one), none of a class of one image."""
    from regcache.probe import holdout

    counts = {0: 55, 1: 10, 2: 9, 3: 1, 4: 2, 5: 131}
    labels = np.concatenate([np.full(n, c) for c, n in counts.items()])
    keys = np.array([f"k{i}" for i in range(len(labels))])
    views = np.zeros(len(labels), np.int16)
    split = Split("s", {}, labels, keys, views)
    fit, held = holdout(split, 0.1, seed=3, kind="stratified")
    got = {c: int((labels[held] == c).sum()) for c in counts}
    assert got == {c: (max(1, int(0.1 * n)) if n > 1 else 0) for c, n in counts.items()}
    assert len(set(fit) & set(held)) == 0 and len(fit) + len(held) == len(labels)
    _, again = holdout(split, 0.1, seed=3, kind="stratified")
    assert (again == held).all()  # seeded
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(3)).tolist()  # DINOv3's, by hand
    want = [i for c, n in counts.items() for i in [p for p in perm if labels[p] == c][:max(1, int(0.1 * n)) * (n > 1)]]
    assert sorted(held) == sorted(want)
    preset = ProbeSettings.make({"model": "m", "train": "t", "test": "u", "preset": "dinov3-logreg"})
    assert preset.holdout == "stratified"


def test_knn_reports_top5_only_for_sets_of_more_than_five_classes(tmp_path):
    """A set scored over a class subset of 5 would have top-5 = 100% whatever the features: not reported."""
    from conftest import make_set

    rng = np.random.default_rng(0)
    classes = [f"c{i}" for i in range(8)]
    centres = rng.normal(size=(8, 4)) * 3

    def sample(n, which):
        y = rng.choice(which, n)
        return {"cls": (centres[y] + rng.normal(size=(n, 4))).astype(np.float32)}, y

    root = tmp_path / "cache"
    make_set(root, "train", *sample(200, range(8)), classes=classes, role="id-train")
    make_set(root, "test", *sample(80, range(8)), classes=classes, role="id-val")
    x, y = sample(60, range(5))
    make_set(root, "five", x, y, classes=classes, subset=classes[:5], role="ood-gen")
    r = CliRunner().invoke(main, ["knn", "-m", "m", "--train", "train", "--test", "test", "--eval", "five",
                                  "--k", "10", "--cache", str(root), "--out", str(tmp_path / "knn")])
    assert r.exit_code == 0, r.output
    df = pd.read_parquet(tmp_path / "knn" / "results.parquet")
    assert set(df[df.set == "test"].metric) == {"top1", "top5"} and set(df[df.set == "five"].metric) == {"top1"}
    assert "top-5 only for sets scored over more than 5 classes" in r.output


def test_the_sklearn_solver_is_dinov3s_solver(digits):
    """--solver sklearn: each head is scikit-learn's LogisticRegression at that C (its probabilities, also in
    scikit-learn's binary form, and with a class absent from the training rows never predicted)."""
    xtr, ytr, xte, _ = digits
    for keep in ([0, 1, 2], [3, 7]):
        rows = np.isin(ytr, keep)
        s = Split("s", {"cls": xtr[rows].astype(np.float16)}, ytr[rows], np.arange(rows.sum()).astype(str),
                  np.zeros(rows.sum(), np.int16))
        heads = fit_heads(s, 10, Training(features=["cls"], solver="sklearn", C=[0.1, 10.0], iterations=50))
        for h in heads:
            sk = sklearn_fit(xtr[rows].astype(np.float16).astype(np.float64), ytr[rows], h.C, max_iter=50)
            logits = torch.tensor(xte, dtype=torch.float32) @ h.weight.T + h.bias
            ours = torch.softmax(logits.double(), 1).numpy()[:, keep]
            np.testing.assert_allclose(ours, sk.predict_proba(xte), atol=1e-5)
            assert set(logits.argmax(1).tolist()) <= set(keep) and h.iterations == int(sk.n_iter_[0])
    preset = ProbeSettings.make({"model": "m", "train": "t", "test": "u", "preset": "dinov3-logreg-sklearn"})
    assert preset.solver == "sklearn" and len(preset.C) == 45 and preset.holdout == "stratified" and preset.refit
