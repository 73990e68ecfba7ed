"""Stage 1 end to end: bad input, resume after SIGKILL, several writers, cache reuse."""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from click.testing import CliRunner
from PIL import Image

import regcache.extract.passes as extract_mod
from regcache.cli import main
from regcache.data import DataError
from regcache.extract import extract
from regcache.store import FeatureSet, StoreError

from conftest import REG, cli_args, cli_env, config, make_shards, random_images


def png(arr: np.ndarray) -> bytes:
    import io
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_raw(path: Path, records: list[dict]) -> None:
    with wds.TarWriter(str(path), encoder=False, mtime=0.0) as w:
        for r in records:
            w.write(r)


def store_content(path: Path) -> tuple:
    fs = FeatureSet(path)
    got = fs.load(concat=False)
    idx = fs.index
    return list(idx.key), list(idx.label), list(idx.shard), {k: v for k, v in got.x.items()}


def assert_same_content(a: Path, b: Path) -> None:
    ka, la, sa, xa = store_content(a)
    kb, lb, sb, xb = store_content(b)
    assert (ka, la, sa) == (kb, lb, sb)
    assert len(ka) == len(set(ka))
    for f in xa:
        np.testing.assert_array_equal(xa[f], xb[f])


def test_bad_samples_and_bad_shards_are_reported_and_nothing_is_lost(reg_ckpt, tmp_path, monkeypatch):
    d = tmp_path / "shards"
    d.mkdir()
    good = [{"__key__": k, "png": png(a), "cls": str(y).encode()} for k, a, y in random_images(4)]
    bomb = png(np.zeros((9500, 9500), np.uint8))  # 90 Mpx: over PIL's decompression-bomb limit
    write_raw(d / "s-000.tar", [
        good[0],
        {"__key__": "corrupt", "png": b"\x89PNG\r\n\x1a\n-not-really", "cls": b"1"},
        {"__key__": "empty", "png": b"", "cls": b"1"},
        {"__key__": "bomb", "png": bomb, "cls": b"1"},
        {"__key__": "wordlabel", "png": png(np.zeros((50, 50, 3), np.uint8)), "cls": b"cat"},
        {"__key__": "biglabel", "png": png(np.zeros((50, 50, 3), np.uint8)), "cls": b"7"},
        {"__key__": "nolabel", "png": png(np.zeros((50, 50, 3), np.uint8))},
        {"__key__": "sixteen", "png": png(np.full((50, 50), 40000, np.uint16)), "cls": b"1"},
        good[1],
    ])
    write_raw(d / "s-001.tar", good[2:])
    full = (d / "s-001.tar").read_bytes()
    (d / "s-001.tar").write_bytes(full[: len(full) // 2])  # truncated mid-file
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"name: bad\nrole: id-val\nshards: '{d}/s-{{000..002}}.tar'\nclasses: [a, b, c]\n")

    runner = CliRunner()
    args = ["extract", "-m", REG, "--checkpoint", str(reg_ckpt), "-d", str(manifest), "--cache", str(tmp_path / "c"),
            "--size", "56", "--resize", "64", "-j", "0", "-q"]
    monkeypatch.setattr("regcache.extract.run.load_model", lambda *a: pytest.fail("loaded the model"))
    r = runner.invoke(main, args)  # a missing shard is named before anything is loaded or written
    assert r.exit_code == 1 and "1 of 3 shards do not exist" in r.output and "s-002.tar" in r.output, r.output
    assert not (tmp_path / "c").exists()
    monkeypatch.undo()
    (d / "s-002.tar").write_bytes(b"not a tar at all" * 100)
    r = runner.invoke(main, args)
    assert r.exit_code == 1, r.output
    assert "failed shard s-001.tar" in r.output and "failed shard s-002.tar: ShardError" in r.output
    assert "not a tar file" in r.output and ("unexpected end" in r.output or "ReadError" in r.output)
    fs = FeatureSet(next((tmp_path / "c").glob("bad/*")))
    assert not fs.complete and set(fs.failed_units()) == {1, 2}
    errors = dict(zip(fs.errors.key, fs.errors.reason))
    assert set(errors) == {"corrupt", "empty", "bomb", "wordlabel", "biglabel", "nolabel", "sixteen"}
    assert "unsupported image mode I;16" in errors["sixteen"]
    assert "cannot decode" in errors["corrupt"] and "zero-length" in errors["empty"]
    assert "decompression bomb" in errors["bomb"]
    assert "not an integer" in errors["wordlabel"] and "outside 0..2" in errors["biglabel"]
    assert "no label" in errors["nolabel"]
    assert list(fs.index.key) == ["img00000", "img00001"]
    assert len(fs.index) + len(fs.errors) == 9  # ok + failed = total of the committed shard

    # repair the shards: other bytes, so another set (its identity is the shards' bytes); it takes the unit of the
    # unchanged shard from the first set, and runs the backbone on the two repaired ones only
    (d / "s-001.tar").write_bytes(full)
    write_raw(d / "s-002.tar", good[:1])
    r = runner.invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "2 shards written, 0 skipped, 1 taken from an earlier set" in r.output
    first = fs
    fs = FeatureSet(next(p for p in (tmp_path / "c").glob("bad/*") if p != first.path))
    for name in fs.features:  # the adopted unit is bit-identical to the one the first set committed
        np.testing.assert_array_equal(fs.read_rows(name, np.arange(2)), first.read_rows(name, np.arange(2)))
    assert fs.complete and fs.failed_units() == {}
    # s-002 repeats s-000's img00000: exactly once across the set, the later copy is an error
    assert list(fs.index.key) == ["img00000", "img00001", "img00002", "img00003"]
    dup = fs.errors[fs.errors.shard == "s-002.tar"]
    assert list(dup.key) == ["img00000"] and "duplicate key: already stored from shard s-000.tar" in dup.reason.iloc[0]


def test_declared_counts_catch_a_shard_cut_at_a_file_boundary(reg_ckpt, tmp_path):
    d = tmp_path / "shards"
    make_shards(d, n_shards=1, per_shard=3)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"name: cut\nshards: ['{d}/part-000.tar']\ncounts: [4]\n")
    res = extract(config(REG, reg_ckpt, str(manifest), tmp_path / "c"))
    assert res.failed_shards == {"part-000.tar": "DataError: expected 4 samples, read 3 (truncated or changed shard?)"}


