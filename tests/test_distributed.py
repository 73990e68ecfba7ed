"""Several processes, one store: torchrun ranks, a killed rank, array parts in any order, OOM back-off."""
from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

import regcache.extract as extract_mod
from regcache.cli import main
from regcache.extract import extract
from regcache.store import FeatureSet

from conftest import REG, cli_args, cli_env, config, make_shards
from test_extract import assert_same_content


def torchrun(ckpt, data, cache, nproc=2, *extra):
    args = cli_args(ckpt, data, cache, "-j", "0", *extra)
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-port=0",
            *args[1:]]


def test_torchrun_ranks_split_the_shards_and_equal_one_process(reg_ckpt, tmp_path):
    data = make_shards(tmp_path / "shards", n_shards=5, per_shard=3)
    ref = extract(config(REG, reg_ckpt, data, tmp_path / "ref"))
    r = subprocess.run(torchrun(reg_ckpt, data, tmp_path / "c"), env=cli_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (meta,) = (tmp_path / "c").glob("*/*/regcache.json")
    assert FeatureSet(meta.parent).complete
    assert_same_content(meta.parent, ref.path)


def test_a_killed_rank_leaves_a_resumable_store(reg_ckpt, tmp_path):
    data = make_shards(tmp_path / "shards", n_shards=10, per_shard=8)
    ref = extract(config(REG, reg_ckpt, data, tmp_path / "ref"))
    cache = tmp_path / "c"
    proc = subprocess.Popen(torchrun(reg_ckpt, data, cache, 2, "-b", "2"), env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while time.time() < deadline and len(list(cache.glob("*/*/units/*.parquet"))) < 2:
        time.sleep(0.05)
    ranks = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert ranks, "no rank processes found"
    subprocess.run(["kill", "-9", ranks[0]])
    proc.wait(timeout=120)
    committed = len(list(cache.glob("*/*/units/*.parquet")))
    assert proc.returncode != 0 and 2 <= committed < 10
    res = extract(config(REG, reg_ckpt, data, cache))
    assert res.complete and res.units_skipped == committed
    assert_same_content(res.path, ref.path)


def test_array_parts_in_any_order_then_finalize(reg_ckpt, tmp_path):
    data = make_shards(tmp_path / "shards", n_shards=5, per_shard=2)
    ref = extract(config(REG, reg_ckpt, data, tmp_path / "ref"))
    cache = tmp_path / "c"
    results = [extract(config(REG, reg_ckpt, data, cache, num_parts=3, part=p)) for p in (2, 0)]
    assert [r.complete for r in results] == [False, False] and results[-1].missing_units == 2  # shards 1 and 4
    r = CliRunner().invoke(main, cli_args(reg_ckpt, data, cache, "--finalize")[3:])
    assert r.exit_code == 0 and "incomplete (2 of the shards" in r.output
    last = extract(config(REG, reg_ckpt, data, cache, num_parts=3, part=1))
    assert last.complete and last.units_done == 2
    assert_same_content(last.path, ref.path)
    (last.path / "index.parquet").unlink()  # as if the last part died before writing the index
    (last.path / "errors.parquet").unlink()
    r = CliRunner().invoke(main, cli_args(reg_ckpt, data, cache, "--finalize")[3:])
    assert r.exit_code == 0 and "complete store" in r.output
    assert_same_content(last.path, ref.path)


def test_out_of_memory_halves_the_forward_chunk_and_says_so(reg_ckpt, tmp_path, monkeypatch, caplog):
    data = make_shards(tmp_path / "shards", n_shards=2, per_shard=5)
    ref = extract(config(REG, reg_ckpt, data, tmp_path / "ref", batch_size=8))
    real = extract_mod.token_features

    def small_memory(model, images, *a, **k):
        if len(images) > 2:
            raise torch.OutOfMemoryError("simulated")
        return real(model, images, *a, **k)

    monkeypatch.setattr(extract_mod, "token_features", small_memory)
    with caplog.at_level(logging.WARNING, logger="regcache"):
        res = extract(config(REG, reg_ckpt, data, tmp_path / "c", batch_size=8))
    assert "chunks of 2 images" in caplog.text and res.complete
    fa, fb = FeatureSet(res.path).load(), FeatureSet(ref.path).load()
    torch.testing.assert_close(torch.from_numpy(fa.x), torch.from_numpy(fb.x), rtol=0, atol=2e-3)
