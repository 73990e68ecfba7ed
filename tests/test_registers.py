"""Test-time registers: a planted register neuron is found, the intervention equals a hand-written block loop,
an image's features do not depend on its batchmates, and neuron files are checked against the model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import save_file

from regcache.cli import main
from regcache.extract import extract
from regcache.models import load_model
from regcache.settings import Backbone
from regcache.registers import RegisterError, RegisterNeurons, find_neurons, install
from regcache.store import FeatureSet
from regcache.tokens import layout_of, token_features

from conftest import NOREG, REG, SIZE, config, make_shards

BLOCK, NEURON, POSITION, CHANNEL = 1, 7, 5, 3


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Random weights with one planted register neuron: block 1's hidden neuron 7 fires only at patch 5
    (its position embedding carries channel 3) and writes a large vector there, a high-norm token."""
    torch.manual_seed(0)
    model = timm.create_model(NOREG, pretrained=False, img_size=SIZE, num_classes=0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".gamma"):
                p.copy_(torch.randn_like(p) * 0.5)
        model.pos_embed[0, 1 + POSITION, CHANNEL] += 30
        mlp = model.blocks[BLOCK].mlp
        mlp.fc1.weight[NEURON] = 0
        mlp.fc1.weight[NEURON, CHANNEL], mlp.fc1.bias[NEURON] = 5, -20
        model.blocks[BLOCK].ls2.gamma.fill_(1)
        mlp.fc2.weight[:, NEURON] = torch.randn(model.embed_dim) * 2
    path = tmp_path_factory.mktemp("planted") / "planted.safetensors"
    save_file(model.state_dict(), str(path))
    return path