def test_pipe_urls_need_an_explicit_flag(reg_ckpt, tmp_path):
    d = tmp_path / "shards"
    make_shards(d, n_shards=1, per_shard=2)
    data = f"pipe:cat {d}/part-000.tar"
    with pytest.raises(DataError, match="--allow-pipe"):
        extract(config(REG, reg_ckpt, data, tmp_path / "c", unit_rows=4))
    res = extract(config(REG, reg_ckpt, data, tmp_path / "c", unit_rows=4, allow_pipe=True))
    assert res.complete and res.ok == 2


def test_second_run_does_no_forward_pass_and_a_subset_is_reused(reg_ckpt, tmp_path, monkeypatch):
    data = make_shards(tmp_path / "shards", n_shards=2, per_shard=3)
    first = extract(config(REG, reg_ckpt, data, tmp_path / "c"))
    assert first.complete and not first.reused and first.ok == 6

    def no_forward(*a, **k):
        raise AssertionError("the backbone ran")

    monkeypatch.setattr(extract_mod, "token_features", no_forward)
    again = extract(config(REG, reg_ckpt, data, tmp_path / "c"))
    assert again.reused and again.path == first.path and again.ok == 6
    subset = extract(config(REG, reg_ckpt, data, tmp_path / "c", features=("cls", "reg")))
    assert subset.reused and subset.path == first.path
    # a different setting is a different feature set, which needs the backbone
    with pytest.raises(AssertionError, match="the backbone ran"):
        extract(config(REG, reg_ckpt, data, tmp_path / "c", precision="bf16"))


def test_writing_another_fingerprint_into_a_store_is_refused(reg_ckpt, tmp_path):
    data = make_shards(tmp_path / "shards", n_shards=1, per_shard=2)
    extract(config(REG, reg_ckpt, data, tmp_path / "c", store=tmp_path / "s"))
    with pytest.raises(StoreError, match=r"differs in: dtype\)"):
        extract(config(REG, reg_ckpt, data, tmp_path / "c", store=tmp_path / "s", dtype="float32"))


def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(reg_ckpt, tmp_path):
    data = make_shards(tmp_path / "shards", n_shards=12, per_shard=8)
    ref = extract(config(REG, reg_ckpt, data, tmp_path / "ref"))
    cache = tmp_path / "c"
    proc = subprocess.Popen(cli_args(reg_ckpt, data, cache, "-j", "1", "-b", "2"), env=cli_env())
    units = None
    deadline = time.time() + 120
    while time.time() < deadline:
        units = list(cache.glob("*/*/units/*.parquet"))
        if len(units) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = len(list(cache.glob("*/*/units/*.parquet")))
    assert 2 <= committed < 12, "the kill must land mid-run"
    res = extract(config(REG, reg_ckpt, data, cache))
    assert res.complete and res.units_skipped == committed and res.units_done == 12 - committed
    assert res.path.name == ref.path.name
    assert_same_content(res.path, ref.path)


