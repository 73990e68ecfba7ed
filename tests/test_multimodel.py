"""One pass over the shards feeding several models (issue 21): each model's set is the very set (fingerprint and
bytes) its own extraction makes, every sample is decoded once, a model that fails stops alone, and a killed
pass resumes to the same sets."""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from regcache.extract import extract, extract_many
from regcache.store import FeatureSet

from conftest import NOREG, REG, cli_env, config, make_checkpoint, make_shards
from test_extract import assert_same_content


@pytest.fixture(scope="module")
def other_ckpt(tmp_path_factory):
    """The registers architecture with other weights: the same timm name twice in one pass."""
    return make_checkpoint(tmp_path_factory.mktemp("other") / "other.safetensors", REG, seed=1)


def members(reg_ckpt, noreg_ckpt, other_ckpt, data, cache, **kw):
    """Three models: two at 56 px (one crop group, their own mean/std), the third at 70 px (a group of its own)."""
    return [config(REG, reg_ckpt, data, cache, **kw),
            config(NOREG, noreg_ckpt, data, cache, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), **kw),
            config(REG, other_ckpt, data, cache, size=70, resize=80, **kw)]


def test_one_pass_writes_each_models_own_set_and_decodes_each_image_once(reg_ckpt, noreg_ckpt, other_ckpt, tmp_path,
                                                                         monkeypatch):
    import regcache.extract.stream as stream

    data = make_shards(tmp_path / "shards", n_shards=3, per_shard=4)
    alone = [extract(s) for s in members(reg_ckpt, noreg_ckpt, other_ckpt, data, tmp_path / "alone")]
    decoded = []
    real = stream.decode_image
    monkeypatch.setattr(stream, "decode_image", lambda sample, keys: decoded.append(sample["__key__"]) or
                        real(sample, keys))
    together = extract_many(members(reg_ckpt, noreg_ckpt, other_ckpt, data, tmp_path / "together"))
    assert sorted(decoded) == sorted(FeatureSet(alone[0].path).index.key)  # 12 images, each decoded once
    for a, b in zip(alone, together):
        assert b.complete and b.units_done == 3 and a.fingerprint == b.fingerprint
        assert a.path.relative_to(tmp_path / "alone") == b.path.relative_to(tmp_path / "together")
        assert_same_content(a.path, b.path)
    assert len({r.fingerprint for r in together}) == 3
    # the two 56-px members shared their crops, each normalised its own way: the features differ from each other
    assert not np.allclose(FeatureSet(together[0].path).load("cls").x, FeatureSet(together[2].path).load("cls").x)


def test_a_model_that_fails_mid_pass_stops_alone_and_resumes(reg_ckpt, noreg_ckpt, other_ckpt, tmp_path,
                                                               monkeypatch):
    import regcache.extract.passes as passes

    data = make_shards(tmp_path / "shards", n_shards=4, per_shard=3)
    ref = extract(members(reg_ckpt, noreg_ckpt, other_ckpt, data, tmp_path / "ref")[1])
    real, calls = passes.token_features, []

    def breaks_later(model, images, layout, features):
        if layout.num_reg == 0:  # the model without registers fails at its third batch
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("a broken model")
        return real(model, images, layout, features)

    monkeypatch.setattr(passes, "token_features", breaks_later)
    results = extract_many(members(reg_ckpt, noreg_ckpt, other_ckpt, data, tmp_path / "c", batch_size=2))
    ok, broken, other = results
    assert ok.complete and other.complete and ok.units_done == other.units_done == 4
    assert not broken.complete and "a broken model" in broken.error and broken.units_done == 1
    monkeypatch.undo()
    again = extract_many(members(reg_ckpt, noreg_ckpt, other_ckpt, data, tmp_path / "c", batch_size=2))
    assert [r.reused for r in again] == [True, False, True]
    assert again[1].complete and (again[1].units_skipped, again[1].units_done) == (1, 3)
    assert_same_content(again[1].path, ref.path)


def test_the_cli_splits_per_model_options_and_a_killed_pass_resumes_to_the_same_sets(reg_ckpt, noreg_ckpt,
                                                                                      tmp_path):
    data = make_shards(tmp_path / "shards", n_shards=10, per_shard=6)
    refs = [extract(config(REG, reg_ckpt, data, tmp_path / "ref")),
            extract(config(NOREG, noreg_ckpt, data, tmp_path / "ref", size=70, resize=80))]
    cache = tmp_path / "c"
    args = [sys.executable, "-m", "regcache", "extract", "-m", f"{REG},{NOREG}", "--checkpoint",
            f"{reg_ckpt},{noreg_ckpt}", "-d", data, "--cache", str(cache), "--size", "56,70", "--resize", "64,80",
            "-q", "-j", "1", "-b", "2"]
    proc = subprocess.Popen(args, env=cli_env())
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cache.glob("*/*/units/*.parquet"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = len(list(cache.glob("*/*/units/*.parquet")))
    assert 3 <= committed < 20, "the kill must land mid-pass"
    out = subprocess.run(args, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("complete store") == 2 and f"{REG}: done" in out.stdout and f"{NOREG}: done" in out.stdout
    for ref in refs:
        (path,) = [p.parent for p in cache.glob(f"*/{ref.path.name}/regcache.json")]
        assert_same_content(path, ref.path)
    bad = subprocess.run([*args[:7], f"{reg_ckpt},{noreg_ckpt},{reg_ckpt}", *args[8:]], env=cli_env(),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--checkpoint takes one value, or one per model (2" in bad.stderr, bad.stderr
