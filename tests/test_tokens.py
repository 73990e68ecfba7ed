"""Stored features equal an independent computation from timm's own forward_features, split by hand."""
from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import timm
import torch
from conftest import NOREG, REG, RESIZE, SIZE, config, make_shards
from PIL import Image
from timm.data import create_transform

from regcache.extract import extract
from regcache.features import FeatureError
from regcache.models import Preprocess, load_checkpoint
from regcache.registry import IMAGENET_MEAN, IMAGENET_STD
from regcache.store import FeatureSet


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
    """A checkpoint made at 56 px loads into a 112 px model exactly as timm's own pretrained loading does it."""
    from safetensors.torch import load_file
    from timm.layers import resample_abs_pos_embed

    from regcache.models import load_model
    from regcache.settings import Backbone

    ours = load_model(Backbone(model=REG, checkpoint=str(reg_ckpt)), 112)
    theirs = timm.create_model(REG, pretrained=True, pretrained_cfg_overlay={"file": str(reg_ckpt)}, img_size=112,
                               num_classes=0)
    sd = load_file(str(reg_ckpt))
    table = resample_abs_pos_embed(sd["pos_embed"], new_size=(8, 8), num_prefix_tokens=0, interpolation="bicubic",
                                   antialias=True)
    assert ours.pos_embed.shape == table.shape == (1, 64, sd["pos_embed"].shape[-1])
    torch.testing.assert_close(ours.pos_embed, table, rtol=0, atol=0)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    model = timm.create_model(REG, pretrained=False, img_size=112, num_classes=0)
    load_checkpoint(model, reg_ckpt)  # the function on its own, as extraction uses it
    assert torch.equal(model.pos_embed, table)


def test_model_without_class_token_has_no_cls():
    """class_token=False with avg pooling: timm moves the final norm after the pool (fc_norm), and so do we."""
    from regcache.features import select_features
    from regcache.tokens import layout_of, token_features

    torch.manual_seed(0)
    model = timm.create_model(REG, pretrained=False, img_size=SIZE, num_classes=0, class_token=False,
                              global_pool="avg").eval()
    layout = layout_of(model)
    assert not layout.has_cls and layout.num_reg == 4 and layout.num_tokens == 4 + 16 and layout.norm == "pooled"
    assert select_features(None, layout) == ("patch", "reg", "norms")
    with pytest.raises(FeatureError, match="no class token"):
        select_features(("cls",), layout)
    x = torch.randn(2, 3, SIZE, SIZE)
    got = token_features(model, x, layout, ("patch", "reg", "reg_all"))
    with torch.no_grad():
        ref = model.forward_features(x)  # norm is Identity here: these are the last block's raw tokens
        pooled = model.forward_head(ref, pre_logits=True)  # timm's own avg pool + fc_norm
    torch.testing.assert_close(got["patch"], pooled)
    assert (got["patch"] - ref[:, 4:].mean(1)).abs().max() > 1e-2  # the pre-norm mean is not the feature
    torch.testing.assert_close(got["reg_all"], model.fc_norm(ref[:, :4]))
    torch.testing.assert_close(got["reg"], model.fc_norm(ref[:, :4].mean(1)))


# --------------------------------------------------------------------------- backbones beyond DINOv2

#: name, input size, prefix tokens in order, grid, where the final norm sits: written out by hand per family
FAMILIES = [
    ("vit_small_patch14_reg4_dinov2", 56, ("cls", "reg", "reg", "reg", "reg"), "token"),     # DINOv2 + registers
    ("deit_tiny_distilled_patch16_224", 64, ("cls", "dist"), "token"),                       # distillation token
    ("vit_medium_patch16_reg4_gap_256", 64, ("reg",) * 4, "pooled"),                         # SBB: no cls, fc_norm
    ("vit_base_patch16_rope_reg1_gap_256", 64, ("reg",), "pooled"),                          # SBB on Eva, RoPE
    ("vit_small_patch16_dinov3", 64, ("cls",) + ("reg",) * 4, "token"),                      # DINOv3: Eva, RoPE
    ("eva02_tiny_patch14_224", 56, ("cls",), "pooled"),                                      # EVA-02: fc_norm
    ("vit_base_patch14_reg1_tipsv2", 56, ("cls", "reg"), "token"),                           # TIPSv2
    ("vit_base_patch16_siglip_224", 64, (), "token"),                                        # SigLIP: no prefix, MAP
    ("vit_base_patch16_clip_224", 64, ("cls",), "token"),                                    # CLIP: pre-norm
]
ALL = ("cls", "patch", "reg", "reg_all", "norms", "tokens")


def test_every_feature_has_a_reference_here():
    """A new FeatureSpec needs its timm reference in the test below (ALL, ref)."""
    from regcache.features import FEATURES

    assert tuple(FEATURES) == ALL


def _family_model(name: str, size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0, img_size=size, depth=2).eval()
    with torch.no_grad():  # random norm affines, so that applying a norm or not, and which, shows
        for n, p in model.named_parameters():
            if "norm" in n and p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if n.endswith("weight") else 0.0))
    return model


