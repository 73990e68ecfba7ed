"""Norm, outlier, feature-map and attention analyses against hand-made cases and direct computations."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from regcache import analysis
from regcache.cli import main
from regcache.extract import extract
from regcache.features import TokenLayout
from regcache.models import Preprocess
from regcache.store import FeatureSet, StoreError
from regcache.tokens import layout_of

from conftest import NOREG, REG, SIZE, config, make_shards, record

REG_LAYOUT = TokenLayout(has_cls=True, num_reg=4, grid=(3, 4), dim=8)
NOREG_LAYOUT = TokenLayout(has_cls=True, num_reg=0, grid=(3, 4), dim=8)
END_LAYOUT = TokenLayout(has_cls=True, num_reg=2, grid=(3, 4), dim=8, registers="end")  # test-time registers


@pytest.mark.parametrize("layout", [REG_LAYOUT, NOREG_LAYOUT, END_LAYOUT])
def test_a_token_at_a_known_cell_lights_that_cell(layout):
    norms = np.ones((2, layout.num_tokens))
    row, col = 1, 3
    norms[1, layout.num_prefix + row * layout.grid[1] + col] = 50.0  # patch (1, 3), row-major
    norms[:, 0] = 7.0                                                 # the class token
    parts = analysis.split_norms(norms, layout)
    assert parts["patches"].shape == (2, 3, 4) and parts["patches"][1, row, col] == 50.0
    assert np.count_nonzero(parts["patches"] != 1) == 1 and np.all(parts["cls"] == 7.0)
    assert ("registers" in parts) == bool(layout.num_reg)
    if layout.num_reg:  # registers by hand: after [CLS] for trained ones, after the 12 patches for test-time ones
        norms[:, 1 + 12 * (layout.registers == "end") + np.arange(layout.num_reg)] = 3.0
        assert np.all(analysis.split_norms(norms, layout)["registers"] == 3.0)


def test_hand_made_outliers_give_known_threshold_counts_and_positions():
    rng = np.random.default_rng(0)
    n, layout = 50, REG_LAYOUT
    norms = rng.uniform(1, 2, size=(n, layout.num_tokens))
    # 12 patches per image x 50 images = 600 patch tokens; the top 2% = 12 tokens, put in known places
    for i in range(12):
        norms[i, layout.num_prefix + 5] = 100.0 + i   # images 0..11, grid cell (1, 1)
    summary, heat = analysis.summarize("toy", norms, layout)
    patches = norms[:, layout.num_prefix:]
    assert summary.threshold == pytest.approx(np.percentile(patches, 98))
    assert summary.images_with_outlier == pytest.approx(12 / 50)
    assert summary.outliers_per_image == pytest.approx(12 / 50)
    expected = np.zeros((3, 4))
    expected[1, 1] = 12 / 50
    np.testing.assert_allclose(heat, expected)
    assert summary.max_norm["patches"] == 111.0


def test_norms_and_featuremap_commands_match_numpy_on_the_stored_array(reg_ckpt, noreg_ckpt, tmp_path):
    data = make_shards(tmp_path / "shards", n_shards=2, per_shard=4)
    a = extract(config(REG, reg_ckpt, data, tmp_path / "c")).path
    b = extract(config(NOREG, noreg_ckpt, data, tmp_path / "c")).path
    out = tmp_path / "norms"
    r = CliRunner().invoke(main, ["norms", str(a), str(b.relative_to(tmp_path / "c")), "--cache",
                                  str(tmp_path / "c"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary) == 2
    for s, path in zip(summary, (a, b)):
        fs = FeatureSet(path)
        norms = fs.load("norms").x.reshape(len(fs.index), -1)
        patches = norms[:, fs.layout.num_prefix:]
        thr = np.percentile(patches, 98)
        assert s["threshold"] == pytest.approx(thr, rel=1e-5)
        assert s["outliers_per_image"] == pytest.approx((patches > thr).sum(1).mean())
        assert s["median_norm"]["cls"] == pytest.approx(np.median(norms[:, 0]), rel=1e-5)
    for png in ("norm_histograms.png", "outlier_positions.png"):
        assert Image.open(out / png).size[0] > 100
    r = CliRunner().invoke(main, ["featuremap", str(a), "--keys", "img00001,img00006", "--out", str(tmp_path / "fm")])
    assert r.exit_code == 0, r.output
    pngs = sorted((tmp_path / "fm").glob("*.png"))
    assert [p.name for p in pngs] == ["featuremap__img00001.png", "featuremap__img00006.png"]
    assert Image.open(pngs[0]).size[0] > Image.open(tmp_path / "fm" / "featuremap__img00006.png").size[1]  # 2 panels
    r = CliRunner().invoke(main, ["featuremap", str(a), "--keys", "nope", "--out", str(tmp_path / "fm2")])
    assert r.exit_code == 1 and "no rows for keys nope" in r.output


def test_attention_rows_sum_to_one_and_maps_have_the_grid_shape(reg_ckpt):
    from regcache.models import load_model
    from regcache.settings import Backbone

    model = load_model(Backbone(model=REG, checkpoint=str(reg_ckpt)), SIZE)
    layout = layout_of(model)
    x = torch.randn(2, 3, SIZE, SIZE)
    probs = analysis.last_block_attention(model, x)
    assert probs.shape == (2, model.blocks[-1].attn.num_heads, layout.num_tokens, layout.num_tokens)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    # the recomputed probabilities reproduce the block's own (fused) attention output
    attn = model.blocks[-1].attn
    seen = {}
    h = attn.register_forward_hook(lambda m, i, o: seen.update(x=i[0], out=o))
    with torch.inference_mode():
        model.forward_features(x)
    h.remove()
    b, t, d = seen["x"].shape
    v = attn.qkv(seen["x"]).reshape(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)[2]
    mine = attn.proj((probs @ v).transpose(1, 2).reshape(b, t, d))
    torch.testing.assert_close(mine, seen["out"], rtol=1e-4, atol=1e-5)
    maps = analysis.attention_maps(model, x, layout, registers=True)
    assert set(maps) == {"cls", "reg1", "reg2", "reg3", "reg4"} and maps["cls"].shape == (2, *layout.grid)
    sims = analysis.neighbour_similarity(model, x, layout)
    assert sims.shape == (2, *layout.grid) and sims.abs().max() <= 1 + 1e-5


def test_qkv_norms_equal_projections_of_a_manual_block_loop(reg_ckpt, tmp_path):
    from regcache.models import load_model
    from regcache.settings import Backbone

    model = load_model(Backbone(model=REG, checkpoint=str(reg_ckpt)), SIZE)
    layout = layout_of(model)
    x = torch.randn(2, 3, SIZE, SIZE)
    got = analysis.qkv_norms(model, x, layout, (-2, -1))
    with torch.inference_mode():  # timm's modules one by one; q_norm/k_norm are identities in this model
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        inputs = []
        for blk in model.blocks:
            inputs.append(blk.norm1(h))
            h = blk(h)
    d = layout.dim
    for b in (-2, -1):
        qkv = model.blocks[b].attn.qkv(inputs[b])[:, layout.patch_slice]  # [B, L, 3D]
        for i, name in enumerate("qkv"):
            ref = qkv[..., i * d:(i + 1) * d].norm(dim=-1).reshape(2, *layout.grid)
            torch.testing.assert_close(got[b][name], ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got[-2]["k"], got[-1]["k"])
    img = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 70, 3), dtype=np.uint8)).save(img)
    r = CliRunner().invoke(main, ["attention", "-m", REG, "--checkpoint", str(reg_ckpt), "-i", str(img), "--size",
                                  str(SIZE), "--resize", "64", "--display", "64", "--qkv", "2",
                                  "--out", str(tmp_path / "att")])
    assert r.exit_code == 0, r.output
    assert "block -2: mean norm at" in r.output and (tmp_path / "att" / "qkv__a.png").is_file()
    assert set(json.loads((tmp_path / "att" / "qkv.json").read_text())["blocks"]) == {"-2", "-1"}


def test_neighbour_similarity_against_a_loop():
    class Embed(torch.nn.Module):
        def forward(self, x):
            return x.flatten(2).transpose(1, 2)  # each pixel is a "patch"

    class M:
        patch_embed = Embed()

    layout = TokenLayout(has_cls=True, num_reg=0, grid=(3, 4), dim=2)
    x = torch.randn(1, 2, 3, 4)
    got = analysis.neighbour_similarity(M(), x, layout)[0]
    e = torch.nn.functional.normalize(x[0].permute(1, 2, 0), dim=-1)
    for i in range(3):
        for j in range(4):
            steps = ((0, 1), (1, 0), (0, -1), (-1, 0))
            nb = [(i + di, j + dj) for di, dj in steps if 0 <= i + di < 3 and 0 <= j + dj < 4]
            want = sum(float(e[i, j] @ e[a, b]) for a, b in nb) / len(nb)
            assert float(got[i, j]) == pytest.approx(want, abs=1e-5)


@pytest.mark.slow
def test_real_cls_attention_on_a_centred_object_is_not_uniform(offline_vits14, tmp_path):
    from skimage import data as skdata

    weights = offline_vits14
    img = tmp_path / "coffee.png"
    Image.fromarray(skdata.coffee()).save(img)
    out = tmp_path / "att"
    r = CliRunner().invoke(main, ["attention", "-m", "vit_small_patch14_dinov2", "--checkpoint", str(weights),
                                  "-i", str(img), "--similarity", "--display", "224", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "attention__coffee.png").stat().st_size > 1000 and (out / "neighbour_similarity.png").is_file()
    from regcache.models import load_model
    from regcache.settings import Backbone
    model = load_model(Backbone(model="vit_small_patch14_dinov2", checkpoint=str(weights)), 224)
    pre = Preprocess()
    m = analysis.attention_maps(model, pre.normalize(pre(Image.open(img).convert("RGB"))[None]),
                                layout_of(model))["cls"][0]
    uniform = m.sum() / m.numel()
    assert float(m.max()) > 5 * float(uniform)  # concentrated, far from uniform
    r = CliRunner().invoke(main, ["attention", "-m", "vit_small_patch14_dinov2", "--checkpoint", str(weights),
                                  "-i", str(img), "--registers", "--out", str(out)])
    assert r.exit_code == 1 and "no register tokens" in r.output


def test_token_probe_reads_positions_from_normal_tokens_but_not_from_outliers(tmp_path):
    from regcache.store import FeatureSet as FS

    layout = TokenLayout(has_cls=True, num_reg=0, grid=(3, 4), dim=16)
    rng = np.random.default_rng(0)
    n, length = 200, 12
    embed = rng.normal(size=(length, 16)) * 2
    tokens = embed[None] + rng.normal(size=(n, length, 16)) * 0.3     # position is linearly readable
    norms = rng.uniform(1, 2, size=(n, 1 + length))
    flat = rng.choice(n * length, size=40, replace=False)              # 1.7% outliers: high norm, no position
    img, pos = np.divmod(flat, length)
    tokens[img, pos] = rng.normal(size=(40, 16)) * 2
    norms[img, 1 + pos] = 100.0
    ident = {"model": "m", "features": ["norms", "tokens"], "data": "t"}
    fs = FS.create(tmp_path / "fs", ident, record(["tokens", "norms"], layout, "float32", n, 1, "t"))
    fs.commit_unit(0, {"tokens": tokens.astype(np.float32), "norms": norms.astype(np.float32)},
                   [(f"k{i}", 0, 0) for i in range(n)])
    fs.finalize()
    r = analysis.token_probe(FS(tmp_path / "fs"), iterations=300)
    assert r.chance == pytest.approx(1 / 12) and r.test_images == 40 and r.outliers > 0
    assert r.accuracy_normal > 0.95 and r.accuracy_outliers < 0.4
    out = tmp_path / "tp"
    res = CliRunner().invoke(main, ["tokenprobe", str(tmp_path / "fs"), "--iterations", "300", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "tokenprobe.json").read_text())[0]["accuracy_normal"] == pytest.approx(r.accuracy_normal)


def test_pixel_probe_rebuilds_normal_patches_but_not_outliers(tmp_path):
    from regcache.store import FeatureSet as FS

    layout = TokenLayout(has_cls=True, num_reg=0, grid=(2, 3), dim=16)
    rng = np.random.default_rng(0)
    n, length, p = 150, 6, 2
    mix = rng.normal(size=(16, p * p * 3)) * 0.05
    tokens = rng.normal(size=(n, length, 16))
    patches = np.clip(0.5 + tokens @ mix, 0, 1)                        # pixels: linear in the token
    norms = rng.uniform(1, 2, size=(n, 1 + length))
    flat = rng.choice(n * length, size=15, replace=False)              # outliers: pixels unrelated to the token
    img, pos = np.divmod(flat, length)
    patches[img, pos] = rng.uniform(0, 1, size=(15, p * p * 3))
    norms[img, 1 + pos] = 100.0
    crops = (patches.reshape(n, 2, 3, p, p, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * p, 3 * p, 3) * 255)
    fs = FS.create(tmp_path / "fs", {"model": "m", "features": ["norms", "tokens"], "data": "t"},
                   record(["tokens", "norms"], layout, "float32", n, 1, "t"))
    fs.commit_unit(0, {"tokens": tokens.astype(np.float32), "norms": norms.astype(np.float32)},
                   [(f"k{i}", 0, 0) for i in range(n)])
    fs.finalize()
    r = analysis.pixel_probe(FS(tmp_path / "fs"), ridge=1e-3,
                             crops={f"k{i}": crops[i].round().astype(np.uint8) for i in range(n)})
    assert r.patch_pixels == 12 and r.test_images == 30 and r.outliers > 0
    assert r.rmse_normal < 0.01 < 0.2 < r.rmse_outliers  # uint8 rounding only vs uniform noise (~0.3)
    assert r.rmse_mean_patch > 5 * r.rmse_normal
    with pytest.raises(StoreError, match="no longer in the shards"):
        analysis.pixel_probe(FS(tmp_path / "fs"), crops={})
