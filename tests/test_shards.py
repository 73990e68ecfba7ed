"""Getting data in: folders to shards and back, manifests and their errors, the demo sets."""
from __future__ import annotations

import hashlib
import tarfile

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from regcache.cli import main
from regcache.data import DataError, expand_shards, load_manifest
from regcache.extract import UnitStream
from regcache.shards import from_folder, scan_manifest, set_counts


def tree(root, classes=("cat", "dog", "eel"), per_class=(3, 1, 2)):
    """An ImageFolder tree with PNG and JPEG files; returns {relative path without suffix: class}."""
    rng = np.random.default_rng(0)
    made = {}
    for c, n in zip(classes, per_class):
        for i in range(n):
            ext = ".png" if i % 2 else ".JPEG"
            name = f"{c}.{i}{ext}" if i == 0 else f"img {i}{ext}"  # a dot and a space in names
            p = root / c / name
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(p)
            made[f"{c}/{p.stem}"] = c
    (root / "cat" / "notes.txt").write_text("not an image")
    return made


def read_tars(paths):
    """(key, label or None, extensions) of every sample, straight from the tar files."""
    out = {}
    for p in paths:
        with tarfile.open(p) as t:
            for m in t:
                key, ext = m.name.split(".", 1)
                entry = out.setdefault(key, {"exts": set(), "label": None})
                entry["exts"].add(ext)
                if ext == "cls":
                    entry["label"] = int(t.extractfile(m).read())
    return out


def digest(paths):
    return [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in sorted(paths)]


def test_folder_to_shards_to_scan_round_trip(tmp_path):
    made = tree(tmp_path / "src")
    m = from_folder(tmp_path / "src", tmp_path / "out", "toy", per_shard=4, role="id-train")
    tars = sorted((tmp_path / "out").glob("toy-*.tar"))
    assert [t.name for t in tars] == ["toy-000000.tar", "toy-000001.tar"]
    got = read_tars(tars)
    classes = sorted(set(made.values()))
    expected_keys = {k.replace(".", "_").replace(" ", "_"): classes.index(c) for k, c in made.items()}
    assert {k: v["label"] for k, v in got.items()} == expected_keys
    assert all(len(v["exts"]) == 2 for v in got.values())  # one image + cls, nothing else

    ds = load_manifest(m)
    assert ds.classes == tuple(classes) and ds.counts == (4, 2) and ds.role == "id-train"
    scan = scan_manifest(m)
    assert scan.counts == [4, 2] and not any(s.failures for s in scan.shards)
    assert sum(sum(s.labels.values()) for s in scan.shards) == len(made)
    assert set().union(*(s.formats for s in scan.shards)) == {"png", "jpeg"}
    # the same stream extraction uses gives the same keys and labels
    from regcache.models import Preprocess

    stream = UnitStream(ds, [0, 1], [Preprocess(size=8, resize=8)], batch_size=100)
    seen = {k: y for b in stream if not b.end for k, y in zip(b.keys, b.labels)}
    assert seen == expected_keys

    before = digest(tars)
    from_folder(tmp_path / "src", tmp_path / "out", "toy", per_shard=4, role="id-train")  # idempotent
    for t in tars:
        t.unlink()
    from_folder(tmp_path / "src", tmp_path / "out", "toy", per_shard=4, role="id-train")  # rebuilt: same bytes
    assert digest(tars) == before
    with pytest.raises(DataError, match="different content"):
        from_folder(tmp_path / "src", tmp_path / "out", "toy", per_shard=3, role="id-train")
    assert digest(tars) == before and not (tmp_path / "out" / "toy-000002.tar").exists()  # nothing touched


def test_flat_folders_and_class_subsets(tmp_path):
    tree(tmp_path / "src")
    m = from_folder(tmp_path / "src", tmp_path / "flat", "anom", flat=True)
    ds = load_manifest(m)
    assert ds.role == "anomaly" and ds.label_key is None and ds.classes is None
    assert all(v["label"] is None for v in read_tars(ds.shards).values())
    m = from_folder(tmp_path / "src", tmp_path / "sub", "part", classes=["ant", "cat", "dog", "eel", "fox"],
                    role="ood-gen")
    ds = load_manifest(m)
    assert ds.subset == ("cat", "dog", "eel") and len(ds.classes) == 5
    assert {v["label"] for v in read_tars(ds.shards).values()} == {1, 2, 3}  # indices in the full list