def test_two_writer_processes_on_disjoint_parts_equal_one_process(reg_ckpt, tmp_path):
    data = make_shards(tmp_path / "shards", n_shards=6, per_shard=3)
    ref = extract(config(REG, reg_ckpt, data, tmp_path / "ref"))
    cache = tmp_path / "c"
    procs = [subprocess.Popen(cli_args(reg_ckpt, data, cache, "--num-parts", "2", "--part", str(i), "-j", "0"),
                              env=cli_env()) for i in (0, 1)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    (path,) = cache.glob("*/*/regcache.json")
    assert FeatureSet(path.parent).complete
    assert_same_content(path.parent, ref.path)


def test_dataloader_workers_split_shards_without_loss_or_duplicates(reg_ckpt, tmp_path):
    data = make_shards(tmp_path / "shards", n_shards=5, per_shard=3)
    one = extract(config(REG, reg_ckpt, data, tmp_path / "a", workers=0))
    two = extract(config(REG, reg_ckpt, data, tmp_path / "b", workers=2))
    assert_same_content(one.path, two.path)


def test_cli_ls_lists_feature_sets(reg_ckpt, tmp_path):
    data = make_shards(tmp_path / "shards", n_shards=1, per_shard=2)
    res = extract(config(REG, reg_ckpt, data, tmp_path / "c", name="tiny-val"))
    assert res.path.parent.name == "tiny-val" and FeatureSet(res.path).meta.dataset.name == "tiny-val"
    r = CliRunner().invoke(main, ["ls", "--cache", str(tmp_path / "c")])
    assert r.exit_code == 0 and REG in r.output and "cls,patch,reg,norms" in r.output and "1/1" in r.output
    r = CliRunner().invoke(main, ["ls", "--cache", str(tmp_path / "c"), "--json"])
    import json
    row = json.loads(r.output)
    assert row["rows"] == 2 and row["complete"] is True


def test_unknown_model_lists_the_aliases(tmp_path):
    r = CliRunner().invoke(main, ["extract", "-m", "vit_nonsense", "-d", str(tmp_path / "x.tar")])
    assert r.exit_code == 1 and "unknown model 'vit_nonsense'" in r.output and "vitl_reg" in r.output


def test_augmented_views_are_rows_of_their_own_and_view_0_is_the_plain_crop(reg_ckpt, tmp_path):
    from regcache.probe import holdout, load_split

    data = make_shards(tmp_path / "shards", n_shards=2, per_shard=3)
    plain = extract(config(REG, reg_ckpt, data, tmp_path / "c", dtype="float32"))
    views = extract(config(REG, reg_ckpt, data, tmp_path / "c", dtype="float32", views=3, seed=1))
    assert views.path != plain.path and views.ok == 3 * plain.ok
    idx = FeatureSet(views.path).index
    assert list(idx.view[:6]) == [0, 1, 2, 0, 1, 2] and list(idx.key[:3]) == ["img00000"] * 3
    v = FeatureSet(views.path).load("cls")
    p = FeatureSet(plain.path).load("cls")
    np.testing.assert_allclose(v.x[v.views == 0], p.x, rtol=1e-5, atol=1e-5)
    assert np.abs(v.x[v.views == 1] - p.x).max() > 1e-3 and np.abs(v.x[v.views == 2] - v.x[v.views == 1]).max() > 1e-3
    # the probe trains on every view and selects on view 0 of held-out images only
    split = load_split(FeatureSet(views.path), ["cls"], "train", views=None)
    fit, sel = holdout(split, 0.34, seed=0)
    assert set(split.views[fit]) == {0, 1, 2} and set(split.views[sel]) == {0}
    assert not set(split.keys[fit]) & set(split.keys[sel])


@pytest.mark.slow
def test_compiled_forward_gives_the_same_features(reg_ckpt, tmp_path):
    data = make_shards(tmp_path / "shards", n_shards=1, per_shard=4)
    eager = extract(config(REG, reg_ckpt, data, tmp_path / "a", dtype="float32"))
    compiled = extract(config(REG, reg_ckpt, data, tmp_path / "b", dtype="float32", compile=True))
    assert compiled.path.name == eager.path.name  # compiling is not part of the identity
    a, b = FeatureSet(eager.path).load(), FeatureSet(compiled.path).load()
    np.testing.assert_allclose(b.x, a.x, rtol=1e-4, atol=1e-4)
