"""Several processes, one store: torchrun ranks, a killed rank, array parts in any order, OOM back-off."""
from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

import regcache.extract.passes as extract_mod
from regcache.cli import main
from regcache.extract import extract
from regcache.store import FeatureSet

from conftest import REG, cli_args, cli_env, config, make_shards
from test_extract import assert_same_content


def torchrun(ckpt, data, cache, nproc=2, *extra):
    args = cli_args(ckpt, data, cache, "-j", "0", *extra)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
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
    assert r.exit_code == 1 and "incomplete (2 of the shards" in r.output, r.output
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


# --------------------------------------------------------------------------- the probe at scale

def probe_args(caches, out, *extra):
    return ["probe", "-m", "m", "-f", "cls", "-f", "cls,reg", "--train", "train", "--val", "val", "--test", "test",
            "--anomaly", "far", "--cache", str(caches), "--out", str(out), "--lr", "0.01,0.1",
            "--iterations", "60", "--batch-size", "64", "-q", "--no-plots", *extra]


def test_streamed_training_reads_one_window_at_a_time_and_learns(caches, tmp_path, monkeypatch):
    import pandas as pd

    reads = []
    real = FeatureSet.read_rows
    monkeypatch.setattr(FeatureSet, "read_rows", lambda self, name, rows, out=None: reads.append(len(rows)) or
                        real(self, name, rows, out))
    r = CliRunner().invoke(main, probe_args(caches, tmp_path / "s", "--stream", "--stream-window", "2"))
    assert r.exit_code == 0, r.output
    train_reads = reads[: len(reads) - 3 * 2]  # then val, far (2 features each) are loaded whole
    assert max(train_reads) <= 2 * 50  # two 50-row shards per window, never the whole 400-row set
    r = CliRunner().invoke(main, probe_args(caches, tmp_path / "m"))
    assert r.exit_code == 0, r.output
    acc = {k: pd.read_parquet(tmp_path / k / "results.parquet").query("role == 'id'").value.max() for k in "sm"}
    assert acc["s"] >= acc["m"] - 0.03 and acc["s"] > 0.8
    no_val = [a for a in probe_args(caches, tmp_path / "x", "--stream") if a not in ("--val", "val")]
    r = CliRunner().invoke(main, no_val)
    assert r.exit_code == 2 and "needs a val set (--val)" in r.output, r.output


@pytest.mark.parametrize("mode", [[], ["--stream", "--stream-window", "3"]])
def test_probe_on_two_gloo_ranks_equals_one_process(caches, tmp_path, mode):
    from regcache.probe import load_heads

    one = CliRunner().invoke(main, probe_args(caches, tmp_path / "one", *mode))
    assert one.exit_code == 0, one.output
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "regcache",
           *probe_args(caches, tmp_path / "two", *mode)]
    r = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    a = {h.name: h for h in load_heads(tmp_path / "one" / "heads.safetensors")}
    b = {h.name: h for h in load_heads(tmp_path / "two" / "heads.safetensors")}
    assert a.keys() == b.keys() == {"cls", "cls,reg"}
    for k in a:
        assert (a[k].lr, a[k].wd) == (b[k].lr, b[k].wd)
        torch.testing.assert_close(a[k].weight, b[k].weight, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a[k].bias, b[k].bias, rtol=1e-4, atol=1e-5)
