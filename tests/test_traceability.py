"""Every number traceable to its bytes (issue 25): shard edits that keep size and mtime, the classes heads were
trained on, manifest corrections in pipelines, unit files bound to their place, checksummed tables, the weights
loaded, strict YAML, duplicate list values, and failures that name their file and leave nothing half-made."""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import tarfile
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from regcache.cli import main
from regcache.extract import extract, extract_many
from regcache.store import FeatureSet, StoreError

from conftest import REG, RESIZE, SIZE, config, make_checkpoint, make_set, random_images
from test_damage import make, shard_file


def _cli(*args, code=0):
    r = CliRunner().invoke(main, [str(a) for a in args])
    assert r.exit_code == code, r.output
    return r


@pytest.fixture
def old_enough(monkeypatch):
    """Files count as settled at once (not changed within the last seconds), so that their digests are remembered:
    the memo, not a fresh hash, is what the test then relies on."""
    import regcache.digests as digests

    monkeypatch.setattr(digests, "_now", lambda: time.time() + 3600, raising=False)


# --------------------------------------------------------------------------- 1: shard identity

def _padded_shard(path, n=6, pad=150_000):
    """A shard whose samples carry a large extra member, so that most of its bytes lie between sampled windows."""
    import webdataset as wds

    with wds.TarWriter(str(path), encoder=False, mtime=0.0) as w:
        for key, img, label in random_images(n, seed=3):
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            w.write({"__key__": key, "png": buf.getvalue(), "cls": str(label).encode(), "pad": b"\0" * pad})


def _edit_member_in_place(path, member_suffix: str, new: bytes, avoid=()) -> str:
    """Overwrite the data of the first member ending in ``member_suffix`` that lies outside ``avoid`` (byte
    ranges), keeping the file's size and modification time; returns the member's name."""
    with tarfile.open(path) as t:
        member = next(m for m in t.getmembers() if m.name.endswith(member_suffix)
                      and not any(a <= m.offset_data < b for a, b in avoid))
    assert member.size == len(new)
    st = os.stat(path)
    time.sleep(0.05)  # the kernel's file clock ticks: the change time moves
    with open(path, "r+b") as f:
        f.seek(member.offset_data)
        f.write(new)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns
    return member.name


