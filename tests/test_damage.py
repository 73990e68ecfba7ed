"""Damaged sets (issue 19): a missing, cut or changed file is an error that names it, never rows of zeros.

Sets are made by hand (no model) from known arrays, so every read is checked against the arrays
committed, and the damage is done to the files as a partial copy, a cut or a flipped bit would.
"""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import zarr
from click.testing import CliRunner

from regcache.cli import main
from regcache.store import FeatureSet, StoreError
from regcache.store.tables import parquet_bytes

from conftest import record
from test_store import FEATS, LAYOUT, old_layout, unit_data

UNIT_ROWS = 32  # rows reserved per unit: 8 inner chunks of 4, the last partly padding
SIZES = (30, 30, 30, 30)  # the cache: 120 rows in 4 units


def meta(name: str, sizes=SIZES, unit_rows=UNIT_ROWS, dtype="float16"):
    ident = {"model": "m", "data": name, "features": sorted(FEATS), "size": 4, "resize": 4, "crop_mode": "center",
             "precision": "fp32"}
    return ident, record(FEATS, LAYOUT, dtype, unit_rows, len(sizes), name)


def make(root, name="d", sizes=SIZES, finalize=True, unit_rows=UNIT_ROWS, dtype="float16"):
    """A set of ``sizes`` rows per unit; the arrays committed, by unit, for checking every read."""
    fs = FeatureSet.create(root / name, *meta(name, sizes, unit_rows, dtype))
    committed = {}
    for u, n in enumerate(sizes):
        if n is None:
            continue  # not committed
        arrays, records = unit_data(u, n)
        fs.commit_unit(u, arrays, records)
        committed[u] = {f: a.astype(dtype) for f, a in arrays.items()}
    if finalize:
        assert fs.finalize()
    return FeatureSet(root / name), committed


def shard_file(fs, name: str, unit: int):
    return fs.path / "features.zarr" / name / "c" / str(unit) / "/".join(["0"] * (len(LAYOUT.shape(name))))


def rows_of(unit: int, n: int = 30) -> np.ndarray:
    return unit * UNIT_ROWS + np.arange(n)


def expected(committed, name):
    return np.concatenate([committed[u][name] for u in sorted(committed)])


@pytest.fixture(params=["raw shards", "zarr (blosc chunks, older stores)"])
def layout(request, monkeypatch):
    """The raw reader, and zarr's path that older layouts read through."""
    import regcache.store.writer as writer

    monkeypatch.setattr(writer, "inner_rows", lambda rows, row_bytes: 4)  # several inner chunks, a partial last one
    if request.param != "raw shards":
        monkeypatch.setattr(writer.UnitWriter, "_create_arrays", staticmethod(old_layout))
    return request.param


# --------------------------------------------------------------------------- 1: missing and cut files

def test_a_missing_shard_file_of_a_committed_unit_is_an_error_that_names_it(tmp_path, layout):
    fs, committed = make(tmp_path)
    assert (fs._raw_shards("cls") is not None) == (layout == "raw shards")
    np.testing.assert_array_equal(fs.load("cls", concat=False, dtype=np.float16).x["cls"], expected(committed, "cls"))
    gone = shard_file(fs, "cls", 2)
    gone.unlink()  # a partial copy of the cache
    fs = FeatureSet(fs.path)
    with pytest.raises(StoreError, match=rf"{gone}: missing.*unit 2"):
        fs.load("cls")
    with pytest.raises(StoreError, match=str(gone)):
        fs.read_rows("cls", rows_of(2)[[1, 2]])
    # the other units and features read as committed
    np.testing.assert_array_equal(fs.read_rows("cls", rows_of(1)), committed[1]["cls"])
    np.testing.assert_array_equal(fs.load("reg_all", concat=False, dtype=np.float16).x["reg_all"],
                                  expected(committed, "reg_all"))


