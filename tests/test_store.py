"""The store's guarantees (docs/design.md, "Store"), checked on hand-made units without any model."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regcache.features import TokenLayout
from regcache.store import FeatureSet, StoreError, find_reusable

from conftest import record

LAYOUT = TokenLayout(has_cls=True, num_reg=2, grid=(2, 2), dim=3)
FEATS = ["cls", "reg_all", "norms"]


def make_meta(num_units: int, unit_rows: int, dtype: str = "float32", **identity) -> tuple[dict, dict]:
    ident = {"model": "m", "data": "d", "features": sorted(FEATS), **identity}
    shards = [f"s{u}.tar" for u in range(num_units)]
    return ident, record(FEATS, LAYOUT, dtype, unit_rows, num_units, shards=shards, urls=shards)


def unit_data(unit: int, n: int):
    rng = np.random.default_rng(unit)
    arrays = {f: rng.normal(size=(n, *LAYOUT.shape(f))).astype(np.float32) for f in FEATS}
    records = [(f"u{unit}-k{i}", int(rng.integers(0, 5)), 0) for i in range(n)]
    return arrays, records


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 3)), min_size=1, max_size=5),
       order=st.randoms(use_true_random=False))
def test_units_in_any_order_give_one_table_in_dataset_order(tmp_path_factory, sizes, order):
    path = tmp_path_factory.mktemp("fs")
    fs = FeatureSet.create(path, *make_meta(len(sizes), unit_rows=6))
    units = list(range(len(sizes)))
    order.shuffle(units)
    for i, u in enumerate(units):
        assert not fs.complete
        n_ok, n_bad = sizes[u]
        arrays, records = unit_data(u, n_ok)
        fs.commit_unit(u, arrays, records, [(f"u{u}-bad{j}", "corrupt") for j in range(n_bad)])
        usable = any(n for n, _ in sizes) or not any(b for _, b in sizes)
        assert fs.finalize() == (i == len(units) - 1 and usable)
    fs = FeatureSet(path)
    if not usable:  # every sample failed: no index, so never reused, and the reason says so
        assert not fs.complete and "every one of its" in fs.unusable()
        return
    idx, err = fs.index, fs.errors
    # exactly once: ok + failed = total, no key twice
    assert len(idx) + len(err) == sum(a + b for a, b in sizes)
    assert not set(idx.key) & set(err.key) and idx.key.is_unique and err.key.is_unique
    assert list(idx.key) == [f"u{u}-k{i}" for u, (n, _) in enumerate(sizes) for i in range(n)]
    got = fs.load(FEATS, concat=False)
    for u, (n, _) in enumerate(sizes):
        arrays, records = unit_data(u, n)
        sel = idx.shard == f"s{u}.tar"
        for f in FEATS:
            np.testing.assert_array_equal(got.x[f][sel.to_numpy()], arrays[f])
        assert list(idx.label[sel]) == [r[1] for r in records]
    # readable with zarr-python and pandas alone, as docs/design.md ("Store") promises
    index = pd.read_parquet(path / "index.parquet")
    X = zarr.open_array(path / "features.zarr" / "cls")[:][index["row"]]
    np.testing.assert_array_equal(X, got.x["cls"])


def test_unit_is_invisible_until_committed_and_recommit_is_identical(tmp_path):
    fs = FeatureSet.create(tmp_path, *make_meta(2, unit_rows=4))
    arrays, records = unit_data(0, 3)
    fs.commit_unit(0, arrays, records)
    assert fs.committed_units() == {0}
    assert len(FeatureSet(tmp_path).index) == 3 and not fs.complete
    with pytest.raises(StoreError, match="incomplete"):
        FeatureSet(tmp_path).load("cls")
    before = FeatureSet(tmp_path).load(FEATS, allow_incomplete=True).x
    fs.commit_unit(0, arrays, records)  # a rerun of the same unit
    np.testing.assert_array_equal(FeatureSet(tmp_path).load(FEATS, allow_incomplete=True).x, before)


def test_unit_overflow_is_refused(tmp_path):
    fs = FeatureSet.create(tmp_path, *make_meta(1, unit_rows=2))
    with pytest.raises(StoreError, match="unit-rows"):
        fs.commit_unit(0, *unit_data(0, 3))
    assert fs.committed_units() == set()


def test_other_fingerprint_is_refused_and_names_the_difference(tmp_path):
    FeatureSet.create(tmp_path, *make_meta(1, unit_rows=2))
    FeatureSet.create(tmp_path, *make_meta(1, unit_rows=2))  # same identity: opens
    with pytest.raises(StoreError, match="differs in: model"):
        FeatureSet.create(tmp_path, *make_meta(1, unit_rows=2, model="other"))


def test_failed_unit_is_recorded_then_cleared_by_a_commit(tmp_path):
    fs = FeatureSet.create(tmp_path, *make_meta(1, unit_rows=2))
    fs.fail_unit(0, "truncated")
    assert fs.failed_units() == {0: "truncated"}
    fs.commit_unit(0, *unit_data(0, 2))
    assert fs.failed_units() == {} and fs.finalize()


def test_stray_files_in_units_are_not_units_and_a_damaged_failure_record_still_says_failed(tmp_path):
    """A copy, a note or a unit number past the set's end in units/ is not one of its units; a cut .failed file
    still marks its unit failed (and says why it cannot say more), rather than stopping every command."""
    fs = FeatureSet.create(tmp_path, *make_meta(2, unit_rows=2))
    fs.commit_unit(0, *unit_data(0, 2))
    units = tmp_path / "units"
    for stray in ("000000 (copy).parquet", "notes.parquet", "000007.parquet", "00001.parquet"):
        (units / stray).write_bytes((units / "000000.parquet").read_bytes())
    assert fs.committed_units() == {0} and not fs.finalize()
    fs.fail_unit(1, "truncated")
    (units / "000001.failed").write_text('{"reason": "trunc')
    (reason,) = fs.failed_units().values()
    assert list(fs.failed_units()) == [1] and "does not read" in reason and "000001.failed" in reason
    fs.commit_unit(1, *unit_data(1, 1))
    assert fs.failed_units() == {} and fs.finalize() and len(fs.index) == 3


def test_float16_padding_is_not_stored(tmp_path):
    fs = FeatureSet.create(tmp_path, *make_meta(2, unit_rows=50_000, dtype="float16"))
    fs.commit_unit(0, *unit_data(0, 10))
    fs.commit_unit(1, *unit_data(1, 0))
    stored = fs.nbytes()
    meta = json.loads((tmp_path / "features.zarr" / "cls" / "zarr.json").read_text())
    assert meta["data_type"] == "float16"
    # 2 units x 50,000 rows x (3 + 6 + 8) values x 2 bytes = 3.4 MB; at most one partly filled inner chunk
    # (<= 1024 rows) per feature of unit 0 is stored, plus the shard indexes
    assert stored < 1024 * 17 * 2 + 3 * 2 * (16 * 50 + 4)


def old_layout(path, meta):
    """Arrays as regcache wrote them before raw shards: one blosc-lz4 chunk per unit."""
    from zarr.codecs import BloscCodec

    group = zarr.open_group(path / "features.zarr", mode="a", zarr_format=3)
    for name in meta.features:
        shape = LAYOUT.shape(name)
        group.create_array(name, shape=(meta.unit_rows * meta.num_units, *shape),
                           chunks=(meta.unit_rows, *shape), dtype=meta.dtype, fill_value=0,
                           compressors=BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), overwrite=True)


@pytest.mark.parametrize("layout", ["raw shards", "blosc chunks (older stores)"])
def test_direct_shard_reads_equal_zarr_reads(tmp_path, monkeypatch, layout):
    """Every read path (direct from the shard files, zarr's for other layouts) reads what zarr-python reads:
    whole units, parts of inner chunks, rows out of order, inner chunks never written, other dtypes."""
    import regcache.store.writer as writer

    monkeypatch.setattr(writer, "inner_rows", lambda rows, row_bytes: 4)  # several inner chunks per unit
    if layout != "raw shards":
        monkeypatch.setattr(writer.UnitWriter, "_create_arrays", staticmethod(old_layout))
    fs = FeatureSet.create(tmp_path / "fs", *make_meta(4, unit_rows=12, dtype="float16"))
    for u, n in enumerate((12, 5, 0, 9)):  # full, one inner chunk and a part, empty, two and a part
        fs.commit_unit(u, *unit_data(u, n))
    assert fs.finalize()
    assert (fs._raw_shards("cls") is not None) == (layout == "raw shards")
    rows = fs.index.row.to_numpy()
    for name in FEATS:
        whole = zarr.open_array(str(tmp_path / "fs" / "features.zarr" / name))[:]
        np.testing.assert_array_equal(fs.read_rows(name, rows), whole[rows])
        pick = rows[[7, 3, 14, 20, 13, 0, 25]]  # out of order, across units
        np.testing.assert_array_equal(fs.read_rows(name, pick), whole[pick])
        np.testing.assert_array_equal(fs.read_rows(name, np.arange(24, 36)), whole[24:36])  # with padding
        wide = np.zeros((len(rows), 2, *LAYOUT.shape(name)), np.float32)
        fs.read_rows(name, rows, out=wide[:, 1])  # a strided float32 target
        np.testing.assert_array_equal(wide[:, 1], whole[rows].astype(np.float32))
    if layout == "raw shards":
        assert not (tmp_path / "fs" / "features.zarr" / "cls" / "c" / "2").exists()  # the empty unit: nothing


def test_reuse_finds_a_superset_of_the_features(tmp_path):
    ident, meta = make_meta(1, unit_rows=2)
    fs = FeatureSet.create(tmp_path / "a", ident, meta)
    fs.commit_unit(0, *unit_data(0, 1))
    assert find_reusable(tmp_path, ident) is None  # incomplete sets are never reused
    assert fs.finalize()
    assert find_reusable(tmp_path, ident).path == fs.path
    assert find_reusable(tmp_path, {**ident, "features": ["cls"]}).path == fs.path
    assert find_reusable(tmp_path, {**ident, "features": ["cls", "patch"]}) is None
    assert find_reusable(tmp_path, {**ident, "model": "other"}) is None
