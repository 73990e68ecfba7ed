"""Block features (--layers, NAME@-k): stored values equal a manual loop over timm's blocks; names parse strictly."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from regcache.extract import extract
from regcache.features import FEATURES, FeatureError, parse_features, parse_layers, with_layers
from regcache.models import Preprocess
from regcache.store import FeatureSet

from conftest import NOREG, REG, RESIZE, SIZE, config, make_shards


def block_loop(name: str, ckpt, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.nn.Module]:
    """Every block's output by running timm's modules one by one (no forward_intermediates, no regcache)."""
    model = timm.create_model(name, pretrained=False, img_size=SIZE, num_classes=0).eval()
    model.load_state_dict(load_file(str(ckpt)))
    outs = []
    with torch.no_grad():
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
        for blk in model.blocks:
            x = blk(x)
            outs.append(x)
    return outs, model.norm


def stored_images(fs: FeatureSet, pre: Preprocess, tars) -> torch.Tensor:
    from regcache.data import decode_image, open_shard

    imgs = [pre(decode_image(s, ("png",))) for t in tars for s in open_shard(t, allow_pipe=False)]
    return pre.normalize(torch.stack(imgs))


@pytest.mark.parametrize("name,ckpt_fixture", [(REG, "reg_ckpt"), (NOREG, "noreg_ckpt")])
def test_block_features_equal_a_manual_block_loop(name, ckpt_fixture, request, tmp_path):
    ckpt = request.getfixturevalue(ckpt_fixture)
    data = make_shards(tmp_path / "shards", n_shards=1, per_shard=6)
    res = extract(config(name, ckpt, data, tmp_path / "cache", layers=parse_layers("last4"), dtype="float32"))
    fs = FeatureSet(res.path)
    bases = ("cls", "patch", "norms") + (("reg",) if name == REG else ())
    assert set(fs.features) == set(bases) | {f"{b}@{k}" for b in bases for k in (-4, -3, -2)}
    assert "DINOv2" in fs.layout.to_dict()["blocks"] and fs.layout.depth == 12
    got = fs.load(concat=False)
    blocks, norm = block_loop(name, ckpt, stored_images(fs, Preprocess(size=SIZE, resize=RESIZE),
                                                             [str(tmp_path / "shards" / "part-000.tar")]))
    p, r = fs.layout.patch_slice, fs.layout.reg_slice
    for k in (-4, -3, -2, -1):
        pre = blocks[k]
        with torch.no_grad():
            post = norm(pre)
        ref = {"cls": post[:, 0], "patch": post[:, p].mean(1), "norms": pre.norm(dim=-1), "reg": post[:, r].mean(1)}
        for b in bases:
            stored = got.x[b if k == -1 else f"{b}@{k}"]
            np.testing.assert_allclose(stored, ref[b].numpy(), rtol=1e-4, atol=1e-4, err_msg=f"{b}@{k}")
    # blocks differ from one another, so the equalities above say which block was stored
    assert np.abs(got.x["cls@-2"] - got.x["cls"]).max() > 1e-2
    # the probe's loader concatenates them in the order named
    both = fs.load("cls@-2,cls").x
    np.testing.assert_array_equal(both, np.concatenate([got.x["cls@-2"], got.x["cls"]], axis=1))


def test_block_feature_names():
    assert parse_features("cls@-1,cls@-2,patch") == ("cls", "cls@-2", "patch")
    assert "cls@-3" in FEATURES and "tokens@-2" not in FEATURES and "cls@2" not in FEATURES
    assert FEATURES["norms@-2"].description.endswith("from block -2")
    assert parse_layers("last4") == (-4, -3, -2, -1) and parse_layers("8, 9,11") == (8, 9, 11)
    assert with_layers(("cls", "tokens"), (9, 10, -1), depth=12) == ("cls", "tokens", "cls@-3", "cls@-2")
    for bad, msg in (("cls@2", "counted from the last"), ("tokens@-2", "per block"), ("cls@x", "counted"),
                     ("foo@-1", "per block")):
        with pytest.raises(FeatureError, match=msg):
            parse_features(bad)
    for bad, msg in (("last0", "positive N"), ("lastx", "positive N"), ("a,b", "block indices"), (",", "no block")):
        with pytest.raises(FeatureError, match=msg):
            parse_layers(bad)
    with pytest.raises(FeatureError, match="block 12 does not exist in a model of 12 blocks"):
        with_layers(("cls",), (12,), depth=12)


def test_a_block_the_model_lacks_is_refused(reg_ckpt, tmp_path):
    data = make_shards(tmp_path / "shards", n_shards=1, per_shard=1)
    with pytest.raises(FeatureError, match="12 blocks, so it has no cls@-13"):
        extract(config(REG, reg_ckpt, data, tmp_path / "cache", features=("cls", "cls@-13")))


def test_norms_gain_a_per_block_view(reg_ckpt, tmp_path):
    from click.testing import CliRunner

    from regcache.cli import main

    data = make_shards(tmp_path / "shards", n_shards=1, per_shard=4)
    res = extract(config(REG, reg_ckpt, data, tmp_path / "cache", features=("cls", "norms"), layers=(-3, -1),
                         dtype="float32"))
    fs = FeatureSet(res.path)
    out = tmp_path / "norms"
    run = CliRunner().invoke(main, ["norms", str(res.path), "--out", str(out)])
    assert run.exit_code == 0, run.output
    assert "block  -3: patch median" in run.output and (out / "block_norms.png").is_file()
    (summary,) = json.loads((out / "summary.json").read_text())
    assert set(summary["blocks"]) == {"-3", "-1"}
    x = fs.load("norms@-3,norms", concat=False).x
    for block, name in (("-3", "norms@-3"), ("-1", "norms")):
        patches, regs = x[name][:, 5:], x[name][:, 1:5]  # [cls, 4 registers, 16 patches]
        assert summary["blocks"][block]["patch_median"] == pytest.approx(float(np.median(patches)), rel=1e-6)
        assert summary["blocks"][block]["patch_max"] == pytest.approx(float(patches.max()), rel=1e-6)
        assert summary["blocks"][block]["registers_median"] == pytest.approx(float(np.median(regs)), rel=1e-6)
    assert summary["blocks"]["-3"]["patch_median"] != pytest.approx(summary["blocks"]["-1"]["patch_median"])


def test_extract_cli_names_a_bad_layers_value(tmp_path):
    from click.testing import CliRunner

    from regcache.cli import main

    res = CliRunner().invoke(main, ["extract", "-m", REG, "-d", str(tmp_path / "x-{000..001}.tar"), "--random-init",
                                    "0", "--layers", "last0", "--cache", str(tmp_path)])
    assert res.exit_code == 2 and "--layers: 'last0': lastN needs a positive N" in res.output, res.output