def test_cli_from_folder_then_scan(tmp_path):
    tree(tmp_path / "src")
    r = CliRunner().invoke(main, ["shards", "from-folder", str(tmp_path / "src"), str(tmp_path / "o"), "--name", "t"])
    assert r.exit_code == 0, r.output
    m = tmp_path / "o" / "t.yaml"
    m.write_text(m.read_text().replace("counts: [6]\n", "# a comment that must survive\n"))
    r = CliRunner().invoke(main, ["manifest", "scan", str(m)])
    assert r.exit_code == 0, r.output
    assert "6 samples, 0 undecodable" in r.output and "3 classes" in r.output
    assert "counts: [6]" in m.read_text() and "# a comment that must survive" in m.read_text()
    assert (tmp_path / "o" / "t.scan.json").is_file()


def test_set_counts_replaces_block_and_flow_lists():
    assert set_counts("name: a\ncounts:\n  - 1\n  - 2\nrole: anomaly\n", [3, 4]) == \
        "name: a\ncounts: [3, 4]\nrole: anomaly\n"
    assert set_counts("name: a\n", [5]) == "name: a\ncounts: [5]\n"


@pytest.mark.parametrize("body,message", [
    ("shards: a.tar\n", "missing field 'name'"),
    ("name: x\nshards: a.tar\ncounts: '5'\n", "field 'counts' must be list, got str"),
    ("name: x\nshards: a-{0..1}.tar\ncounts: [5]\n", "one non-negative integer per shard (2)"),
    ("name: x\nshards: a.tar\nrole: test\n", "field 'role' is 'test'; one of id-train"),
    ("name: x\nshards: a.tar\nclasses: [a, b]\nsubset: [a, z]\n", "outside the ID classes: z"),
    ("name: x\nshards: ${REGCACHE_TEST_UNSET}/a.tar\n", "${REGCACHE_TEST_UNSET} is not set"),
    ("name: x\nshards: a.tar\ncolour: red\n", "unknown field(s) colour"),
    ("name: [x\n", "not valid YAML"),
    ("name: x\nshards: a.tar\nclasses_file: nope.txt\n", "nope.txt does not exist"),
])
def test_malformed_manifests_name_the_field_and_the_file(tmp_path, body, message, monkeypatch):
    monkeypatch.delenv("REGCACHE_TEST_UNSET", raising=False)
    p = tmp_path / "bad.yaml"
    p.write_text(body)
    with pytest.raises(DataError) as e:
        load_manifest(p)
    assert str(p) in str(e.value) and message in str(e.value)


def test_brace_patterns_variables_and_relative_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", "/data")
    assert expand_shards("${DATA_ROOT}/t-{00..02}.tar") == ("/data/t-00.tar", "/data/t-01.tar", "/data/t-02.tar")
    assert expand_shards(["a-{0..1}.tar", "b.tar"]) == ("a-0.tar", "a-1.tar", "b.tar")
    (tmp_path / "m.yaml").write_text("name: x\nshards: ['sub/s-{0..1}.tar', '/abs/s.tar', 'pipe:cat x.tar']\n")
    assert load_manifest(tmp_path / "m.yaml").shards == (str(tmp_path / "sub/s-0.tar"), str(tmp_path / "sub/s-1.tar"),
                                                         "/abs/s.tar", "pipe:cat x.tar")


def test_the_data_identity_is_the_shards_bytes_not_how_they_are_named(tmp_path):
    """Counts, the dataset's name, the manifest's folder, and a pattern instead of a manifest leave it as it is;
    other bytes, another shard, or other image or label members change it."""
    from regcache.data import load_dataset, shard_ids
    from regcache.shards import write_shards

    from conftest import random_images

    write_shards(random_images(6), str(tmp_path / "s-%d.tar"), 3)
    (tmp_path / "sub").mkdir()
    texts = {"a": "name: x\nshards: s-{0..1}.tar\n", "b": "# scanned\nname: y\nshards: s-{0..1}.tar\ncounts: [3, 3]\n",
             "c": "name: x\nshards: s-0.tar\n", "d": "name: x\nshards: s-{0..1}.tar\nimage: png\n",
             "e": "name: x\nshards: s-{0..1}.tar\nlabel: json:y\n", "f": "name: x\nshards: ../s-{0..1}.tar\n"}
    for n, text in texts.items():
        (tmp_path / ("sub" if n == "f" else ".") / f"{n}.yaml").write_text(text)

    def content(ds):
        return ds.content_id(shard_ids(ds))

    ids = {n: content(load_manifest(tmp_path / ("sub" if n == "f" else ".") / f"{n}.yaml")) for n in texts}
    pattern = content(load_dataset(str(tmp_path / "s-{0..1}.tar"), name="z", labels="cls"))
    assert ids["a"] == ids["b"] == ids["f"] == pattern
    assert len({ids["a"], ids["c"], ids["d"], ids["e"]}) == 4
    write_shards(random_images(6, seed=1), str(tmp_path / "s-%d.tar"), 3)  # the same names, other images
    assert content(load_manifest(tmp_path / "a.yaml")) != ids["a"]


