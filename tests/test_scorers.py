"""The scorer registry against independent references: pytorch-ood's detectors (fit_features /
predict_features, a test-only dependency) for every scorer it implements, the papers' formulas computed
here by brute force for the rest; chunked fits against unchunked ones; `--scorers all` through the CLI."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from scipy.special import softmax

from regcache import ood
from regcache.cli import main
from regcache.ood.fit import Bank, quantile, topk_similarities

@pytest.fixture(scope="module")
def pood():
    """pytorch-ood's detectors, for the tests that compare with them (the others run without it)."""
    return pytest.importorskip("pytorch_ood.detector", reason="pytorch-ood is a test dependency (pip install -e .[test])")


D, C = 12, 5


@pytest.fixture(scope="module")
def data():
    """Separable classes (every class has correctly classified rows, as SHE needs), a head, queries near and far."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(C, D)) * 3
    y = np.repeat(np.arange(C), 60)
    bank = centres[y] + rng.normal(size=(len(y), D))
    w = centres / 3 + rng.normal(size=(C, D)) * 0.1
    b = rng.normal(size=C) * 0.1
    q = np.concatenate([centres[rng.integers(0, C, 30)] + rng.normal(size=(30, D)), rng.normal(size=(20, D)) * 4])
    return bank, y, ood.Linear(w, b), q


def ours(name, data, chunk=10**6, **args):
    bank, y, head, q = data
    sc = ood.make(name, **args).fit(Bank.from_array(bank, y, chunk=chunk), head)
    return sc.score(q, head(q))


def t(x):
    return torch.from_numpy(np.asarray(x, np.float64))


def linear(head: ood.Linear) -> torch.nn.Linear:
    lin = torch.nn.Linear(D, C).double()
    with torch.no_grad():
        lin.weight.copy_(t(head.weight))
        lin.bias.copy_(t(head.bias))
    return lin


@pytest.fixture
def float64(monkeypatch):
    """pytorch-ood in float64: several detectors cast to float32 (``.float()``) or allocate in the default dtype,
    and float32 rounding (5e-4 in ViM's energy - alpha * residual) would hide the formula behind the noise."""
    monkeypatch.setattr(torch.Tensor, "float", lambda self: self.double())
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def maps(x):
    """Features as the [N, D, 1, 1] feature maps pytorch-ood's activation-shaping detectors take."""
    return t(x)[:, :, None, None]


# --------------------------------------------------------------------------- against pytorch-ood
# pytorch-ood returns outlier scores (larger = more OOD): ours are their negation, up to the stated scale.

def test_logit_scorers_match_pytorch_ood(pood, data):
    bank, y, head, q = data
    z = t(head(q))
    np.testing.assert_allclose(np.exp(ours("msp", data)), -pood.MaxSoftmax.score(z).numpy(), rtol=1e-5)
    np.testing.assert_allclose(ours("energy", data), -pood.EnergyBased.score(z).numpy(), rtol=1e-5)
    np.testing.assert_allclose(ours("maxlogit", data), -pood.MaxLogit.score(z).numpy(), rtol=1e-5)
    # pytorch-ood averages the M terms where the paper sums them (a factor M), and clips probabilities to
    # [1e-7, 1 - 1e-7] where the paper does not: compared where no probability is clipped
    mild = z.numpy() / 10
    assert 1e-7 < softmax(mild, axis=1).min() and softmax(mild, axis=1).max() < 1 - 1e-7
    np.testing.assert_allclose(ood.make("gen", M=3, gamma=0.5).score(q, mild),
                               -3 * pood.GEN.score(t(mild), gamma=0.5, M=3).numpy(), rtol=1e-5)
    klm = pood.KLMatching(None).fit_logits(t(head(bank)))
    np.testing.assert_allclose(ours("klm", data), -klm.predict_logits(z).numpy(), rtol=1e-5, atol=1e-9)


def test_activation_shaping_matches_pytorch_ood(pood, data):
    bank, y, head, q = data
    lin = linear(head)
    fc = lambda m: lin(m.flatten(1))  # noqa: E731
    react = pood.ReAct(None, fc, percentile=0.8).fit_feature_maps(maps(bank), torch.from_numpy(y))
    np.testing.assert_allclose(ours("react", data, chunk=17, percentile=0.8),
                               -react.predict_feature_maps(maps(q)).detach().numpy(), rtol=1e-5)
    for variant in ("p", "b", "s"):
        ash = pood.ASH(None, fc, variant=f"ash-{variant}", percentile=0.75)
        np.testing.assert_allclose(ours(f"ash_{variant}", data, percentile=0.75),
                                   -ash.predict_feature_maps(maps(q)).detach().numpy(), rtol=1e-5)
    scale = pood.SCALE(None, fc, percentile=0.7)
    np.testing.assert_allclose(ours("scale", data, percentile=0.7),
                               -scale.predict_feature_maps(maps(q)).detach().numpy(), rtol=1e-5)
    dice = pood.DICE(None, t(head.weight), t(head.bias), p=0.6).fit_features(t(bank), torch.from_numpy(y))
    np.testing.assert_allclose(ours("dice", data, chunk=17, p=0.6), -dice.predict_features(t(q)).detach().numpy(),
                               rtol=1e-5)


def test_head_scorers_match_pytorch_ood(pood, data, float64):
    bank, y, head, q = data
    lin = linear(head)
    with torch.no_grad():
        fdbd = pood.fDBD(None, lin).fit_features(t(bank))
        np.testing.assert_allclose(ours("fdbd", data, chunk=17), -fdbd.predict_features(t(q)).numpy(), rtol=1e-5)
        nci = pood.NCI(None, lin, alpha=0.01).fit_features(t(bank))
        np.testing.assert_allclose(ours("nci", data, chunk=17, alpha=0.01), -nci.predict_features(t(q)).numpy(),
                                   rtol=1e-5)
        she = pood.SHE(None, lin).fit_features(t(bank), torch.from_numpy(y))
        np.testing.assert_allclose(ours("she", data, chunk=17), -she.predict_features(t(q)).numpy(), rtol=1e-5)
        nng = pood.NNGuide(None, lin, k=7).fit_features(t(bank), torch.from_numpy(y))
        np.testing.assert_allclose(ours("nnguide", data, chunk=17, k=7), -nng.predict_features(t(q)).numpy(),
                                   rtol=1e-5)
    # GradNorm by autograd through the head's weight (pytorch-ood), against our closed form
    grad = pood.GradNorm(lin, param_filter=lambda n: n == "weight", temperature=2.0)
    np.testing.assert_allclose(ours("gradnorm", data, temperature=2.0), -grad.predict(t(q)).detach().numpy(),
                               rtol=1e-5)


def test_training_statistics_scorers_match_pytorch_ood(pood, data, float64):
    bank, y, head, q = data
    n, yt = len(bank), torch.from_numpy(y)
    knn = pood.KNN(None, k=5).fit_features(torch.from_numpy(bank.astype(np.float32)), yt)
    np.testing.assert_allclose(ours("knn", data, chunk=17, k=5), -knn.predict_features(t(q)).numpy(), atol=1e-5)
    # pytorch-ood's covariances are scatter sums (not divided by n) and its Mahalanobis score is half the distance
    maha = pood.Mahalanobis(None).fit_features(t(bank), yt)
    np.testing.assert_allclose(ours("mahalanobis", data, chunk=17), -2 * n * maha.predict_features(t(q)).numpy(),
                               rtol=1e-5)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    maha_pp = pood.Mahalanobis(None).fit_features(t(unit(bank)), yt)
    np.testing.assert_allclose(ours("mahalanobis_pp", data, chunk=17),
                               -2 * n * maha_pp.predict_features(t(unit(q))).numpy(), rtol=1e-5)
    rmd = pood.RMD(None).fit_features(t(bank), yt)
    np.testing.assert_allclose(ours("rmds", data, chunk=17), -n * rmd.predict_features(t(q)).numpy(), rtol=1e-5)
    vim = pood.ViM(None, d=6, w=t(head.weight), b=t(head.bias)).fit_features(t(bank), yt)
    np.testing.assert_allclose(ours("vim", data, chunk=17, dim=6), -vim.predict_features(t(q)).numpy(), rtol=1e-5)


# --------------------------------------------------------------------------- against the papers' formulas

def test_residual_against_a_direct_svd(data):
    """ViM's Residual baseline: the norm outside the top-`dim` right-singular vectors of the bank about -pinv(W) b."""
    bank, y, head, q = data
    origin = -np.linalg.pinv(head.weight) @ head.bias
    principal = np.linalg.svd(bank - origin, full_matrices=False)[2][:6].T
    expected = -np.linalg.norm((q - origin) - (q - origin) @ principal @ principal.T, axis=1)
    np.testing.assert_allclose(ours("residual", data, chunk=17, dim=6), expected, rtol=1e-8)


def test_gen_klm_nci_fdbd_against_brute_force_loops(data):
    """Per-sample loops over the papers' definitions (independent of pytorch-ood's code paths)."""
    bank, y, head, q = data
    gen = [-sum(p ** 0.1 * (1 - p) ** 0.1 for p in sorted(softmax(z))[::-1][:4]) for z in head(q)]
    np.testing.assert_allclose(ours("gen", data, M=4), gen, rtol=1e-10)
    mean = bank.mean(0)
    fdbd, nci = [], []
    for x in q:
        z = head(x[None])[0]
        k = int(z.argmax())
        fdbd.append(sum(abs(z[k] - z[c]) / np.linalg.norm(head.weight[k] - head.weight[c]) for c in range(C) if c != k)
                    / ((C - 1) * np.linalg.norm(x - mean)))
        nci.append(head.weight[k] @ (x - mean) / np.linalg.norm(x - mean) + 1e-4 * np.abs(x).sum())
    np.testing.assert_allclose(ours("fdbd", data), fdbd, rtol=1e-10)
    np.testing.assert_allclose(ours("nci", data), nci, rtol=1e-10)
    probs = softmax(head(bank), axis=1)
    typical = {k: probs[probs.argmax(1) == k].mean(0) for k in np.unique(probs.argmax(1))}
    klm = [-min(np.sum(p * np.log(p / d)) for d in typical.values()) for p in softmax(head(q), axis=1)]
    np.testing.assert_allclose(ours("klm", data), klm, rtol=1e-8, atol=1e-12)


# --------------------------------------------------------------------------- streaming fits

@pytest.mark.parametrize("name", [n for n, c in ood.SCORERS.items() if c.needs_bank])
def test_chunked_fit_equals_unchunked_fit(data, name):
    np.testing.assert_allclose(ours(name, data, chunk=7), ours(name, data, chunk=10**6), rtol=1e-9, atol=1e-12)


def test_streamed_quantile_is_exact():
    rng = np.random.default_rng(1)
    x = np.round(rng.normal(size=(500, 9)), 1)  # many ties
    half = (rng.normal(size=(700, 5)) * 3).astype(np.float16)  # the float16 path: a count per distinct value
    half[0, :2] = [0.0, -0.0]
    for q in (0.0, 0.05, 0.3, 0.5, 0.77, 0.9, 0.97, 1.0):
        bank = Bank.from_array(x, np.zeros(500, int), chunk=33)
        assert quantile(bank, q) == np.quantile(x, q)
        # a tiny histogram and threshold force several refinement passes
        assert quantile(bank, q, bins=4, exact_below=10) == np.quantile(x, q)
        assert quantile(Bank.from_array(half, np.zeros(700, int), chunk=64), q) == np.quantile(half.astype(float), q)


def tie_heavy_banks(rng):
    """Values where one value holds most ranks: post-ReLU (95% exact zeros, the minimum), ReLU6-clipped (the
    maximum), signed with exact zeros in the middle, two adjacent floats splitting the ranks, and a constant."""
    relu = np.maximum(rng.normal(size=(300, 20)), 0)
    relu[rng.random(relu.shape) < 0.9] = 0
    signed = rng.normal(size=(300, 20))
    signed[rng.random(signed.shape) < 0.8] = 0
    near = np.where(rng.random((300, 20)) < 0.5, 1.0, np.nextafter(1.0, 2.0))
    near[:3] = rng.normal(size=(3, 20))
    return {"relu": relu, "relu6": np.minimum(np.abs(rng.normal(size=(300, 20))) * 8, 6.0), "signed": signed,
            "adjacent": near, "constant": np.full((300, 20), 0.25)}


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_streamed_quantile_with_a_tie_covering_the_rank(dtype):
    """More values tie at the percentile than the refinement may collect (exact_below, 4M by default, 50 here):
    np.quantile's value, in one pass over the bank where the tie sits at the bank's minimum or maximum
    (post-ReLU zeros, ReLU6's 6). The histogram refinement used to narrow towards the tied value for
    ~68 passes and then hand np.histogram decreasing bin edges (ValueError)."""
    for name, x in tie_heavy_banks(np.random.default_rng(3)).items():
        x = x.astype(dtype)
        reads = []
        bank = Bank(lambda rows, x=x: reads.append(len(rows)) or x[rows], np.zeros(len(x), int), chunk=64)
        for q in (0.0, 0.1, 0.5, 0.9, 0.95, 0.97, 0.999, 1.0):
            reads.clear()
            got = quantile(bank, q, bins=16, exact_below=50)
            assert got == np.quantile(x.astype(np.float64), q), (name, q)
            # np.percentile divides 100q by 100 again, which is not always q to the last bit
            assert got == pytest.approx(np.percentile(x.astype(np.float64), 100 * q), rel=1e-12), (name, q)
            passes = (sum(reads) - 1) / x.shape[0]  # less the one row read for the bank's dtype
            v, pos = np.sort(x.astype(np.float64).ravel()), q * (x.size - 1)
            ranks = np.flatnonzero(v == got)  # the tie at the answer covers both order statistics, at an end
            if got in (v[0], v[-1]) and ranks[0] <= np.floor(pos) and min(np.floor(pos) + 1, x.size - 1) <= ranks[-1]:
                assert passes == 1, (name, q, passes)


def test_chunked_top_k_equals_a_full_sort():
    rng = np.random.default_rng(2)
    bank, queries, scale = rng.normal(size=(301, 6)), rng.normal(size=(23, 6)), rng.uniform(0.5, 2, 301)
    full = -np.sort(-(queries @ (bank * scale[:, None]).T), axis=1)[:, :9]
    got = topk_similarities(queries, bank.astype(np.float32), 9, scale, chunk=40, query_chunk=5)
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="k=400 exceeds the 301 rows"):
        topk_similarities(queries, bank, 400)


