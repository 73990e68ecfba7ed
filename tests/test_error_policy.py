"""The error policy (issue 27, item 7), webdataset's way: data errors are recorded by name, a bug in regcache
propagates with its traceback, and handler=reraise stops at the first error of any kind."""
from __future__ import annotations

import pytest

import regcache.extract.stream as stream_mod
from regcache.data import SampleError
from regcache.extract import extract, extract_many
from regcache.store import FeatureSet

from conftest import NOREG, REG, RESIZE, SIZE, config, make_checkpoint, make_shards
from test_extract import png, write_raw


def test_a_bug_in_the_reader_propagates_instead_of_failing_the_shard(reg_ckpt, tmp_path, monkeypatch):
    """Before, any exception in the shard loop became "shard failed: AttributeError ..." and the run went on."""
    data = make_shards(tmp_path / "s", n_shards=1, per_shard=2)

    def broken(*a):
        raise AttributeError("'NoneType' object has no attribute 'labels' (a regcache bug)")

    monkeypatch.setattr(stream_mod, "decode_label", broken)
    with pytest.raises(AttributeError, match="a regcache bug"):
        extract(config(REG, reg_ckpt, data, tmp_path / "c"))


def test_reraise_stops_at_a_damaged_sample_that_record_records(reg_ckpt, tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    import numpy as np

    write_raw(d / "s-000.tar", [{"__key__": "good", "png": png(np.zeros((40, 40, 3), np.uint8)), "cls": b"0"},
                                {"__key__": "corrupt", "png": b"\x89PNG\r\n\x1a\n-not-really", "cls": b"0"}])
    data = str(d / "s-000.tar")
    res = extract(config(REG, reg_ckpt, data, tmp_path / "c"))
    assert res.failed == 1 and list(FeatureSet(res.path).errors.key) == ["corrupt"]
    with pytest.raises(SampleError, match="cannot decode"):
        extract(config(REG, reg_ckpt, data, tmp_path / "c2", handler="reraise"))


def test_a_model_that_fails_on_the_data_stops_alone_and_a_bug_stops_the_pass(reg_ckpt, tmp_path, monkeypatch):
    """Of several models in a pass, one whose forward raises a RuntimeError (out of memory, an input it cannot
    take) stops and the others finish; a TypeError (a bug) stops the pass with its traceback."""
    data = make_shards(tmp_path / "s", n_shards=1, per_shard=2)
    noreg = make_checkpoint(tmp_path / "noreg.safetensors", NOREG)
    import regcache.extract.passes as passes

    real = passes._Forward.__call__

    def failing(kind):
        def call(self, images):
            if self.layout.num_reg == 0:  # the model without registers
                raise kind("no luck on this input")
            return real(self, images)
        return call

    both = [config(REG, reg_ckpt, data, tmp_path / "c"), config(NOREG, noreg, data, tmp_path / "c")]
    monkeypatch.setattr(passes._Forward, "__call__", failing(RuntimeError))
    reg, plain = extract_many(both)
    assert reg.complete and not plain.complete and "RuntimeError: no luck" in plain.error
    monkeypatch.setattr(passes._Forward, "__call__", failing(TypeError))
    with pytest.raises(TypeError, match="no luck"):
        extract_many([config(REG, reg_ckpt, data, tmp_path / "c3"), config(NOREG, noreg, data, tmp_path / "c3")])


def test_the_command_line_shows_bad_input_in_one_line_and_its_traceback_on_request(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from regcache.cli import main

    args = ["extract", "-m", "vits", "-d", str(tmp_path / "none.yaml"), "--cache", str(tmp_path)]
    plain = CliRunner().invoke(main, args)
    assert plain.exit_code == 1 and "Traceback" not in plain.output and plain.output.startswith("Error:")
    monkeypatch.setenv("REGCACHE_TRACEBACK", "1")
    shown = CliRunner().invoke(main, args)
    assert shown.exit_code == 1 and shown.exception is not None and not isinstance(shown.exception, SystemExit)


def test_a_device_that_is_not_there_is_refused_before_any_set_is_made(reg_ckpt, tmp_path):
    """--device gpu was a torch traceback, and --device cuda without a GPU left an empty 0/1 set behind."""
    import torch
    from click.testing import CliRunner

    from regcache.cli import main

    shards = make_shards(tmp_path / "s", n_shards=1, per_shard=4)
    base = ["extract", "-m", REG, "--checkpoint", str(reg_ckpt), "-d", shards, "--size", str(SIZE), "--resize",
            str(RESIZE), "--cache", str(tmp_path / "c"), "-q"]
    r = CliRunner().invoke(main, [*base, "--device", "gpu"])
    assert r.exit_code == 1 and "unknown device 'gpu' (cpu, cuda" in r.output, r.output
    if not torch.cuda.is_available():
        r = CliRunner().invoke(main, [*base, "--device", "cuda"])
        assert r.exit_code == 1 and "torch finds 0 CUDA devices" in r.output, r.output
    assert not list((tmp_path / "c").rglob("regcache.json"))