def test_paper_manifests_are_valid(monkeypatch):
    from pathlib import Path

    monkeypatch.setenv("REGCACHE_DATA", "/data")
    root = Path(__file__).resolve().parents[1] / "manifests"
    sets = {p.stem: load_manifest(p) for p in root.glob("*.yaml")}
    openood = {"ssb-hard", "ninco", "inaturalist", "textures", "openimage-o", "openimage-o-val", "imagenet-v2",
               "imagenet-c", "imagenet-es"}  # OpenOOD v1.5's ImageNet-1k benchmark (with imagenet-r)
    assert set(sets) == {"imagenet1k-train", "imagenet1k-val", "imagenet-a", "imagenet-r", "imagenet-sketch", "dtd",
                         "svhn", "places365", "lsun", "lsun-resize", "isun", "imagenet1k-val-1k"} | openood
    splits = {n: sets[n].split for n in openood}
    assert {n for n, s in splits.items() if s == "near-ood"} == {"ssb-hard", "ninco"}
    assert {n for n, s in splits.items() if s == "far-ood"} == {"inaturalist", "textures", "openimage-o"}
    assert all(sets[n].role == "ood-gen" and len(sets[n].classes) == 1000
               for n, s in splits.items() if s == "covariate-shift")
    assert all(ds.name == name for name, ds in sets.items())
    assert len(sets["imagenet1k-train"].classes) == 1000 and len(sets["imagenet-a"].subset) == 200
    assert len(sets["imagenet-r"].subset) == 200 and set(sets["imagenet-r"].subset) <= set(sets["imagenet-r"].classes)
    roles = {n: ds.role for n, ds in sets.items()}
    assert roles["imagenet-sketch"] == "ood-gen" and roles["isun"] == "anomaly" and roles["imagenet1k-val"] == "id-val"
    assert sets["imagenet1k-train"].shards[-1] == "/data/imagenet1k-train/imagenet1k-train-001281.tar"


def test_tiny_demo_sets_are_built_idempotently_and_checked(tmp_path, demo_sources):
    from regcache import demo

    sizes = demo.DemoSizes(train_per_class=2, val_per_class=1, shift_per_class=1, anomalies=3)
    manifests = demo.build(tmp_path, demo_sources, sizes, per_shard=8)
    first = {n: digest(load_manifest(m).shards) for n, m in manifests.items()}
    assert demo.build(tmp_path, demo_sources, sizes, per_shard=8) == manifests
    assert {n: digest(load_manifest(m).shards) for n, m in manifests.items()} == first
    scans = {n: scan_manifest(m, write=False) for n, m in manifests.items()}
    n = {k: sum(s.count for s in v.shards) for k, v in scans.items()}
    assert n == {"fmnist-train": 20, "fmnist-val": 10, "fmnist-sketch": 10, "fmnist-invert": 5,
                 "mnist": 3, "animals": 3, "textures": 3}
    assert all(not s.failures for v in scans.values() for s in v.shards)
    labels = {k: set().union(*(s.labels for s in v.shards)) for k, v in scans.items()}
    assert labels["fmnist-train"] == set(range(10)) and labels["fmnist-invert"] == set(demo.SUBSET)
    assert labels["mnist"] == {-1}
    inv = load_manifest(manifests["fmnist-invert"])
    assert inv.subset == tuple(demo.FASHION_CLASSES[c] for c in demo.SUBSET) and inv.role == "ood-gen"
    # a different set under the same name is refused, never overwritten
    with pytest.raises(DataError, match="different"):
        demo.build(tmp_path, demo_sources, demo.DemoSizes(3, 1, 1, 3), per_shard=8)