@pytest.mark.parametrize("name,size,prefix,norm", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_token_features_per_family_equal_timm_forward(name, size, prefix, norm):
    """Each family against timm's own forward_features / forward_head, split by the hand-written layout above."""
    from regcache.features import select_features
    from regcache.tokens import layout_of, token_features

    if not timm.is_model(name):
        pytest.skip(f"timm {timm.__version__} has no {name}")
    model = _family_model(name, size)
    layout = layout_of(model)
    g = size // model.patch_embed.patch_size[0]
    assert (layout.prefix, layout.grid, layout.norm) == (prefix, (g, g), norm)
    x = torch.randn(3, 3, size, size)
    captured = {}
    model.blocks[-1].register_forward_hook(lambda mod, inp, out: captured.update(pre=out))
    with torch.no_grad():
        X = model.forward_features(x)  # timm: norm per token (Identity for fc_norm models)
        head_pool = model.forward_head(X, pre_logits=True) if model.global_pool == "avg" else None
        p = len(prefix)
        regs = [i for i, t in enumerate(prefix) if t == "reg"]
        fc = model.fc_norm if norm == "pooled" else (lambda t: t)
        ref = {"patch": fc(X[:, p:].mean(1)), "norms": captured["pre"].norm(dim=-1), "tokens": fc(X[:, p:])}
        if "cls" in prefix:
            ref["cls"] = fc(X[:, 0])
            if name.startswith("deit"):  # the distilled head averages cls and dist: compare with the raw tokens
                assert torch.allclose(model.forward_head(X, pre_logits=True), (X[:, 0] + X[:, 1]) / 2)
            else:
                model.global_pool = "token"
                ref_head = model.forward_head(X, pre_logits=True)  # timm's own [CLS] head (with fc_norm if any)
                torch.testing.assert_close(ref["cls"], ref_head)
        if regs:
            ref["reg"], ref["reg_all"] = fc(X[:, regs].mean(1)), fc(X[:, regs])
    assert X.shape[1] == layout.num_tokens == p + g * g
    assert select_features(None, layout) == tuple(f for f in ("cls", "patch", "reg", "norms") if f in ref)
    got = token_features(model, x, layout, tuple(f for f in ALL if f in ref))
    assert set(got) == set(ref)
    for f in ref:
        torch.testing.assert_close(got[f], ref[f], rtol=1e-5, atol=1e-5, msg=f)
        assert tuple(got[f].shape[1:]) == layout.shape(f), f  # each spec's shape is what its make gives
    if head_pool is not None and model.attn_pool is None:  # timm's avg-pool head is our patch mean
        torch.testing.assert_close(got["patch"], head_pool, rtol=1e-5, atol=1e-5)
    assert got["norms"].shape == (3, p + g * g)


def test_distilled_and_dinov3_layouts_are_stored(tmp_path):
    """End to end: regcache.json names every prefix token, ``norms`` has one entry per token."""
    from safetensors.torch import save_file

    from regcache.models import model_args, resolve_name
    from regcache.settings import Backbone

    data = make_shards(tmp_path / "shards", n_shards=1, per_shard=3)
    for name, prefix, alias_kwargs in [("deit_tiny_distilled_patch16_224", ["cls", "dist"], {}),
                                       ("v3s", ["cls", "reg", "reg", "reg", "reg"], {"global_pool": "token"})]:
        spec = Backbone(model=name, model_args={"depth": 1})
        assert model_args(spec) == {**alias_kwargs, "depth": 1}
        model = timm.create_model(resolve_name(name).split(".")[0], pretrained=False, num_classes=0, img_size=64,
                                  **model_args(spec))
        save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
        res = extract(config(name, tmp_path / "w.safetensors", data, tmp_path / "cache", model_args={"depth": 1},
                             size=64, resize=72, features=("cls", "patch", "norms")))
        fs = FeatureSet(res.path)
        assert list(fs.layout.prefix) == prefix and fs.layout.norm == "token"
        assert fs.layout.num_tokens == len(prefix) + 16
        assert fs.load("norms").x.shape == (3, len(prefix) + 16)


def test_unnamed_prefix_tokens_and_wrong_token_counts_are_refused():
    """A prefix regcache cannot name would shift every patch: refused, as is a forward with other token counts."""
    from regcache.features import TokenLayout
    from regcache.tokens import LayoutError, layout_of, split_tokens

    model = timm.create_model(NOREG, pretrained=False, img_size=SIZE, num_classes=0, depth=1)
    model.num_prefix_tokens = 3  # e.g. a future model with two extra token types regcache does not know
    with pytest.raises(LayoutError, match="3 prefix tokens"):
        layout_of(model)
    layout = TokenLayout(has_cls=True, num_reg=4, grid=(4, 4), dim=8)
    x = torch.randn(2, 1 + 16, 8)
    with pytest.raises(LayoutError, match="17 tokens"):
        split_tokens(x, x, layout, ("cls",))