@pytest.mark.parametrize("keep", ["half", "ten bytes", "empty"])
def test_a_cut_shard_file_is_an_error_that_names_it(tmp_path, layout, keep):
    fs, committed = make(tmp_path)
    cut = shard_file(fs, "norms", 1)
    data = cut.read_bytes()
    cut.write_bytes(data[:{"half": len(data) // 2, "ten bytes": 10, "empty": 0}[keep]])
    fs = FeatureSet(fs.path)
    with pytest.raises(StoreError, match=str(cut)) as e:
        fs.load()
    assert "Errno" not in str(e.value)
    np.testing.assert_array_equal(fs.read_rows("norms", rows_of(0)), committed[0]["norms"])


def test_units_that_stored_nothing_read_as_zeros_without_a_file(tmp_path, layout):
    """No false alarm: a unit whose samples all failed, or whose features are all zero, has no file to miss."""
    fs = FeatureSet.create(tmp_path / "d", *meta("d", (3, 0, 2)))
    zeros = {f: np.zeros((2, *LAYOUT.shape(f)), np.float32) for f in FEATS}
    fs.commit_unit(0, *unit_data(0, 3))
    fs.commit_unit(1, *unit_data(1, 0), errors=[("bad", "corrupt")])
    fs.commit_unit(2, zeros, [("z0", 1, 0), ("z1", 2, 0)])
    assert fs.finalize()
    fs = FeatureSet(tmp_path / "d")
    for f in FEATS:
        assert not shard_file(fs, f, 1).exists() and not shard_file(fs, f, 2).exists()
        got = fs.load(f, concat=False, dtype=np.float32).x[f]
        np.testing.assert_array_equal(got, np.concatenate([unit_data(0, 3)[0][f].astype(np.float16), zeros[f]]))


def strip_file_records(fs) -> None:
    """Unit records as stores committed before this change wrote them (schema 3, before records were bound to
    their set): no file sizes, no full shard hash, no digests."""
    for p in (fs.path / "units").glob("*.parquet"):
        t = pq.read_table(p)
        md = {k: v for k, v in t.schema.metadata.items() if k == b"shard"}
        pq.write_table(t.replace_schema_metadata(md), p)
    as_schema_3(fs)


def as_schema_3(fs) -> None:
    """The set's record as schema 3 wrote it (its tables and records are then read without their binding)."""
    meta = json.loads((fs.path / "regcache.json").read_text())
    (fs.path / "regcache.json").write_text(json.dumps({**meta, "schema_version": 3}))


def test_older_unit_records_still_catch_a_missing_or_empty_file_of_a_unit_with_rows(tmp_path, layout):
    fs, committed = make(tmp_path, sizes=(30, 0, 30, 30))
    strip_file_records(fs)
    fs = FeatureSet(fs.path)
    np.testing.assert_array_equal(fs.load("cls", concat=False, dtype=np.float16).x["cls"], expected(committed, "cls"))
    shard_file(fs, "cls", 3).unlink()
    with pytest.raises(StoreError, match=str(shard_file(fs, "cls", 3))):
        FeatureSet(fs.path).load("cls")
    shard_file(fs, "norms", 2).write_bytes(b"")  # zarr reads an empty chunk file as fill value
    with pytest.raises(StoreError, match=rf"{shard_file(fs, 'norms', 2)}: empty"):
        FeatureSet(fs.path).load("norms")


# --------------------------------------------------------------------------- 2: checksums

def flip(path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


def test_new_stores_checksum_their_inner_chunks_and_zarr_alone_reads_them(tmp_path):
    fs, committed = make(tmp_path, sizes=(30, 7, 0, 30))
    conf = json.loads((fs.path / "features.zarr" / "cls" / "zarr.json").read_text())["codecs"][0]["configuration"]
    crc = {"name": "crc32c"}
    assert conf["codecs"][-1] == crc and conf["index_codecs"][-1] == crc
    assert fs._raw_shards("cls") is not None  # still the fast path
    index = pd.read_parquet(fs.path / "index.parquet")
    for f in FEATS:
        x = zarr.open_array(fs.path / "features.zarr" / f)[:][index["row"]]  # zarr-python and pandas alone
        np.testing.assert_array_equal(x, expected(committed, f))
        np.testing.assert_array_equal(fs.load(f, concat=False, dtype=np.float16).x[f], x)


@pytest.mark.parametrize("path", ["raw", "zarr"])
@pytest.mark.parametrize("where", ["first chunk", "partial last chunk", "shard index"])
def test_a_flipped_bit_in_a_shard_is_an_error_that_names_it(tmp_path, monkeypatch, path, where):
    import regcache.store.reader as reader
    import regcache.store.writer as writer

    monkeypatch.setattr(writer, "inner_rows", lambda rows, row_bytes: 4)
    fs, committed = make(tmp_path, sizes=(30, 30))
    hit = shard_file(fs, "reg_all", 1)
    row_bytes = int(np.prod(LAYOUT.shape("reg_all"))) * 2
    size = hit.stat().st_size
    flip(hit, {"first chunk": 5, "partial last chunk": 7 * (4 * row_bytes + 4) + row_bytes + 3,
               "shard index": size - 20}[where])
    if path == "zarr":
        monkeypatch.setattr(reader.FeatureReader, "_raw_shards", lambda self, name: None)
    fs = FeatureSet(fs.path)
    with pytest.raises(StoreError, match=rf"{hit}.*(checksum|crc32c)"):
        fs.load("reg_all")
    np.testing.assert_array_equal(fs.read_rows("reg_all", rows_of(0)), committed[0]["reg_all"])
    with pytest.raises(ValueError, match="checksum"):  # zarr-python checks it on its own
        zarr.open_array(fs.path / "features.zarr" / "reg_all")[rows_of(1)]


def test_raw_shards_without_checksums_still_read_directly(tmp_path, monkeypatch):
    """Stores written before checksums (raw inner chunks, index crc32c only) keep the direct path."""
    import regcache.store.writer as writer

    def unchecked(path, meta):
        group = zarr.open_group(path / "features.zarr", mode="a", zarr_format=3)
        for name in meta.features:
            shape = LAYOUT.shape(name)
            group.create_array(name, shape=(meta.unit_rows * meta.num_units, *shape),
                               shards=(meta.unit_rows, *shape), chunks=(4, *shape), dtype=meta.dtype,
                               fill_value=0, compressors=None, overwrite=True)

    monkeypatch.setattr(writer.UnitWriter, "_create_arrays", staticmethod(unchecked))
    fs, committed = make(tmp_path, sizes=(30, 9, 0))
    assert json.loads((fs.path / "features.zarr" / "cls" / "zarr.json").read_text())["codecs"][0][
        "configuration"]["codecs"] == [{"name": "bytes", "configuration": {"endian": "little"}}]
    assert fs._raw_shards("cls") is not None
    for f in FEATS:
        np.testing.assert_array_equal(fs.load(f, concat=False, dtype=np.float16).x[f], expected(committed, f))
    np.testing.assert_array_equal(fs.read_rows("cls", np.array([UNIT_ROWS + 3, 2, UNIT_ROWS + 1])),
                                  np.stack([committed[1]["cls"][3], committed[0]["cls"][2], committed[1]["cls"][1]]))


# --------------------------------------------------------------------------- 3: ls lists the healthy sets

def ls(root, *args):
    return CliRunner().invoke(main, ["ls", "--cache", str(root), *args])


def test_ls_marks_a_damaged_index_or_unit_record_and_lists_the_healthy_sets(tmp_path):
    make(tmp_path, "good")
    bad, _ = make(tmp_path, "badindex")
    (bad.path / "index.parquet").write_bytes(b"PAR1 not really")
    part, _ = make(tmp_path, "badrecord", sizes=(30, 30, None), finalize=False)
    (part.path / "units" / "000001.parquet").write_bytes(b"garbage")
    r = ls(tmp_path)
    assert r.exit_code == 0, r.output
    assert "good" in r.output
    assert str(bad.path / "index.parquet") in r.output and str(part.path / "units" / "000001.parquet") in r.output
    r = ls(tmp_path, "--json")
    assert r.exit_code == 0, r.output
    rows = {",".join(json.loads(line)["dataset"] or ["?"]): json.loads(line) for line in r.stdout.splitlines()}
    assert rows["good"]["damaged"] == [] and rows["good"]["rows"] == 120 and rows["good"]["complete"]
    [d] = rows["badindex"]["damaged"]
    assert d["file"] == str(bad.path / "index.parquet") and d["reason"]
    [d] = rows["badrecord"]["damaged"]
    assert d["file"] == str(part.path / "units" / "000001.parquet")


def test_ls_marks_a_set_with_a_missing_shard_file(tmp_path):
    fs, _ = make(tmp_path, "copy")
    make(tmp_path, "good")
    shard_file(fs, "reg_all", 3).unlink()
    r = ls(tmp_path, "--json")
    rows = {",".join(json.loads(line)["dataset"] or ["?"]): json.loads(line) for line in r.stdout.splitlines()}
    assert rows["good"]["damaged"] == []
    [d] = rows["copy"]["damaged"]
    assert d["file"] == str(shard_file(fs, "reg_all", 3)) and "missing" in d["reason"]
    r = ls(tmp_path)
    assert r.exit_code == 0 and str(shard_file(fs, "reg_all", 3)) in r.output


def test_ls_lists_an_unreadable_regcache_json_as_damaged(tmp_path):
    make(tmp_path, "good")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "regcache.json").write_text("{")
    r = ls(tmp_path, "--json")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [r["dataset"] for r in rows if not r["damaged"]] == [["good"]]
    [broken] = [r for r in rows if r["damaged"]]
    assert broken["damaged"][0]["file"] == str(tmp_path / "broken" / "regcache.json")


# --------------------------------------------------------------------------- 5: errors name the file

def test_a_damaged_zarr_json_is_an_error_that_names_it(tmp_path):
    fs, _ = make(tmp_path)
    where = fs.path / "features.zarr" / "cls" / "zarr.json"
    where.write_text('{"shape": [120, ')
    with pytest.raises(StoreError, match=str(where)):
        FeatureSet(fs.path).load("cls")
    with pytest.raises(StoreError, match=str(where)):
        FeatureSet(fs.path).array("cls")


@pytest.mark.parametrize("table", ["index.parquet", "errors.parquet"])
def test_a_damaged_table_is_an_error_that_names_it(tmp_path, table):
    fs, _ = make(tmp_path)
    (fs.path / table).write_bytes(b"not parquet")
    with pytest.raises(StoreError, match=str(fs.path / table)):
        FeatureSet(fs.path).load("cls")


def test_a_damaged_unit_record_is_an_error_that_names_it(tmp_path):
    fs, _ = make(tmp_path, sizes=(30, 30, None), finalize=False)
    rec = fs.path / "units" / "000001.parquet"
    rec.write_bytes(b"")
    with pytest.raises(StoreError, match=str(rec)):
        FeatureSet(fs.path).index
    with pytest.raises(StoreError, match=str(rec)):
        FeatureSet(fs.path).unit_shard(1)


def test_an_incomplete_set_says_what_command_completes_it(tmp_path):
    fs, _ = make(tmp_path, sizes=(30, 30, None), finalize=False)
    with pytest.raises(StoreError, match="1 of 3 shards not committed") as e:
        fs.load("cls")
    assert "allow_incomplete" not in str(e.value) and "extract" in str(e.value)
    fs.commit_unit(2, *unit_data(2, 3))  # every unit in, but no index written (a killed last writer)
    with pytest.raises(StoreError, match="--finalize") as e:
        FeatureSet(fs.path).load("cls")
    assert "allow_incomplete" not in str(e.value)


# --------------------------------------------------------------------------- 4: the full shard hash, and verify

def test_the_full_shard_hash_is_taken_while_the_shard_is_read(tmp_path):
    import gzip

    from regcache.data import open_shard
    from regcache.shards import write_shards

    from conftest import random_images

    [path] = write_shards(random_images(7), str(tmp_path / "s-%03d.tar"), 7)
    (tmp_path / "s.tar.gz").write_bytes(gzip.compress(open(path, "rb").read()))
    for p in (path, str(tmp_path / "s.tar.gz")):
        h = hashlib.sha256()
        assert sum(1 for _ in open_shard(p, allow_pipe=False, sha256=h)) == 7
        assert h.hexdigest() == hashlib.sha256(open(p, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def extracted(reg_ckpt, tmp_path_factory):
    from regcache.extract import extract

    from conftest import REG, config, make_shards

    root = tmp_path_factory.mktemp("x")
    pattern = make_shards(root / "shards", n_shards=2, per_shard=3)
    res = extract(config(REG, reg_ckpt, pattern, root / "c"))
    assert res.complete
    return res.path, root / "shards"


def test_extraction_records_each_shards_full_hash(extracted):
    src, _ = extracted
    fs = FeatureSet(src)
    for u in range(2):
        rec = fs.unit_shard(u)
        assert rec["sha256"] == hashlib.sha256(open(rec["path"], "rb").read()).hexdigest()


def verify(*paths):
    return CliRunner().invoke(main, ["verify", *map(str, paths)])


def test_verify_passes_a_whole_set_and_lists_every_problem_by_file(tmp_path):
    fs, _ = make(tmp_path)
    r = verify(fs.path)
    assert r.exit_code == 0, r.output
    assert "not recorded" in r.output  # hand-made units record no input shard
    shard_file(fs, "cls", 0).unlink()
    flip(shard_file(fs, "norms", 2), 9)
    (fs.path / "errors.parquet").write_bytes(b"x")
    r = verify(fs.path, tmp_path / "nothing")
    assert r.exit_code == 1
    for named in (shard_file(fs, "cls", 0), shard_file(fs, "norms", 2), fs.path / "errors.parquet"):
        assert str(named) in r.output, r.output
    assert f"NOT FOUND  {tmp_path / 'nothing'}" in r.output and "nothing/regcache.json" not in r.output


def test_verify_finds_an_index_that_is_not_the_unit_records(tmp_path):
    fs, _ = make(tmp_path)
    other, _ = make(tmp_path, "other", sizes=(30, 30, 30, 29))
    shutil.copy(other.path / "index.parquet", fs.path / "index.parquet")
    r = verify(fs.path)
    assert r.exit_code == 1 and str(fs.path / "index.parquet") in r.output, r.output


def test_verify_recomputes_each_input_shards_full_hash(extracted, tmp_path):
    src, shards = extracted
    r = verify(src)
    assert r.exit_code == 0 and "not recorded" not in r.output, r.output
    # the input shard changed after extraction: verify names it, whatever the sampled digest saw
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    set_copy = tmp_path / "set"
    shutil.copytree(src, set_copy)
    for p in (set_copy / "units").glob("*.parquet"):  # point the copy's records at the copied shards
        t = pq.read_table(p)
        md = dict(t.schema.metadata)
        shard = json.loads(md[b"shard"])
        shard["path"] = str(copy / shard["path"].rsplit("/", 1)[1])
        md[b"shard"] = json.dumps(shard).encode()
        p.write_bytes(parquet_bytes(t.replace_schema_metadata(md)))  # a record as written, digest included
    assert verify(set_copy).exit_code == 0
    flip(copy / "part-001.tar", 700)
    r = verify(set_copy)
    assert r.exit_code == 1 and str(copy / "part-001.tar") in r.output and "sha256" in r.output, r.output
    (copy / "part-000.tar").unlink()
    r = verify(set_copy)
    assert r.exit_code == 1 and str(copy / "part-000.tar") in r.output, r.output