# --------------------------------------------------------------------------- the registry

def test_registry_names_and_arguments():
    def subclasses(cls):
        return [c for sub in cls.__subclasses__() for c in (sub, *subclasses(sub))]

    defined = {c.name for c in subclasses(ood.Scorer) if "name" in vars(c)}  # every scorer class the code defines
    assert set(ood.resolve(["all"])) == defined and len(defined) == 22
    assert ood.resolve(["energy", "all"])[:2] == ["energy", "msp"]  # given order first, no name twice
    assert ood.parse_args(["react.percentile=0.95", "knn.k=7"]) == {"react": {"percentile": "0.95"}, "knn": {"k": "7"}}
    assert ood.make("knn", k="7").args == {"k": 7}
    for bad, msg in ((["nope.k=1"], "unknown scorer 'nope'"), (["knn.q=1"], "knn has no hyperparameter 'q'"),
                     (["knn=1"], "expected SCORER.PARAM=VALUE")):
        with pytest.raises(ValueError, match=msg):
            ood.parse_args(bad)
    with pytest.raises(ValueError, match="knn.k='seven': input should be a valid integer"):
        ood.make("knn", k="seven")
    for name, arg, msg in (("react", {"percentile": 1.5}, r"react.percentile=1.5: input should be less than 1"),
                           ("knn", {"k": 0}, r"knn.k=0: input should be greater than or equal to 1")):
        with pytest.raises(ValueError, match=msg):
            ood.make(name, **arg)
    with pytest.raises(ValueError, match="unknown scorer 'foo'"):
        ood.resolve(["msp", "foo"])
    assert all(c.reference and c.name for c in ood.SCORERS.values())


