"""The store as a state machine (issue 27, item 6), the way zarr-python tests its stores: Hypothesis runs random
sequences of commit / fail / adopt / claim / finalize against a plain model of what the set must hold, and after
every step the set says what the model says; and the direct shard reader against zarr on random arrays."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import zarr
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from zarr.codecs import BytesCodec, Crc32cCodec

from regcache.store import FeatureSet
from regcache.store.raw import raw_shards

from test_store import FEATS, make_meta, unit_data

UNITS, ROWS = 4, 5


class StoreMachine(RuleBasedStateMachine):
    """``committed``: unit -> (keys, rows of each feature, error keys); ``failed``: unit -> reason; ``final``:
    finalize said the set is complete. A source set holds every unit committed, for `adopt_unit`."""

    @initialize()
    def make(self):
        self.dir = Path(tempfile.mkdtemp(prefix="store-state-"))
        ident, meta = make_meta(UNITS, unit_rows=ROWS)
        self.fs = FeatureSet.create(self.dir / "fs", ident, meta)
        self.source = FeatureSet.create(self.dir / "src", {**ident, "model": "src"}, meta)
        self.source_units = {}
        for u in range(UNITS):
            arrays, records = unit_data(100 + u, 3)
            self.source.commit_unit(u, arrays, records)
            self.source_units[u] = ([k for k, _, _ in records], arrays, [])
        self.committed, self.failed, self.final = {}, {}, False

    @precondition(lambda self: not self.final)
    @rule(unit=st.integers(0, UNITS - 1), n=st.integers(0, ROWS), bad=st.integers(0, 2), seed=st.integers(0, 9))
    def commit(self, unit, n, bad, seed):
        arrays, records = unit_data(seed, n)
        records = [(f"{k}-{unit}", y, v) for k, y, v in records]
        errors = [(f"bad{j}-{unit}", "corrupt") for j in range(bad)]
        self.fs.commit_unit(unit, arrays, records, errors)
        self.committed[unit] = ([k for k, _, _ in records], arrays, [k for k, _ in errors])
        self.failed.pop(unit, None)

    @precondition(lambda self: not self.final)
    @rule(unit=st.integers(0, UNITS - 1))
    def fail(self, unit):
        self.fs.fail_unit(unit, f"shard {unit} is cut short")
        if unit not in self.committed:
            self.failed[unit] = f"shard {unit} is cut short"

    @precondition(lambda self: not self.final)
    @rule(unit=st.integers(0, UNITS - 1))
    def adopt(self, unit):
        self.fs.adopt_unit(self.source, unit)
        self.committed[unit] = self.source_units[unit]
        self.failed.pop(unit, None)

    @rule(unit=st.integers(0, UNITS - 1))
    def claim(self, unit):
        claims = self.fs.claims()
        took = claims.take(unit)
        assert took == (unit not in self.committed), "a committed unit is never claimed, another always is"
        if took:
            assert not claims.take(unit) or True  # this process may take its own claim again
            claims.release(unit)

    @rule()
    def finalize(self):
        usable = any(keys for keys, _, _ in self.committed.values()) or not any(
            bad for _, _, bad in self.committed.values())
        done = self.fs.finalize()
        assert done == (self.final or (len(self.committed) == UNITS and usable))
        self.final = done

    @invariant()
    def holds_what_the_model_holds(self):
        if not hasattr(self, "fs"):
            return
        fs = FeatureSet(self.fs.path)
        assert fs.committed_units() == set(self.committed)
        assert set(fs.failed_units()) == set(self.failed)
        assert fs.complete == self.final
        if self.final:
            units = range(UNITS)
            assert list(fs.index.key) == [k for u in units for k in self.committed[u][0]]
            assert list(fs.errors.key) == [k for u in units for k in self.committed[u][2]]
            rows = fs.index.row.to_numpy()
            for name in FEATS:
                want = np.concatenate([self.committed[u][1][name] for u in units])
                np.testing.assert_array_equal(fs.read_rows(name, rows), want.astype(fs.dtype))
            assert fs.damage() == [] and fs.verify()[0] == []


TestStore = StoreMachine.TestCase
TestStore.settings = settings(max_examples=30, stateful_step_count=12, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- the direct reader against zarr

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(dtype=st.sampled_from(["float16", "float32", "int32", "uint8"]),
       shape=st.sampled_from([(), (3,), (2, 3)]),
       inner=st.integers(1, 4), per_unit=st.integers(1, 3), units=st.integers(1, 3),
       checksums=st.booleans(), written=st.lists(st.booleans(), min_size=3, max_size=3), data=st.data())
def test_the_direct_reader_reads_what_zarr_reads(tmp_path_factory, dtype, shape, inner, per_unit, units, checksums,
                                                 written, data):
    """Random dtypes, feature shapes, inner chunks per unit, checksums or none, units never written (fill) and
    inner chunks all zeros (not stored), then random row picks: RawShards gives zarr's values."""
    path = tmp_path_factory.mktemp("raw") / "a"
    rows = inner * per_unit
    arr = zarr.create_array(str(path), shape=(rows * units, *shape), shards=(rows, *shape), chunks=(inner, *shape),
                            dtype=dtype, fill_value=0, compressors=Crc32cCodec() if checksums else None,
                            serializer=BytesCodec(endian="little"))
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16)))
    values = (rng.normal(size=(rows * units, *shape)) * 50).astype(dtype)
    values[rng.random(rows * units) < 0.3] = 0  # some inner chunks end up all zeros: not stored
    for u in range(units):
        if written[u]:
            arr[u * rows:(u + 1) * rows] = values[u * rows:(u + 1) * rows]
    want = arr[:]
    meta = __import__("json").loads((path / "zarr.json").read_text())
    raw = raw_shards(meta, rows)
    assert raw is not None and raw.chunk_crc == checksums
    for u in range(units):
        file = path / "c" / str(u) / "/".join(["0"] * len(shape)) if shape else path / "c" / str(u)
        first = data.draw(st.integers(0, rows - 1))
        last = data.draw(st.integers(first + 1, rows))
        out = np.empty((last - first, *shape), dtype)
        raw.read(file if file.is_file() else None, u, first, out)
        np.testing.assert_array_equal(out, want[u * rows + first:u * rows + last])
