"""Lossless input (issue 9): damaged, changed, duplicated or unlabelled data never gives silent rows."""
from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from regcache.cli import main
from regcache.data import ShardError, SampleError, check_resize, load_dataset, open_shard
from regcache.extract import extract
from regcache.shards import scan_manifest, write_shards
from regcache.store import FeatureSet, StoreError, list_feature_sets

from conftest import REG, RESIZE, SIZE, cli_args, cli_env, config, make_shards, random_images
from test_extract import png, write_raw


@pytest.fixture(scope="module")
def shard100(tmp_path_factory):
    """One 100-sample shard, and the byte where its last member's data ends."""
    d = tmp_path_factory.mktemp("s100")
    [path] = write_shards(random_images(100), str(d / "s-%03d.tar"), 100)
    with tarfile.open(path) as t:
        last = t.getmembers()[-1]
    return path, last.offset_data + last.size


def read_all(path) -> int:
    return sum(1 for _ in open_shard(str(path), allow_pipe=False))


def test_a_cut_or_damaged_tar_is_never_a_shorter_shard(shard100, tmp_path):
    path, end = shard100
    data = open(path, "rb").read()
    assert read_all(path) == 100
    rng = random.Random(0)
    cuts = [rng.randrange(1, end) for _ in range(60)]
    damaged = [data[:p] + bytes(rng.randrange(256) for _ in range(1000)) + data[p:]
               for p in (3000, len(data) // 2, end - 5000)]
    damaged.append(data[:len(data) // 2] + b"\0" * 1024 + data[len(data) // 2:])  # zeros mid-archive
    for i, blob in enumerate([data[:c] for c in cuts] + damaged):
        bad = tmp_path / f"bad{i}.tar"
        bad.write_bytes(blob)
        with pytest.raises(ShardError):
            read_all(bad)


def test_a_cut_inside_the_end_of_archive_padding_loses_nothing(shard100, tmp_path):
    path, end = shard100
    data = open(path, "rb").read()
    block_end = -(-end // 512) * 512
    for cut in (block_end + 512, block_end + 1024, len(data) - 1):
        ok = tmp_path / "ok.tar"
        ok.write_bytes(data[:cut])
        assert read_all(ok) == 100
    for cut in (end, block_end, block_end + 100):  # no end-of-archive marker at all: cannot tell from a cut
        bad = tmp_path / "bad.tar"
        bad.write_bytes(data[:cut])
        with pytest.raises(ShardError, match="truncated"):
            read_all(bad)


def test_compressed_shards_are_read_and_their_truncation_is_caught(shard100, tmp_path):
    import gzip

    path, _ = shard100
    gz = gzip.compress(open(path, "rb").read())
    (tmp_path / "s.tar.gz").write_bytes(gz)
    assert read_all(tmp_path / "s.tar.gz") == 100
    (tmp_path / "cut.tar.gz").write_bytes(gz[: len(gz) * 2 // 3])
    with pytest.raises(ShardError):
        read_all(tmp_path / "cut.tar.gz")


def test_an_unreachable_url_says_so(tmp_path):
    import shutil

    with pytest.raises(ShardError, match="could not be read|0 bytes"):  # gives nothing and fails, as a download can
        list(open_shard("pipe:false", allow_pipe=True))
    if shutil.which("curl"):
        with pytest.raises(ShardError, match="could not be read|0 bytes"):
            read_all("http://127.0.0.1:9/shard.tar")  # nothing listens on the discard port


def test_damaged_shard_fails_the_extract_by_name_and_scan_writes_no_counts(reg_ckpt, shard100, tmp_path):
    path, end = shard100
    d = tmp_path / "shards"
    d.mkdir()
    data = open(path, "rb").read()
    (d / "s-000.tar").write_bytes(data[: end // 2])
    (d / "s-001.tar").write_bytes(data[:1024] + b"x" * 1000 + data[1024:])
    r = subprocess.run(cli_args(reg_ckpt, str(d / "s-{000..001}.tar"), tmp_path / "c"), env=cli_env(),
                       capture_output=True, text=True)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "failed shard s-000.tar" in r.stderr and "failed shard s-001.tar" in r.stderr
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"name: m\nshards: '{d}/s-{{000..001}}.tar'\n")
    scan = scan_manifest(manifest)
    assert scan.counts is None and all(s.error for s in scan.shards)
    assert "counts" not in manifest.read_text()


def test_same_pattern_text_over_other_images_is_another_set_never_a_reuse(reg_ckpt, tmp_path, monkeypatch):
    from regcache.sets import Cache

    for folder, seed in (("a", 0), ("b", 1)):
        make_shards(tmp_path / folder / "shards", n_shards=2, per_shard=3, seed=seed)
    cache = tmp_path / "c"
    monkeypatch.chdir(tmp_path / "a")
    first = extract(config(REG, reg_ckpt, "shards/part-{000..001}.tar", cache, name="x"))
    assert first.complete and first.ok == 6
    monkeypatch.chdir(tmp_path / "b")  # the same text, the same name, other bytes: a set of its own
    other = extract(config(REG, reg_ckpt, "shards/part-{000..001}.tar", cache, name="x"))
    assert not other.reused and other.path != first.path and other.fingerprint != first.fingerprint
    a, b = FeatureSet(first.path).load("cls"), FeatureSet(other.path).load("cls")
    assert not np.allclose(a.x, b.x)
    with pytest.raises(StoreError, match="several feature sets of 'x'"):  # by name they are ambiguous: refused
        Cache(cache).find("x", REG, ["cls"])


def test_a_regenerated_shard_makes_another_set_and_only_it_runs_the_backbone(reg_ckpt, tmp_path):
    d = tmp_path / "shards"
    pattern = make_shards(d, n_shards=2, per_shard=3)
    cache = tmp_path / "c"
    first = extract(config(REG, reg_ckpt, pattern, cache))
    write_shards(random_images(3, seed=7), str(d / "part-%03d.tar"), 3)  # part-000 rewritten
    second = extract(config(REG, reg_ckpt, pattern, cache))
    assert second.path != first.path and (second.units_done, second.units_adopted) == (1, 1)
    assert FeatureSet(first.path).complete  # the old set is left as it was
    old, new = FeatureSet(first.path), FeatureSet(second.path)
    np.testing.assert_array_equal(old.read_rows("cls", np.array([3, 4, 5])), new.read_rows("cls", np.array([3, 4, 5])))
    assert not np.allclose(old.read_rows("cls", np.arange(3)), new.read_rows("cls", np.arange(3)))


def test_declared_counts_are_checked_when_a_set_is_reused(reg_ckpt, tmp_path):
    d = tmp_path / "shards"
    make_shards(d, n_shards=2, per_shard=3)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"name: m\nshards: '{d}/part-{{000..001}}.tar'\nclasses: [a, b, c]\n")
    assert extract(config(REG, reg_ckpt, str(manifest), tmp_path / "c")).complete
    manifest.write_text(manifest.read_text() + "counts: [3, 4]\n")  # counts are not part of the identity
    with pytest.raises(StoreError, match="declares 4 samples but the cached set .* read 3"):
        extract(config(REG, reg_ckpt, str(manifest), tmp_path / "c"))


def test_a_shard_listed_twice_is_stored_once(reg_ckpt, tmp_path):
    d = tmp_path / "shards"
    make_shards(d, n_shards=2, per_shard=3)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"name: m\nshards: ['{d}/part-000.tar', '{d}/part-001.tar', '{d}/part-000.tar']\n")
    res = extract(config(REG, reg_ckpt, str(manifest), tmp_path / "c"))
    fs = FeatureSet(res.path)
    assert res.complete and fs.index.key.is_unique and len(fs.index) == 6
    assert len(fs.errors) == 3 and fs.errors.reason.str.startswith("duplicate key").all()
    assert len(fs.index) + len(fs.errors) == 9  # ok + failed = total


def test_unlabelled_shards_are_stored_with_label_minus_one(reg_ckpt, tmp_path):
    d = tmp_path / "flat"
    write_shards(((k, img, None) for k, img, _ in random_images(4)), str(d / "p-%03d.tar"), 2)
    res = extract(config(REG, reg_ckpt, str(d / "p-{000..001}.tar"), tmp_path / "c"))
    fs = FeatureSet(res.path)
    assert res.complete and len(fs.index) == 4 and (fs.index.label == -1).all() and len(fs.errors) == 0
    assert load_dataset(str(d / "p-000.tar"), role="anomaly").label_key is None


def test_a_run_in_which_every_sample_failed_exits_1_and_is_never_reused(reg_ckpt, tmp_path):
    d = tmp_path / "flat"
    write_shards(((k, img, None) for k, img, _ in random_images(4)), str(d / "p-%03d.tar"), 2)
    args = cli_args(reg_ckpt, str(d / "p-{000..001}.tar"), tmp_path / "c", "--labels", "cls")
    for _ in range(2):
        r = subprocess.run(args, env=cli_env(), capture_output=True, text=True)
        assert r.returncode == 1 and "every one of its 4 samples failed" in r.stderr, r.stderr
        assert "no label .cls" in r.stderr
    [fs] = list_feature_sets(tmp_path / "c")
    assert not fs.complete


def test_manifest_check_warns_when_no_sample_has_the_named_keys(tmp_path):
    d = tmp_path / "shards"
    make_shards(d, n_shards=1, per_shard=3)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"name: m\nshards: '{d}/part-000.tar'\nimage: jpeg\nlabel: json:class\n")
    r = CliRunner().invoke(main, ["manifest", "check", str(manifest)])
    assert r.exit_code == 0
    assert "an image under jpeg (they have: cls, png)" in r.output and "a label .json" in r.output


def test_label_overflow_and_resize_bombs_are_per_sample_errors(reg_ckpt, tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    rng = np.random.default_rng(0)
    ok = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    write_raw(d / "s-000.tar", [
        {"__key__": "good", "png": png(ok), "cls": b"1"},
        {"__key__": "huge", "png": png(ok), "cls": b"99999999999999999999999"},
        {"__key__": "strip", "png": png(np.zeros((1, 50000, 3), np.uint8)), "cls": b"0"},
    ])
    res = extract(config(REG, reg_ckpt, str(d / "s-000.tar"), tmp_path / "c"))
    fs = FeatureSet(res.path)
    assert res.complete and list(fs.index.key) == ["good"]
    reasons = dict(zip(fs.errors.key, fs.errors.reason))
    assert "does not fit in 64 bits" in reasons["huge"] and "extreme aspect ratio" in reasons["strip"]
    with pytest.raises(SampleError):
        check_resize(Image.new("L", (50000, 1)), 256)
    check_resize(Image.new("L", (4000, 300)), 256)  # a panorama is fine


def test_an_unreadable_regcache_json_is_skipped_with_a_warning(reg_ckpt, tmp_path, caplog):
    pattern = make_shards(tmp_path / "shards", n_shards=1, per_shard=2)
    cache = tmp_path / "c"
    res = extract(config(REG, reg_ckpt, pattern, cache))
    broken = cache / "other" / "x-000"
    broken.mkdir(parents=True)
    (broken / "regcache.json").write_text("")
    assert [fs.path for fs in list_feature_sets(cache)] == [res.path]
    assert "regcache.json is unreadable" in caplog.text
    r = CliRunner().invoke(main, ["ls", "--cache", str(cache)])
    assert r.exit_code == 0 and "shards" in r.output
    assert extract(config(REG, reg_ckpt, pattern, cache)).reused


def test_a_store_of_an_unknown_schema_is_refused(reg_ckpt, tmp_path):
    pattern = make_shards(tmp_path / "shards", n_shards=1, per_shard=2)
    res = extract(config(REG, reg_ckpt, pattern, tmp_path / "c"))
    meta = json.loads((res.path / "regcache.json").read_text())
    meta["schema_version"] = 99
    (res.path / "regcache.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="schema 99, which this regcache does not read"):
        FeatureSet(res.path)


def test_finalize_lists_missing_shards_exits_1_and_loads_no_model(reg_ckpt, tmp_path, monkeypatch):
    """--finalize with the parts' options: their set by its identity, never another set of the same data and
    model (here one decoded on the device), and no model loaded."""
    pattern = make_shards(tmp_path / "shards", n_shards=3, per_shard=2)
    cache = tmp_path / "c"
    r = subprocess.run(cli_args(reg_ckpt, pattern, cache, "--num-parts", "2", "--part", "0"), env=cli_env(),
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    done = extract(config(REG, reg_ckpt, pattern, cache, decode="device", device="cpu"))  # a complete set beside it
    monkeypatch.setattr("regcache.extract.run.load_model", lambda *a, **k: pytest.fail("--finalize loaded a model"))
    args = ["extract", "-m", REG, "--checkpoint", str(reg_ckpt), "-d", pattern, "--cache", str(cache), "--size",
            str(SIZE), "--resize", str(RESIZE), "--finalize", "-q"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, r.output
    assert "failed shard part-001.tar: not committed by any part yet" in r.output
    subprocess.run(cli_args(reg_ckpt, pattern, cache, "--num-parts", "2", "--part", "1"), env=cli_env(), check=True)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and "complete store" in r.output and str(done.path) not in r.output, r.output
    r = CliRunner().invoke(main, [*args, "--precision", "bf16"])  # options no part ran with: no set, said so
    assert r.exit_code == 1 and "no feature set" in r.output and "--store" in r.output, r.output


def test_temporaries_of_a_killed_writer_are_removed_on_resume(reg_ckpt, tmp_path):
    import socket

    pattern = make_shards(tmp_path / "shards", n_shards=1, per_shard=2)
    res = extract(config(REG, reg_ckpt, pattern, tmp_path / "c"))
    host = "".join(c if c.isalnum() or c in "_-" else "_" for c in socket.gethostname())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = res.path / "units" / f".000000.parquet.{host}.{int(dead.stdout)}.tmp"
    live = res.path / "units" / f".000001.parquet.{host}.{os.getpid()}.tmp"
    stale.write_bytes(b"partial")
    live.write_bytes(b"in progress")
    removed = FeatureSet(res.path).remove_stale_temporaries()
    assert removed == [stale] and not stale.exists() and live.exists()


def test_claims_are_exclusive_taken_over_when_stale_and_skip_committed_units(tmp_path):
    from regcache.store import Claims

    units = tmp_path / "units"
    units.mkdir()
    a, b = Claims(units, owner="hostA:1"), Claims(units, owner="hostB:2", stale_after=3600)
    assert a.take(0) and not b.take(0)          # exclusive while fresh
    b.release(0)
    assert (units / "000000.claim").read_text() == "hostA:1"  # nobody releases another's claim
    aged = os.path.getmtime(units / "000000.claim") - 1000  # no heartbeat for 1000 s
    os.utime(units / "000000.claim", (aged, aged))
    assert not b.take(0)                          # not stale for b's one-hour limit
    assert Claims(units, owner="hostC:3", stale_after=60).take(0)  # stale for a 60 s limit: taken over
    (units / "000001.parquet").write_bytes(b"")
    assert not a.take(1)                          # committed units are never claimed
    here = Claims(units)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (units / "000002.claim").write_text(here.owner.rsplit(":", 1)[0] + ":" + dead.stdout.strip())
    assert here.take(2)                           # its owner died on this host: taken at once


def test_two_identical_commands_share_the_shards_and_equal_one_run(reg_ckpt, tmp_path):
    from test_extract import assert_same_content

    pattern = make_shards(tmp_path / "shards", n_shards=8, per_shard=3)
    procs = [subprocess.Popen(cli_args(reg_ckpt, pattern, tmp_path / "shared"), env=cli_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    # the one that runs out of shards first while the other still writes says so, naming it, and exits 1
    for p, (o, e), other in zip(procs, outs, procs[::-1]):
        assert p.returncode == 0 or (p.returncode == 1 and f"held by pid {other.pid} on host" in e), (o, e)
    assert 0 in [p.returncode for p in procs], outs
    written = [int(re.search(r"(\d+) shards written", o).group(1)) for o, _ in outs]
    assert sum(written) == 8, outs                # every shard extracted once, by one of the two
    [shared] = list_feature_sets(tmp_path / "shared")
    FeatureSet(shared.path).finalize()
    alone = extract(config(REG, reg_ckpt, pattern, tmp_path / "alone"))
    assert FeatureSet(shared.path).complete
    assert_same_content(shared.path, alone.path)


def test_a_shard_that_outgrew_its_unit_names_the_command_that_fixes_it(reg_ckpt, tmp_path):
    d = tmp_path / "shards"
    pattern = make_shards(d, n_shards=2, per_shard=2)
    write_shards(random_images(5, seed=3, prefix="late"), str(d / "part-001-%d.tar"), 5)
    (d / "part-001-0.tar").rename(d / "part-001.tar")  # more samples than the units of 2 rows asked for hold
    first = res = extract(config(REG, reg_ckpt, pattern, tmp_path / "c", unit_rows=2))
    reason = res.failed_shards["part-001.tar"]
    assert "gives 5 rows but a unit of this store holds 2" in reason and "--unit-rows 5" in reason
    assert str(first.path) in reason
    import shutil
    shutil.rmtree(first.path)
    fixed = extract(config(REG, reg_ckpt, pattern, tmp_path / "c", unit_rows=5))
    assert fixed.complete and fixed.ok == 7


def test_a_torch_file_named_safetensors_is_a_clear_error(tmp_path):
    import torch

    from regcache.models import ModelError, read_checkpoint

    fake = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(2)}, fake)
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        read_checkpoint(fake)


def test_a_full_disk_names_the_store_and_the_shard(reg_ckpt, tmp_path, monkeypatch):
    import errno

    from regcache.store.writer import UnitWriter

    def full(*args, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    pattern = make_shards(tmp_path / "shards", n_shards=2, per_shard=2)
    monkeypatch.setattr(UnitWriter, "_write_unit", full)
    res = extract(config(REG, reg_ckpt, pattern, tmp_path / "c"))
    assert set(res.failed_shards) == {"part-000.tar", "part-001.tar"} and not res.complete
    reason = res.failed_shards["part-000.tar"]
    assert "cannot write shard part-000.tar into" in reason and str(res.path) in reason and "No space" in reason
    monkeypatch.undo()  # space again: the rerun commits both and nothing is lost
    again = extract(config(REG, reg_ckpt, pattern, tmp_path / "c"))
    assert again.complete and again.ok == 4 and again.path == res.path


def test_the_probe_suggests_the_extract_command_with_the_models_settings(reg_ckpt, tmp_path):
    """A missing set's suggested command makes a set the probe can use beside the cached ones: same weights, size."""
    import shlex

    data = make_shards(tmp_path / "shards", n_shards=1, per_shard=4)
    res = extract(config(REG, reg_ckpt, data, tmp_path / "c", name="train"))
    r = CliRunner().invoke(main, ["probe", "--model", REG, "-f", "cls", "--train", "train", "--val", "val2", "--cache",
                                  str(tmp_path / "c"), "--out", str(tmp_path / "run"), "-q"])
    assert r.exit_code != 0 and "no complete feature set of 'val2'" in r.output
    command = shlex.split(r.output.split("make it with:")[1].splitlines()[1])
    assert command[:2] == ["regcache", "extract"]
    flags = dict(zip(command[2::2], command[3::2]))
    stored = FeatureSet(res.path).meta
    assert flags["--checkpoint"] == str(reg_ckpt) and flags["--model"] == REG
    assert (int(flags["--size"]), int(flags["--resize"])) == (stored.identity["size"], stored.identity["resize"])
