"""Stored features equal an independent computation from timm's own forward_features, split by hand."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform

from regcache.extract import extract
from regcache.features import FeatureError
from regcache.models import IMAGENET_MEAN, IMAGENET_STD, Preprocess, load_checkpoint
from regcache.store import FeatureSet

from conftest import NOREG, REG, RESIZE, SIZE, config, make_shards


def timm_reference(name: str, ckpt, tars: list[str]) -> dict[str, np.ndarray]:
    """forward_features + a hook on the last block, with timm's own eval transform; no regcache code."""
    model = timm.create_model(name, pretrained=False, img_size=SIZE, num_classes=0).eval()
    from safetensors.torch import load_file
    model.load_state_dict(load_file(str(ckpt)))
    tf = create_transform(input_size=(3, SIZE, SIZE), interpolation="bicubic", crop_pct=SIZE / RESIZE,
                          mean=IMAGENET_MEAN, std=IMAGENET_STD)
    images = []
    for path in tars:
        with tarfile.open(path) as tar:
            for m in tar:
                if m.name.endswith(".png"):
                    images.append(tf(Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")))
    captured = {}
    model.blocks[-1].register_forward_hook(lambda mod, inp, out: captured.update(pre=out))
    with torch.no_grad():
        x = model.forward_features(torch.stack(images))
    m, has_cls = model.num_reg_tokens, model.cls_token is not None
    c = int(has_cls)
    ref = {"patch": x[:, c + m:].mean(1), "norms": captured["pre"].norm(dim=-1), "tokens": x[:, c + m:]}
    if has_cls:
        ref["cls"] = x[:, 0]
    if m:
        ref["reg"], ref["reg_all"] = x[:, c:c + m].mean(1), x[:, c:c + m]
    return {k: v.numpy() for k, v in ref.items()}


@pytest.mark.parametrize("name,ckpt_fixture", [(REG, "reg_ckpt"), (NOREG, "noreg_ckpt")])
def test_stored_features_equal_timm_forward_features(name, ckpt_fixture, request, tmp_path):
    ckpt = request.getfixturevalue(ckpt_fixture)
    data = make_shards(tmp_path / "shards", n_shards=2, per_shard=5)
    ref = timm_reference(name, ckpt, [str(tmp_path / "shards" / f"part-00{i}.tar") for i in range(2)])
    names = ("cls", "patch", "norms", "tokens") + (("reg", "reg_all") if name == REG else ())
    assert set(ref) == set(names)
    for dtype in ("float32", "float16"):
        res = extract(config(name, ckpt, data, tmp_path / "cache", features=names, dtype=dtype))
        got = FeatureSet(res.path).load(names, concat=False)
        assert list(got.keys) == [f"img{i:05d}" for i in range(10)]
        for f in names:
            r, g = ref[f], got.x[f]
            assert g.shape == r.shape, f
            if dtype == "float32":
                np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=f)
            else:  # within one float16 rounding step of the fp32 value
                step = np.spacing(np.abs(r).astype(np.float16)).astype(np.float32)
                assert np.all(np.abs(g - r) <= step + 1e-5), f
        # features of different images differ (so equality above is not vacuous)
        assert np.abs(got.x["cls"][0] - got.x["cls"][1]).max() > 1e-2


def test_model_without_registers_has_no_register_features(noreg_ckpt, tmp_path):
    data = make_shards(tmp_path / "shards", n_shards=1, per_shard=2)
    res = extract(config(NOREG, noreg_ckpt, data, tmp_path / "cache"))
    fs = FeatureSet(res.path)
    assert fs.features == ("cls", "patch", "norms")
    assert fs.layout.num_reg == 0 and fs.layout.num_tokens == 1 + 16
    with pytest.raises(FeatureError, match="no register tokens"):
        extract(config(NOREG, noreg_ckpt, data, tmp_path / "cache", features=("cls", "reg")))


def test_default_preprocessing_matches_timm_eval_transform():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (300, 410, 3), dtype=np.uint8))
    p = Preprocess()
    ours = p.normalize(p(img)[None])[0]
    theirs = create_transform(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=224 / 256,
                              mean=IMAGENET_MEAN, std=IMAGENET_STD)(img)
    assert torch.equal(ours, theirs)


def test_augmented_views_are_seeded_by_key_and_view():
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, (120, 90, 3), dtype=np.uint8))
    p = Preprocess(size=56, resize=64, views=3, seed=7)
    assert torch.equal(p(img, 1, "a"), p(img, 1, "a"))
    assert not torch.equal(p(img, 1, "a"), p(img, 2, "a"))
    assert not torch.equal(p(img, 1, "a"), p(img, 1, "b"))
    assert not torch.equal(p(img, 1, "a"), Preprocess(size=56, resize=64, views=3, seed=8)(img, 1, "a"))


def test_checkpoint_is_loaded_with_timm_position_embedding_resize(reg_ckpt):
    """A checkpoint made at 56 px loads into a 112 px model (timm resamples pos_embed), any other mismatch fails."""
    model = timm.create_model(REG, pretrained=False, img_size=112, num_classes=0)
    load_checkpoint(model, reg_ckpt)
    assert model.pos_embed.shape[1] == 64


def test_model_without_class_token_has_no_cls():
    from regcache.features import select_features
    from regcache.tokens import layout_of, token_features

    torch.manual_seed(0)
    model = timm.create_model(REG, pretrained=False, img_size=SIZE, num_classes=0, class_token=False,
                              global_pool="avg").eval()
    layout = layout_of(model)
    assert not layout.has_cls and layout.num_reg == 4 and layout.num_tokens == 4 + 16
    assert select_features(None, layout) == ("patch", "reg", "norms")
    with pytest.raises(FeatureError, match="no class token"):
        select_features(("cls",), layout)
    x = torch.randn(2, 3, SIZE, SIZE)
    got = token_features(model, x, layout, ("patch", "reg", "reg_all"))
    with torch.no_grad():
        ref = model.forward_features(x)
    torch.testing.assert_close(got["reg_all"], ref[:, :4])
    torch.testing.assert_close(got["patch"], ref[:, 4:].mean(1))