# --------------------------------------------------------------------------- through the CLI

def test_all_scorers_through_probe_and_score(caches, tmp_path):
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["probe", "-m", "m", "-f", "cls,reg", "--train", "train", "--val", "val",
                                  "--test", "test", "--anomaly", "far", "--cache", str(caches), "--out", str(out),
                                  "--iterations", "50", "--batch-size", "64", "--scorers", "all", "--scorer-arg",
                                  "knn.k=3", "--scorer-arg", "react.percentile=0.8", "--stream", "--no-plots", "-q"])
    assert r.exit_code == 0, r.output
    df = pd.read_parquet(out / "results.parquet")
    ano = df[df.role == "anomaly"]
    assert set(ano.scorer) == set(ood.SCORERS)
    assert set(ano.metric) == set(ood.METRICS) == {"fpr95", "fpr95_openood", "auroc", "ap_in", "ap_out",
                                                   "aupr_in_openood", "aupr_out_openood"}
    assert json.loads(ano[ano.scorer == "knn"].scorer_args.iloc[0]) == {"k": 3}
    assert json.loads(ano[ano.scorer == "react"].scorer_args.iloc[0]) == {"percentile": 0.8}
    assert np.isfinite(ano.value).all()
    s = CliRunner().invoke(main, ["score", str(out), "--anomaly", "far", "--scorers", "all", "--scorer-arg",
                                  "knn.k=3", "--scorer-arg", "react.percentile=0.8", "--out", str(tmp_path / "s")])
    assert s.exit_code == 0, s.output
    again = pd.read_parquet(tmp_path / "s" / "results.parquet")
    key = ["features", "set", "metric", "scorer"]
    pd.testing.assert_series_equal(again[again.role == "anomaly"].set_index(key).value.sort_index(),
                                   ano.set_index(key).value.sort_index(), rtol=1e-9)
    bad = CliRunner().invoke(main, ["score", str(out), "--anomaly", "far", "--scorer-arg", "knn.z=1"])
    assert bad.exit_code == 2 and "knn has no hyperparameter 'z'" in bad.output
    listing = CliRunner().invoke(main, ["scorers"])
    assert listing.exit_code == 0 and all(n in listing.output for n in ood.SCORERS) and "ICLR 2023" in listing.output