def test_a_label_fixed_in_place_keeping_size_and_mtime_makes_a_new_set(reg_ckpt, tmp_path, old_enough):
    shard = tmp_path / "shards" / "s-000.tar"
    shard.parent.mkdir()
    _padded_shard(shard)
    size, window = shard.stat().st_size, 1 << 16
    sampled = [((size - window) * i // 7, (size - window) * i // 7 + window) for i in range(8)]  # the old digest's
    first = extract(config(REG, reg_ckpt, str(shard), tmp_path / "c", labels="cls"))
    assert first.complete
    name = _edit_member_in_place(shard, ".cls", b"9", avoid=sampled)
    again = extract(config(REG, reg_ckpt, str(shard), tmp_path / "c", labels="cls"))
    assert not again.reused and again.path != first.path
    index = FeatureSet(again.path).index.set_index("key")
    assert index.loc[name.rsplit(".", 1)[0], "label"] == 9


def test_the_digest_memo_sees_an_in_place_edit_that_keeps_size_and_mtime(tmp_path, old_enough):
    from regcache.digests import file_digest

    f, memo = tmp_path / "x.bin", tmp_path / "memo"
    f.write_bytes(bytes(300_000))
    before = file_digest(f, memo)
    assert list(memo.iterdir())  # remembered
    st = f.stat()
    time.sleep(0.05)
    with open(f, "r+b") as h:
        h.seek(123_456)
        h.write(b"\1")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = file_digest(f, memo)
    assert after != before and after == file_digest(f, None)


def test_a_file_changed_moments_ago_is_not_remembered(tmp_path):
    from regcache.digests import file_digest

    f, memo = tmp_path / "fresh.bin", tmp_path / "memo"
    f.write_bytes(b"a" * 1000)
    file_digest(f, memo)
    assert not memo.exists() or not list(memo.iterdir())  # racy: its clock may not have ticked since


# --------------------------------------------------------------------------- 2: runs record what heads mean

def _probe(root, out, *extra):
    return _cli("probe", "-m", "m", "-f", "cls", "--train", "train", "--test", "test", "--cache", root,
                "--lr", "0.1", "--iterations", "200", "--batch-size", "64", "--out", out, "--no-plots", "-q", *extra)


def _id_top1(run) -> float:
    df = pd.read_parquet(run / "results.parquet")
    return float(df[(df.role == "id") & (df.metric == "top1")].value.iloc[0])


def test_score_maps_labels_through_the_classes_the_heads_were_trained_on(caches, tmp_path):
    from regcache.store import Description

    _probe(caches, tmp_path / "run")
    before = _id_top1(tmp_path / "run")
    assert before > 0.8
    config_ = json.loads((tmp_path / "run" / "config.json").read_text())
    train = next(s for s in config_["sets"] if s["role"] == "train")
    assert train["description"]["classes"] == ["a", "b", "c", "d"]
    # the training shards extracted again under the same name, the classes listed in another order
    FeatureSet(caches / "train").add_name(Description(name="train", role="id-train", classes=["d", "c", "b", "a"]))
    _cli("score", tmp_path / "run", "--out", tmp_path / "score", "-q")
    assert _id_top1(tmp_path / "score") == before


def test_the_heads_file_carries_the_training_classes(caches, tmp_path):
    from safetensors import safe_open

    _probe(caches, tmp_path / "run")
    with safe_open(str(tmp_path / "run" / "heads.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["classes"]) == ["a", "b", "c", "d"]


# --------------------------------------------------------------------------- 3: pipelines see manifest corrections

def test_a_corrected_class_list_reruns_the_probe_it_affects(reg_ckpt, tmp_path):
    from regcache.pipeline import load_pipeline, run_pipeline
    from regcache.shards import write_set

    data = tmp_path / "data"
    for name, role, seed in (("tr", "id-train", 0), ("te", "id-val", 1)):
        items = list(random_images(12, seed=seed, prefix=name))
        write_set(data / name, name, items, len(items), 6, role=role, classes=["x", "y", "z"])
    (tmp_path / "p.yaml").write_text(f"""
name: p
cache: cache
out: out
models: [{{model: {REG}, checkpoint: {reg_ckpt}}}]
datasets: [data/tr/tr.yaml, data/te/te.yaml]
extract: {{size: {SIZE}, resize: {RESIZE}, batch_size: 12, workers: 0}}
probes: [{{name: p, features: [cls], train: tr, test: te, lr: [0.1], iterations: 5, batch_size: 8, plots: false}}]
""")

    def statuses():
        run = run_pipeline(load_pipeline(tmp_path / "p.yaml"), progress=False, echo=lambda s: None)
        return [j.status for j in run.extract], [j.status for j in run.probes]

    assert statuses() == (["ran", "ran"], ["ran"])
    assert statuses() == (["cached", "cached"], ["cached"])
    te = data / "te" / "te.yaml"
    te.write_text(te.read_text().replace('classes: ["x", "y", "z"]', 'classes: ["y", "x", "z"]'))
    assert statuses() == (["cached", "cached"], ["ran"])  # the same rows, another meaning: the probe again
    te.write_text(te.read_text().replace("role: id-val", "role: id-val\nsplit: near-ood"))
    assert statuses() == (["cached", "cached"], ["ran"])


# --------------------------------------------------------------------------- 4: unit files bound to their place

def _two_sets(root):
    """Two sets of one layout and size, of other rows."""
    rng = np.random.default_rng(0)
    return [make_set(root, name, {"cls": rng.normal(size=(40, 4)).astype(np.float32)}, rng.integers(0, 2, 40),
                     classes=["a", "b"], units=2) for name in ("a", "b")]


def test_a_unit_file_from_another_set_or_unit_is_an_error_that_names_it(tmp_path):
    a, b = _two_sets(tmp_path)
    foreign = b.path / "features.zarr" / "cls" / "c" / "1" / "0"
    shutil.copyfile(a.path / "features.zarr" / "cls" / "c" / "1" / "0", foreign)  # same size, valid checksums
    with pytest.raises(StoreError, match=str(foreign)):
        FeatureSet(b.path).load("cls")
    r = _cli("verify", b.path, code=1)
    assert "DAMAGED" in r.output and str(foreign) in r.output

    c, _ = make(tmp_path, "c")
    shutil.copyfile(shard_file(c, "norms", 0), shard_file(c, "norms", 2))  # two units of one set swapped
    with pytest.raises(StoreError, match=str(shard_file(c, "norms", 2))):
        FeatureSet(c.path).load("norms")


def test_a_unit_record_from_another_set_is_an_error_that_names_it(tmp_path):
    a, _ = make(tmp_path, "a", finalize=False)
    b, _ = make(tmp_path, "b", sizes=(30, 30, 30, None), finalize=False)
    for name in ("cls", "reg_all", "norms"):
        dst = shard_file(b, name, 3)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shard_file(a, name, 3), dst)
    shutil.copyfile(a.path / "units" / "000003.parquet", b.path / "units" / "000003.parquet")
    with pytest.raises(StoreError, match="000003.parquet"):
        FeatureSet(b.path).load("cls", allow_incomplete=True)


# --------------------------------------------------------------------------- 5: checksummed tables

def test_no_flipped_bit_of_an_index_loads_a_wrong_pairing(tmp_path):
    from regcache.store.tables import read_table

    fs, _ = make(tmp_path, "small", sizes=(2,), unit_rows=2)
    path = fs.path / "index.parquet"
    good = read_table(path)
    data = path.read_bytes()
    loaded = refused = 0
    for i in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[i // 8] ^= 1 << (i % 8)
        try:
            got = read_table(pa.BufferReader(bytes(flipped)), name=str(path))
        except StoreError:
            refused += 1
            continue
        assert got.equals(good), f"bit {i}: a flipped index loaded other content"
        loaded += 1
    assert refused > len(data) * 4  # most bits matter: they are refused, never misread


def test_a_damaged_index_names_the_repair(tmp_path):
    fs, _ = make(tmp_path, "d")
    path = fs.path / "index.parquet"
    data = path.read_bytes()
    at = data.index(b"u0-k0")  # a key in the first data page
    path.write_bytes(data[:at] + bytes([data[at] ^ 0x04]) + data[at + 1:])
    with pytest.raises(StoreError, match=r"index.parquet.*--finalize"):
        FeatureSet(fs.path).load("cls")


# --------------------------------------------------------------------------- 6: the weights hashed are the weights loaded

def test_a_checkpoint_replaced_between_planning_and_loading_is_refused(reg_ckpt, tmp_path, monkeypatch):
    import regcache.extract.run as run
    from regcache.models import ModelError

    ckpt = tmp_path / "w.safetensors"
    shutil.copyfile(reg_ckpt, ckpt)
    other = make_checkpoint(tmp_path / "other.safetensors", REG, seed=1)
    real = run.load_model

    def swapped(*a, **k):
        shutil.copyfile(other, ckpt)  # after the plan hashed A
        return real(*a, **k)

    monkeypatch.setattr(run, "load_model", swapped)
    shards = tmp_path / "s"
    from conftest import make_shards

    pattern = make_shards(shards, n_shards=1, per_shard=3)
    with pytest.raises(ModelError, match=str(ckpt)):
        extract(config(REG, ckpt, pattern, tmp_path / "c"))
    assert not any((tmp_path / "c").glob("*/*/regcache.json"))  # no set named after A holds B's features


# --------------------------------------------------------------------------- 7: strict YAML

def test_duplicate_keys_are_refused_with_both_lines(tmp_path):
    from regcache.data import DataError, load_manifest
    from regcache.pipeline import PipelineError, load_pipeline, parse_overrides

    p = tmp_path / "p.yaml"
    p.write_text("name: p\nmodels: [vits]\ndatasets: []\nprobes: []\nextract: {size: 28}\nprobes: []\n")
    with pytest.raises(PipelineError, match=r"'probes'.*lines 4 and 6"):
        load_pipeline(p)
    p.write_text("name: p\nmodels: [vits]\ndatasets: []\nextract:\n  size: 28\n  size: 112\n")
    with pytest.raises(PipelineError, match=r"'size'.*lines 5 and 6"):
        load_pipeline(p)
    m = tmp_path / "m.yaml"
    m.write_text("name: m\nshards: s.tar\nclasses: [a, b]\nclasses: [b, a]\n")
    with pytest.raises(DataError, match=r"'classes'.*lines 3 and 4"):
        load_manifest(m)
    with pytest.raises(PipelineError, match="extract.size"):
        parse_overrides(["extract.size=28", "extract.size=112"])
    with pytest.raises(PipelineError, match="'a'"):
        parse_overrides(["probes=[{a: 1, a: 2}]"])


# --------------------------------------------------------------------------- 8: duplicates in list settings

@pytest.mark.parametrize("cls, values, field", [
    ("FewshotSettings", {"seeds": "0,0,0,1,2"}, "seeds"),
    ("FewshotSettings", {"shots": "1,1"}, "shots"),
    ("KnnSettings", {"k": "10,10"}, "k"),
    ("ProbeSettings", {"lr": "0.1,0.1"}, "lr"),
    ("ProbeSettings", {"C": [1, 1.0], "solver": "lbfgs"}, "C"),
    ("ProbeSettings", {"wd": "0,0"}, "wd"),
    ("ProbeSettings", {"features": ["cls", "cls@-1"]}, "features"),
    ("RunSettings", {"pipeline": "p.yaml", "models": "a,a"}, "models"),
])
def test_a_value_listed_twice_is_refused_naming_the_field(cls, values, field):
    import regcache.settings as settings

    base = {"model": "m", "train": "t", "test": "u", "features": ["cls"]} if cls != "RunSettings" else {}
    with pytest.raises(settings.SettingsError, match=rf"{field}.*more than once"):
        getattr(settings, cls).make({**base, **values})


def test_extract_refuses_a_model_named_twice(tmp_path):
    r = _cli("extract", "-m", "vits,vits", "-d", tmp_path / "x.tar", code=2)
    assert "vits" in r.output and "more than once" in r.output


def test_two_names_of_one_backbone_in_a_pass_run_one_forward(reg_ckpt, tmp_path, monkeypatch):
    import regcache.extract.passes as passes
    from conftest import make_shards

    calls = []
    real = passes.token_features
    monkeypatch.setattr(passes, "token_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    pattern = make_shards(tmp_path / "s", n_shards=1, per_shard=4)
    a = config(REG, reg_ckpt, pattern, tmp_path / "c", batch_size=4)
    b = config(REG + ".lvd142m", reg_ckpt, pattern, tmp_path / "c", batch_size=4)
    ra, rb = extract_many([a, b])
    assert ra.path == rb.path and ra.complete and len(calls) == 1


# --------------------------------------------------------------------------- failures name their place

def test_a_full_disk_while_extracting_names_the_file_and_leaves_no_temporaries(reg_ckpt, tmp_path, monkeypatch):
    import regcache.store.writer as writer
    from conftest import make_shards

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    pattern = make_shards(tmp_path / "s", n_shards=1, per_shard=2)
    args = ["extract", "-m", REG, "--checkpoint", str(reg_ckpt), "-d", pattern, "--cache", str(tmp_path / "c"),
            "--size", str(SIZE), "--resize", str(RESIZE), "-j", "0", "-q"]
    monkeypatch.setattr(writer.os, "fsync", full)  # full from the start: no half-made set
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "regcache.json: No space left on device" in r.output, r.output
    assert not list((tmp_path / "c").rglob("regcache.json")) and not list((tmp_path / "c").rglob("*.tmp"))
    synced = []
    monkeypatch.setattr(writer.os, "fsync", lambda fd: full() if synced else synced.append(fd))  # full after that
    monkeypatch.setattr(writer.UnitWriter, "_write_unit", full)
    r = CliRunner().invoke(main, args)
    monkeypatch.undo()
    assert r.exit_code == 1
    assert "No space left on device" in r.output and "units/" in r.output and "part-000.tar" in r.output, r.output
    assert not list((tmp_path / "c").rglob("*.tmp"))


def test_a_full_disk_while_writing_a_run_leaves_no_run_folder(caches, tmp_path, monkeypatch):
    import safetensors.torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    r = CliRunner().invoke(main, ["probe", "-m", "m", "-f", "cls", "--train", "train", "--test", "test", "--cache",
                                  str(caches), "--lr", "0.1", "--iterations", "5", "--out", str(tmp_path / "run"),
                                  "--no-plots", "-q"])
    assert r.exit_code == 1 and "heads.safetensors" in r.output and "No space" in r.output
    assert not (tmp_path / "run").exists() and not list(tmp_path.glob(".run*"))


def test_a_scorer_that_cannot_score_is_reported_by_name_and_the_others_run(tmp_path):
    root = tmp_path / "cache"
    rng = np.random.default_rng(0)
    classes = ["a", "b"]
    const = {"cls": np.ones((40, 4), np.float32)}
    make_set(root, "train", const, rng.integers(0, 2, 40), classes=classes, role="id-train")
    make_set(root, "test", {"cls": np.ones((20, 4), np.float32)}, rng.integers(0, 2, 20), classes=classes,
             role="id-val")
    make_set(root, "odd", {"cls": rng.normal(size=(20, 4)).astype(np.float32)}, -np.ones(20, int), role="anomaly")
    r = _cli("probe", "-m", "m", "-f", "cls", "--train", "train", "--test", "test", "--anomaly", "odd", "--cache",
             root, "--lr", "0.1", "--iterations", "5", "--scorers", "msp,fdbd,nci,vim", "--out", tmp_path / "run",
             "--no-plots", "-q")
    df = pd.read_parquet(tmp_path / "run" / "results.parquet")
    msp = df[(df.scorer == "msp") & (df.metric == "auroc") & (df.set == "odd")]
    assert len(msp) == 1 and np.isfinite(msp.value.iloc[0])
    for scorer in ("nci", "vim"):  # NaN scores (nci), nothing to fit (vim): skipped, by name
        rows = df[df.scorer == scorer]
        assert len(rows) == 2 * 7 and rows.value.isna().all(), scorer  # the set and the mean, every metric
        assert rows.note.str.contains(f"skipped: {scorer} on \\[cls\\]").all(), rows.note
        assert f"{scorer} on [cls]" in r.output  # results.md says why its cells are empty
    assert df[df.scorer == "fdbd"].value.notna().all()  # it can score: it runs
    assert "dim=0 or less" not in r.output


def test_a_failed_model_in_a_pass_leaves_no_empty_set(reg_ckpt, noreg_ckpt, tmp_path):
    from conftest import NOREG, make_shards

    pattern = make_shards(tmp_path / "s", n_shards=1, per_shard=2)
    good = config(REG, reg_ckpt, pattern, tmp_path / "c")
    bad = config(NOREG, reg_ckpt, pattern, tmp_path / "c")  # register weights do not fit: it cannot load
    rg, rb = extract_many([good, bad])
    assert rg.complete and rb.error
    assert [p.parent.name for p in (tmp_path / "c").glob("*/*/regcache.json")] == [rg.path.name]


def test_smaller_edges(caches, tmp_path):
    from regcache.settings import ProbeSettings

    _probe(caches, tmp_path / "run")
    r = _cli("score", tmp_path / "run", "--out", tmp_path / "score", "-q")
    assert "Accuracy" in r.output
    s = ProbeSettings.make({"model": "m", "train": "t", "test": "u", "preset": "dinov3-logreg", "refit": False})
    assert not s.refit
    r = CliRunner().invoke(main, ["probe", "--help"])
    assert "--no-refit" in r.output
    r = _cli("ls", "--cache", caches, "--json")
    row = json.loads(r.output.splitlines()[0])
    assert isinstance(row["dataset"], list) and isinstance(row["features"], list)


# --------------------------------------------------------------------------- found by a hostile pass on the above

def test_adoption_never_copies_a_damaged_unit(reg_ckpt, tmp_path):
    from conftest import make_shards

    pattern = make_shards(tmp_path / "s", n_shards=2, per_shard=3)
    first = extract(config(REG, reg_ckpt, pattern, tmp_path / "c"))
    for f in FeatureSet(first.path).features:  # unit 1's files replaced by unit 0's: valid chunks, foreign rows
        d = first.path / "features.zarr" / f / "c"
        shutil.copyfile(d / "0" / "0", d / "1" / "0")
    with open(tmp_path / "s" / "part-000.tar", "ab") as fh:  # another shard 0: a new set, adopting unit 1
        fh.write(bytes(1024))
    again = extract(config(REG, reg_ckpt, pattern, tmp_path / "c"))
    assert again.units_adopted == 0 and again.units_done == 2
    assert not _cli("verify", again.path).exit_code


def test_tables_and_records_are_bound_to_their_set(tmp_path):
    a, b = _two_sets(tmp_path)
    shutil.copyfile(b.path / "index.parquet", a.path / "index.parquet")  # the same row count
    with pytest.raises(StoreError, match="index.parquet: is the table of set"):
        FeatureSet(a.path).load("cls")
    meta = json.loads((b.path / "regcache.json").read_text())
    meta["identity"]["size"] = 5  # one edited value of the identity: the set would pass for other settings
    (b.path / "regcache.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="does not hash to its fingerprint"):
        FeatureSet(b.path)


def test_a_set_named_twice_or_an_id_set_as_anomaly_is_refused(caches, tmp_path):
    base = ["probe", "-m", "m", "-f", "cls", "--train", "train", "--test", "test", "--cache", caches, "--lr", "0.1",
            "--iterations", "5", "-q"]
    r = _cli(*base, "--anomaly", f"far,{caches / 'far'}", code=1)  # a name and a path of one set
    assert "name the same set" in r.output
    r = _cli(*base, "--anomaly", "far,test", code=1)
    assert "holds images of the test set" in r.output


def test_name_files_of_names_that_share_a_slug_stay_apart(tmp_path):
    from regcache.store import Description

    a, _ = _two_sets(tmp_path)
    a.add_name(Description(name="my data", classes=["b", "a"]))
    a.add_name(Description(name="my_data", classes=["x", "y"]))
    a.add_name(Description(name="my data", classes=["a", "b"]))
    names = FeatureSet(a.path).names()
    assert names["my data"].classes == ["a", "b"] and names["my_data"].classes == ["x", "y"]


def test_a_file_url_shard_is_hashed_as_a_local_file(tmp_path):
    from regcache.data import shard_id

    f = tmp_path / "x.tar"
    f.write_bytes(b"abc")
    assert shard_id(f"file://{f}").digest == shard_id(str(f)).digest and shard_id(str(f)).digest.startswith("sha256:")


def test_claims_and_digests_leave_nothing_on_a_full_disk(tmp_path, monkeypatch):
    import regcache.digests as digests
    from regcache.store import Claims

    units = tmp_path / "units"
    units.mkdir()
    empty = units / "000001.claim"
    empty.write_text("")  # a writer that died between creating its claim and writing it
    old = time.time() - 60
    os.utime(empty, (old, old))
    assert Claims(units).take(1)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(digests.Path, "write_text", full)
    f = tmp_path / "w.bin"
    f.write_bytes(b"w" * 100)
    os.utime(f, (old, old))
    monkeypatch.setattr(digests, "_now", lambda: time.time() + 3600)
    assert digests.file_digest(f, tmp_path / "memo").startswith("sha256:")
    assert not list((tmp_path / "memo").glob(".*"))


def test_list_settings_refuse_a_repeat_in_any_spelling(caches, tmp_path):
    from regcache.pipeline import PipelineError, parse_overrides
    from regcache import yamlio

    r = _cli("probe", "-m", "m", "-f", "cls,reg", "-f", "reg,cls", "--train", "train", "--cache", caches, code=2)
    assert "one combination in two orders" in r.output
    r = _cli("probe", "-m", "m", "-f", "cls", "--train", "train", "--cache", caches, "--scorers", "msp,msp", code=2)
    assert "msp given more than once" in r.output
    r = _cli("probe", "-m", "m", "-f", "cls", "--train", "train", "--cache", caches, "--scorer-arg",
             "react.percentile=0.5", "--scorer-arg", "react.percentile=0.9", code=2)
    assert "given more than once" in r.output
    _probe(caches, tmp_path / "run")
    r = _cli("report", tmp_path / "run", f"{tmp_path}/./run", code=2)
    assert "more than once" in r.output
    with pytest.raises(yamlio.DuplicateKey, match="merge"):
        yamlio.load("a: &a {x: 1}\nb: &b {y: 2}\nc:\n  <<: *a\n  <<: *b\n")
    p = tmp_path / "p.yaml"
    p.write_text("name: p\nmodels: [vits]\ndatasets: [m.yaml]\nprobes: [{name: q, lr: [0.1]}]\n")
    from regcache.pipeline import load_pipeline
    with pytest.raises(PipelineError, match="set the same field"):
        load_pipeline(p, parse_overrides(["probes.q.lr=[0.2]", "probes.0.lr=[0.3]"]))


def test_two_backbones_of_one_name_are_two_models_of_a_pass(reg_ckpt, tmp_path):
    from conftest import make_shards

    other = make_checkpoint(tmp_path / "other.safetensors", REG, seed=1)
    pattern = make_shards(tmp_path / "s", n_shards=1, per_shard=2)
    r = _cli("extract", "-m", f"{REG},{REG}", "--checkpoint", f"{reg_ckpt},{other}", "-d", pattern, "--cache",
             tmp_path / "c", "--size", SIZE, "--resize", RESIZE, "-j", "0", "-q")
    assert r.output.count("done:") == 2
    r = _cli("extract", "-m", f"{REG},{REG}", "--checkpoint", f"{reg_ckpt},{reg_ckpt}", "-d", pattern, "--cache",
             tmp_path / "c", "--size", SIZE, "--resize", RESIZE, "-j", "0", "-q", code=2)
    assert "more than once with the same options" in r.output


def test_a_run_names_its_sets_by_absolute_path_and_a_killed_publish_is_cleaned_up(caches, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c").symlink_to(caches)
    r = CliRunner().invoke(main, ["probe", "-m", "m", "-f", "cls", "--train", "train", "--test", "test", "--cache",
                                  "c", "--lr", "0.1", "--iterations", "20", "--out", "run", "--no-plots", "-q"])
    assert r.exit_code == 0, r.output
    assert all(os.path.isabs(s["path"]) for s in json.loads((tmp_path / "run" / "config.json").read_text())["sets"])
    (tmp_path / ".run2.partial-999999999").mkdir()  # a killed run's folder (no such process)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    _cli("score", "../run", "--out", "../run2", "-q")
    assert not list(tmp_path.glob(".*.partial-*"))