def images(n: int = 6, seed: int = 0) -> torch.Tensor:
    """Random images at different contrasts, so that activations (and their per-image maxima) differ."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=g) * torch.linspace(0.3, 2.0, n).view(n, 1, 1, 1)


def load(ckpt) -> torch.nn.Module:
    return load_model(Backbone(model=NOREG, checkpoint=str(ckpt)), SIZE)


REGCACHE_RULES = {"outliers": "patches", "averaging": "pooled", "sparsity": False}  # regcache's earlier rules


@pytest.mark.parametrize("rules", [{}, REGCACHE_RULES], ids=["authors", "regcache"])
def test_find_neurons_recovers_the_planted_neuron(planted, rules):
    model, x = load(planted), images(8)
    auto = find_neurons(model, [x[:3], x[3:]], top_k=1, **rules)
    assert auto.neurons == {BLOCK: [NEURON]} and auto.detect_layer >= BLOCK
    by_threshold = find_neurons(model, [x], detect_layer=BLOCK, threshold=100.0, top_k=3, **rules)
    assert by_threshold.outliers == len(x)  # patch 5 of every image, nothing else
    assert by_threshold.scores[0][:2] == (BLOCK, NEURON) and by_threshold.scores[0][2] > 10 * by_threshold.scores[1][2]
    tokens = 16 if rules else 17  # the authors' rule counts [CLS] among the candidates
    assert by_threshold.percentile == pytest.approx(100 * (1 - 1 / tokens))
    with pytest.raises(RegisterError, match="at block 0 has a norm above"):
        find_neurons(model, [x], detect_layer=0, threshold=1e6, **rules)


def _by_hand(model, x, upto: int):
    """Every block's output norms [N, blocks, T] and MLP activations {block: [N, T, H]}, timm's block parts called
    one by one."""
    norms, acts = [], {}
    with torch.no_grad():
        h = model._pos_embed(model.patch_embed(x))
        for i, blk in enumerate(model.blocks):
            h = h + blk.ls1(blk.attn(blk.norm1(h)))
            a = blk.mlp.act(blk.mlp.fc1(blk.norm2(h)))
            if i <= upto:
                acts[i] = a.clone()
            h = h + blk.ls2(blk.mlp.fc2(a))
            norms.append(h.norm(dim=-1))
    return torch.stack(norms, 1), acts


@pytest.mark.parametrize("outliers", ["all", "patches"])
@pytest.mark.parametrize("averaging", ["per-image", "pooled"])
@pytest.mark.parametrize("sparsity", [True, False])
def test_neuron_scores_equal_their_definitions_by_brute_force(planted, outliers, averaging, sparsity):
    """Images of several contrasts, so that images hold different numbers of outliers (and the two averagings
    differ); every score recomputed by loops from the definitions (docs/registers.md)."""
    model, x = load(planted), images(6)
    detect, upto = 2, 2
    norms, acts = _by_hand(model, x, upto)
    cand = norms[:, detect, (0 if outliers == "all" else 1):]
    threshold = float(np.percentile(cand.flatten().numpy(), 85))
    found = find_neurons(model, [x[:4], x[4:]], detect_layer=detect, max_layer=upto, threshold=threshold, top_k=5000,
                         outliers=outliers, averaging=averaging, sparsity=sparsity)
    first = 0 if outliers == "all" else 1
    want = {}
    for i, a in acts.items():  # loops over images and outlier tokens; each neuron is a column
        a = a.double().numpy()
        per_image, pooled, count = [], np.zeros(a.shape[2]), 0
        for b in range(len(x)):
            pos = [t for t in range(first, a.shape[1]) if norms[b, detect, t] > threshold]
            if not pos:
                continue
            below = sum((a[b, t] < 0.5).astype(float) for t in range(a.shape[1]))  # tokens below 0.5, per neuron
            gate = (below >= 0.5 * a.shape[1]) if sparsity else np.ones(a.shape[2])
            values = [np.abs(a[b, t]) * gate for t in pos]
            per_image.append(sum(values) / len(values))
            pooled += sum(values)
            count += len(pos)
        score = sum(per_image) / len(per_image) if averaging == "per-image" else pooled / count
        want.update({(i, n): float(v) for n, v in enumerate(score)})
    assert len(found.scores) == len(want) and found.outliers == count
    for i, n, score in found.scores:
        assert score == pytest.approx(want[i, n], rel=1e-4, abs=1e-6), (i, n)
    ranked = sorted(want, key=lambda k: -want[k])[:10]
    assert [s[:2] for s in found.scores[:10]] == ranked or \
        [round(want[k], 5) for k in ranked] == [round(s[2], 5) for s in found.scores[:10]]  # ties in either order


def reference(model: torch.nn.Module, x: torch.Tensor, neurons: dict, k: int, patches: str,
              value: str) -> torch.Tensor:
    """The last block's output with test-time registers, by hand: timm's block parts called one by one,
    the intervention as loops over images and neurons (``block``: the authors' sign_max, the entry of largest
    |activation| over every token and listed neuron, a tie to the negative one; ``neuron``: each neuron's over
    the patches)."""
    with torch.no_grad():
        h = model._pos_embed(model.patch_embed(x))
        h = torch.cat([h, torch.zeros(len(x), k, h.shape[-1])], dim=1)
        for i, blk in enumerate(model.blocks):
            h = h + blk.ls1(blk.attn(blk.norm1(h)))
            a = blk.mlp.act(blk.mlp.fc1(blk.norm2(h)))
            for b in range(len(x)):
                listed = neurons.get(i, [])
                if listed and value == "block":
                    entries = [float(a[b, t, n]) for t in range(a.shape[1]) for n in listed]
                    top, bottom = max(entries), min(entries)
                    m = top if abs(top) > abs(bottom) else bottom
                for n in listed:
                    if value == "neuron":
                        at = a[b, 1:-k, n]
                        m = at[at.abs().argmax()]
                    a[b, -k:, n] = m
                    if patches == "zero":
                        a[b, 1:-k, n] = 0
            h = h + blk.ls2(blk.mlp.fc2(a))
    return h


@pytest.mark.parametrize("value", ["block", "neuron"])
@pytest.mark.parametrize("patches", ["zero", "keep"])
def test_installed_registers_equal_a_hand_written_forward(planted, patches, value):
    neurons, k, x = {BLOCK: [NEURON], 3: [1, 2, 3]}, 2, images()
    ref = reference(load(planted), x, neurons, k, patches, value)
    model = load(planted)
    handle = install(model, neurons, k, patches, value)
    layout = layout_of(model)
    assert (layout.registers, layout.num_reg, layout.num_tokens) == ("end", 2, 1 + 16 + 2)
    got = token_features(model, x, layout, ("cls", "patch", "reg", "reg_all", "norms"))
    post = model.norm(ref)
    np.testing.assert_allclose(got["norms"], ref.norm(dim=-1), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(got["reg_all"], post[:, -k:], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["reg"], post[:, -k:].mean(1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["patch"], post[:, 1:-k].mean(1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got["cls"], post[:, 0], rtol=1e-4, atol=1e-4)
    if patches == "zero":  # the outlier left patch 5 for the registers
        assert got["norms"][:, 1 + POSITION].max() < 100 < got["norms"][:, -k:].min()
    handle.remove()
    assert not hasattr(model, "test_time_registers") and layout_of(model).num_reg == 0
    assert token_features(model, x, layout_of(model), ("norms",))["norms"][:, 1 + POSITION].min() > 1000


def test_features_do_not_depend_on_batchmates(planted):
    model = load(planted)
    neurons = {0: [3, 4], BLOCK: [NEURON], 3: [1, 2]}
    install(model, neurons, 3)
    layout, x, others = layout_of(model), images(4), images(3, seed=1)
    names = ("cls", "reg_all", "norms")
    seen = {}
    watch = model.blocks[0].mlp.act.register_forward_hook(lambda m, i, a: seen.update(reg=a[:, -1, [3, 4]].clone()))
    batched = token_features(model, x, layout, names)
    watch.remove()
    mixed = token_features(model, torch.cat([others[:1], x[2:3], others[1:]]), layout, names)
    for i in range(len(x)):
        alone = token_features(model, x[i:i + 1], layout, names)
        for f in names:
            np.testing.assert_allclose(batched[f][i], alone[f][0], rtol=1e-4, atol=1e-4, err_msg=f"{f} image {i}")
    for f in names:
        np.testing.assert_allclose(mixed[f][1], batched[f][2], rtol=1e-4, atol=1e-4, err_msg=f)
    # not vacuous: the registers' activations (each image's own maxima) differ between images
    assert (seen["reg"].max(0).values - seen["reg"].min(0).values).min() > 0.1


def test_neuron_files_are_checked_against_the_model(planted, reg_ckpt, tmp_path):
    from regcache.identity import registers_of, weights_of
    from regcache.settings import ExtractSettings, SettingsError

    model = load(planted)
    weights = weights_of(Backbone(model=NOREG, checkpoint=planted), SIZE, None)
    f = tmp_path / "n.json"
    RegisterNeurons(NOREG, weights, {BLOCK: [NEURON]}).save(f)
    got, file_digest = RegisterNeurons.load(f)
    assert got.neurons == {BLOCK: [NEURON]} and len(file_digest) == 64
    settings = lambda spec: ExtractSettings(model=NOREG, data="x", test_time_registers=spec)  # noqa: E731
    assert registers_of(settings(f"{f}:3"))["k"] == 3 and registers_of(settings(str(f)))["k"] == 1
    got.check(model, weights, str(f))
    with pytest.raises(RegisterError, match=r"found on other weights .*\(they differ in size\)"):
        got.check(model, {**weights, "size": 112}, str(f))  # the position table resampled to another size
    with pytest.raises(RegisterError, match="block 1 has 1536 hidden neurons, not \\[5000\\]"):
        RegisterNeurons(NOREG, weights, {1: [5000]}).check(model, weights, "x")
    with pytest.raises(FileNotFoundError, match="no file"):
        registers_of(settings(str(tmp_path / "missing.json:2")))
    with pytest.raises(SettingsError, match="K .* must be at least 1"):
        ExtractSettings.make(model=NOREG, data="x", test_time_registers=f"{f}:0")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(RegisterError, match="not a register-neuron file"):
        RegisterNeurons.load(tmp_path / "bad.json")
    with pytest.raises(RegisterError, match="already has 4 trained registers"):
        install(load_model(Backbone(model=REG, checkpoint=str(reg_ckpt)), SIZE), {BLOCK: [NEURON]}, 1)


def test_find_then_extract_through_the_cli(planted, tmp_path):
    data = make_shards(tmp_path / "shards", n_shards=1, per_shard=6)
    out = tmp_path / "neurons.json"
    res = CliRunner().invoke(main, ["registers", "find", "-m", NOREG, "--checkpoint", str(planted), "-d", data,
                                    "--size", str(SIZE), "-n", "5", "-k", "1", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "written to" in res.output and "<- detection" in res.output
    saved = json.loads(out.read_text())
    assert saved["neurons"] == {str(BLOCK): [NEURON]} and saved["settings"]["images"] == 5
    sets = {}
    for k in (1, 2):
        r = extract(config(NOREG, planted, data, tmp_path / "cache", test_time_registers=f"{out}:{k}"))
        sets[k] = FeatureSet(r.path)
    fs = sets[2]
    assert fs.features == ("cls", "patch", "reg", "norms") and fs.layout.registers == "end"
    assert fs.identity["test_time_registers"]["k"] == 2
    assert sets[1].fingerprint != fs.fingerprint
    norms = fs.load("norms", concat=False).x["norms"]
    assert norms[:, -2:].min() > 100 > norms[:, 1:-2].max()
    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 70, 3), dtype=np.uint8)).save(img)
    res = CliRunner().invoke(main, ["attention", "-m", NOREG, "--checkpoint", str(planted), "-i", str(img),
                                    "--size", str(SIZE), "--resize", "64", "--display", "64", "--registers",
                                    "--test-time-registers", f"{out}:2", "--out", str(tmp_path / "att")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "att" / "attention__img.png").is_file()
    res = CliRunner().invoke(main, ["extract", "-m", NOREG, "-d", data, "--random-init", "0", "--size", str(SIZE),
                                    "--cache", str(tmp_path / "c2"), "-q", "--test-time-registers", str(out)])
    assert res.exit_code != 0 and "found on other weights" in res.output, res.output
    res = CliRunner().invoke(main, ["extract", "-m", REG, "-d", data, "--random-init", "0", "--size", str(SIZE),
                                    "--cache", str(tmp_path / "c2"), "-q", "--test-time-registers", str(out)])
    assert res.exit_code != 0 and "4 trained registers" in res.output, res.output


def test_real_vits14_registers_are_per_image(offline_vits14):
    """On real weights (fused attention, real activations): find, install, and batch independence."""
    from skimage import data as skdata

    model = load_model(Backbone(model=NOREG, checkpoint=str(offline_vits14)), 112)
    photos = [skdata.coffee(), skdata.chelsea(), skdata.astronaut(), skdata.rocket()]
    x = torch.stack([torch.nn.functional.interpolate(torch.from_numpy(p).permute(2, 0, 1)[None].float() / 255,
                                                     size=(112, 112), mode="bilinear")[0] for p in photos])
    x = (x - 0.45) / 0.225
    found = find_neurons(model, [x[:2], x[2:]], detect_layer=-1, percentile=98, top_k=4, outliers="patches")
    assert sum(map(len, found.neurons.values())) == 4 and abs(found.outliers - 0.02 * found.tokens) <= 1
    install(model, found.neurons, 1)
    layout = layout_of(model)
    batched = token_features(model, x, layout, ("cls", "reg"))
    for i in range(len(x)):
        alone = token_features(model, x[i:i + 1], layout, ("cls", "reg"))
        for f in ("cls", "reg"):
            np.testing.assert_allclose(batched[f][i], alone[f][0], rtol=1e-4, atol=1e-4, err_msg=f"{f} image {i}")