def test_near_far_means_and_the_ood_validation_set(caches, tmp_path):
    """Anomaly sets group by their manifest's split: near-ood and far-ood get their own means (OpenOOD's tables),
    an ood-val set is reported alone and enters no mean; the report labels both FPR95 conventions apart."""
    from conftest import make_set

    from regcache.store import FeatureSet

    rng = np.random.default_rng(5)
    for name, split, shift in (("near1", "near-ood", 1.0), ("far1", "far-ood", 6.0), ("far2", "far-ood", 8.0),
                               ("oval", "ood-val", 3.0)):
        x = {f: (rng.normal(size=(40, 4)) + shift).astype(np.float32) for f in ("cls", "reg")}
        fs = make_set(caches, name, x, -np.ones(40, int), role="anomaly", split=split)
        assert FeatureSet(fs.path).meta.dataset.split == split
    out = tmp_path / "run"
    r = CliRunner().invoke(main, ["probe", "-m", "m", "-f", "cls,reg", "--train", "train", "--val", "val",
                                  "--anomaly", "far,near1,far1,far2,oval", "--cache", str(caches), "--out", str(out),
                                  "--iterations", "30", "--scorers", "msp,knn", "--no-plots", "-q"])
    assert r.exit_code == 0, r.output
    df = pd.read_parquet(out / "results.parquet")
    v = df[df.role == "anomaly"].set_index(["set", "metric", "scorer"]).value
    for metric in ("fpr95", "fpr95_openood", "auroc"):
        for scorer in ("msp", "knn"):
            assert v["mean", metric, scorer] == pytest.approx(np.mean([v[s, metric, scorer]
                                                                       for s in ("far", "near1", "far1", "far2")]))
            assert v["mean near-ood", metric, scorer] == pytest.approx(v["near1", metric, scorer])
            assert v["mean far-ood", metric, scorer] == pytest.approx((v["far1", metric, scorer]
                                                                       + v["far2", metric, scorer]) / 2)
    assert not any(s.startswith("mean") and "val" in s for s in df.set)
    md = (out / "results.md").read_text()
    head = next(line for line in md.splitlines() if line.startswith("| model | features | scorer |"))
    assert head.split(" | ")[3:] == ["far", "near1", "far1", "far2", "oval", "mean (4 sets)", "mean near-ood (1 set)",
                                     "mean far-ood (2 sets) |"], head  # each set once, then the means (ood-val in none)
