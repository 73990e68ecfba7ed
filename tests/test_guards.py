"""Guards found by a hostile-user pass: inputs that trained nothing, read other data, or lost a sample, and
still reported a number. Each test reproduces one and expects a refusal that names the problem."""
from __future__ import annotations

import pytest

from regcache.probe import ProbeError
from regcache.settings import ProbeSettings, SettingsError


@pytest.mark.parametrize("bad", [
    {"iterations": 0}, {"iterations": -5}, {"lr": ()}, {"lr": (-1.0,)}, {"wd": (-1.0,)}, {"batch_size": 0},
    {"val_fraction": 0.99}, {"val_fraction": 0.0}, {"stream_window": 0}, {"momentum": 1.0},
])
def test_settings_that_train_nothing_or_backwards_are_refused(bad):
    (field,) = bad
    with pytest.raises(SettingsError, match=rf"^probe\.{field}"):
        ProbeSettings.make({"model": "m", "train": "t", "features": ["cls"], **bad}, where="probe")
    ProbeSettings.make(model="m", train="t", features=["cls"])  # the defaults pass


# --------------------------------------------------------------------------- sets that share images

@pytest.fixture(scope="module")
def sets(tmp_path_factory, reg_ckpt):
    """train, val (other images), val-again (val's shards under another name), in one cache."""
    from conftest import REG, config, make_shards
    from regcache.extract import extract

    root = tmp_path_factory.mktemp("guards")
    train = make_shards(root / "train", n_shards=2, per_shard=6, seed=1)
    val = make_shards(root / "val", n_shards=1, per_shard=6, seed=2)
    for name, data in (("train", train), ("val", val), ("val-again", val)):
        extract(config(REG, reg_ckpt, data, root / "cache", name=name))
    return root


def _probe(root, *args):
    from click.testing import CliRunner

    from conftest import REG
    from regcache.cli import main

    return CliRunner().invoke(main, ["probe", "-m", REG, "-f", "cls", "--cache", str(root / "cache"), "-q",
                                     "--iterations", "5", "--batch-size", "4", "--allow-random-init", "--no-plots",
                                     "--out", str(root / "runs" / "_".join(a.strip("-") for a in args)), *args])


@pytest.mark.parametrize("args, says", [
    (["--train", "train", "--test", "train"], "same shards as the train set"),
    (["--train", "train", "--val", "train"], "same shards as the train set"),  # ID numbers default to val
    # the same shards under another name are one set (its rows carry both names): refused as the val set itself
    (["--train", "train", "--val", "val", "--test", "val-again", "--lr", "0.1,0.01"], "must not also give the ID"),
    (["--train", "train", "--val", "val", "--refit"], "name one as test (--test)"),  # refused as the options are read
])
def test_a_test_set_of_images_that_trained_or_selected_the_heads_is_refused(sets, args, says):
    r = _probe(sets, *args)
    assert r.exit_code == (2 if "--refit" in args else 1) and says in r.output, r.output


def test_one_head_on_a_renamed_copy_of_val_is_allowed(sets):
    r = _probe(sets, "--train", "train", "--val", "val", "--test", "val-again")  # nothing is selected
    assert r.exit_code == 0, r.output


def test_score_and_report_refuse_a_set_extracted_again_from_other_images(sets, reg_ckpt, tmp_path):
    """The same dataset name and settings over other images keeps its fingerprint, not its content id."""
    import shutil

    from click.testing import CliRunner

    from conftest import REG, config, make_shards
    from regcache.cli import main
    from regcache.extract import extract

    root = tmp_path / "r"
    shutil.copytree(sets / "cache", root / "cache")
    v = make_shards(tmp_path / "v", n_shards=1, per_shard=6, seed=2)
    first = extract(config(REG, reg_ckpt, v, root / "cache", name="v"))
    assert _probe(root, "--train", "train", "--test", "v").exit_code == 0
    (run,) = (root / "runs").iterdir()
    shutil.copytree(run, tmp_path / "before")
    shutil.rmtree(first.path)  # the shards regenerated with other images, and the set extracted again
    make_shards(tmp_path / "v", n_shards=1, per_shard=6, seed=9)
    again = extract(config(REG, reg_ckpt, v, root / "cache", name="v"))
    assert again.fingerprint != first.fingerprint  # the identity is the shards' bytes, not their names
    r = CliRunner().invoke(main, ["score", str(run), "--cache", str(root / "cache")])
    assert r.exit_code == 1 and "extracted again" in r.output, r.output
    assert _probe(root, "--train", "train", "--test", "v", "--seed", "1").exit_code == 0
    after = next(p for p in (root / "runs").iterdir() if p != run)
    r = CliRunner().invoke(main, ["report", str(tmp_path / "before"), str(after), "--out", str(tmp_path / "rep")])
    assert r.exit_code != 0 and "holds other images" in r.output, r.output


def test_report_checks_a_score_output_against_the_runs_it_is_merged_with(sets, reg_ckpt, tmp_path):
    """score wrote no run record, so report merged its anomaly set with another run's set of the same name over
    other images, one column, no word (found by a hostile pass); a bare results file is merged with a note."""
    import shutil

    from click.testing import CliRunner

    from conftest import REG, config, make_shards
    from regcache.cli import main
    from regcache.extract import extract

    root = tmp_path / "r"
    shutil.copytree(sets / "cache", root / "cache")
    extract(config(REG, reg_ckpt, make_shards(tmp_path / "w1", n_shards=1, per_shard=6, seed=3), root / "cache",
                   name="w", role="anomaly"))
    assert _probe(root, "--train", "train", "--test", "val", "--anomaly", "w").exit_code == 0
    (run,) = (root / "runs").iterdir()
    w2 = extract(config(REG, reg_ckpt, make_shards(tmp_path / "w2", n_shards=1, per_shard=5, seed=4), root / "cache",
                        name="w", role="anomaly"))
    r = CliRunner().invoke(main, ["score", str(run), "--anomaly", str(w2.path), "--cache", str(root / "cache"),
                                  "--out", str(tmp_path / "scored")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["report", str(run), str(tmp_path / "scored")])
    assert r.exit_code == 1 and "holds other images" in r.output, r.output
    (tmp_path / "bare").mkdir()
    shutil.copy(tmp_path / "scored" / "results.parquet", tmp_path / "bare" / "results.parquet")
    r = CliRunner().invoke(main, ["report", str(run), str(tmp_path / "bare")])
    assert r.exit_code == 0 and "Not checked: " + str(tmp_path / "bare") in r.output and "n=5 or 6" in r.output, \
        r.output


# --------------------------------------------------------------------------- inputs refused up front

def test_a_class_named_twice_is_refused_in_the_manifest_and_in_the_probe(tmp_path):
    from regcache.data import DataError, load_manifest
    from regcache.probe import map_labels

    m = tmp_path / "dup.yaml"
    m.write_text("name: dup\nshards: x-000.tar\nclasses: [cat, dog, cat]\n")
    with pytest.raises(DataError, match="cat more than once"):
        load_manifest(m)
    (tmp_path / "c.txt").write_text("cat\ndog\ncat\n")
    m.write_text("name: dup\nshards: x-000.tar\nclasses_file: c.txt\n")
    with pytest.raises(DataError, match="cat more than once"):
        load_manifest(m)

    class Stored:  # a store written before the manifest check: the probe refuses it too
        path = tmp_path

    import numpy as np

    from regcache.probe import Split
    from regcache.sets import Named
    from regcache.store import Description

    with pytest.raises(ProbeError, match="more than once"):
        map_labels(Split("dup", {}, np.array([0, 1]), np.array(["a", "b"]), np.zeros(2, int)),
                   Named(Stored(), Description(name="dup", classes=["cat", "dog", "cat"])), ["cat", "dog"], 2)


def test_from_folder_refuses_two_files_that_would_be_one_sample(tmp_path):
    import numpy as np
    from PIL import Image

    from regcache.data import DataError
    from regcache.shards import plan_folder

    (tmp_path / "src" / "a").mkdir(parents=True)
    for name in ("x.png", "x.jpg", "y.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "src" / "a" / name)
    with pytest.raises(DataError, match="would both be sample 'a/x'"):
        plan_folder(tmp_path / "src")


@pytest.mark.parametrize("args, says", [
    (["-b", "0"], "--batch-size"), (["--size", "0"], "--size"), (["--num-parts", "0"], "--num-parts"),
    (["--std", "0,0,0"], "--std[0]: Input should be greater than 0"), (["--model-arg", "depth=x"], "cannot be built with the model"),
])
def test_extract_refuses_bad_settings_by_name_without_a_traceback(tmp_path, reg_ckpt, args, says):
    from click.testing import CliRunner

    from conftest import REG, make_shards
    from regcache.cli import main

    data = make_shards(tmp_path / "s", n_shards=1, per_shard=2)
    r = CliRunner().invoke(main, ["extract", "-m", REG, "--checkpoint", str(reg_ckpt), "-d", data, "--cache",
                                  str(tmp_path / "c"), "-q", "-j", "0", *args])
    assert r.exit_code in (1, 2) and says in r.output and "Traceback" not in r.output, r.output


def test_two_probes_in_the_same_second_get_their_own_run_directories(tmp_path, monkeypatch):
    from regcache.rundir import new_dir

    monkeypatch.chdir(tmp_path)
    first, second = new_dir(tmp_path / "runs" / "m-1"), new_dir(tmp_path / "runs" / "m-1")
    assert first != second and first.is_dir() and second.name == "m-1-2"


# --------------------------------------------------------------------------- found in review

def test_knn_refuses_to_classify_its_own_training_images(sets):
    from click.testing import CliRunner

    from conftest import REG
    from regcache.cli import main

    r = CliRunner().invoke(main, ["knn", "-m", REG, "-f", "cls", "--train", "train", "--test", "train", "--cache",
                                  str(sets / "cache")])
    assert r.exit_code != 0 and "same shards as the train set" in r.output, r.output


def test_sets_with_and_without_test_time_registers_never_mix():
    from regcache.probe.data import check_compatible

    class Stored:
        def __init__(self, path, **extra):
            self.path, self.identity = path, {"model": "m", "checkpoint": "w", "size": 4, **extra}

    check_compatible([("train", Stored("a", views=4)), ("dtd", Stored("b", features=["cls"]))])  # rows may differ
    with pytest.raises(ProbeError, match="test_time_registers"):
        check_compatible([("train", Stored("a", test_time_registers={"digest": "d", "k": 1})), ("dtd", Stored("b"))])
    with pytest.raises(ProbeError, match="pos_embed"):
        check_compatible([("train", Stored("a", pos_embed="dinov2")), ("dtd", Stored("b", pos_embed="timm"))])


def test_remote_shards_count_as_the_same_images_by_url(tmp_path):
    """Remote shards have no byte digest: their URLs stand for them, so train and test are still kept apart."""
    import numpy as np

    from conftest import make_set
    from regcache.probe.sets import RunSets, check_apart
    from regcache.sets import Named

    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    a = make_set(tmp_path / "c1", "val", {"cls": x}, np.arange(8) % 2)
    b = make_set(tmp_path / "c2", "val", {"cls": x}, np.arange(8) % 2)
    with pytest.raises(ProbeError, match="same shards as the train set"):
        check_apart(RunSets(Named.of(a), test=Named.of(b)), selected=False)


def test_test_time_registers_refuse_gated_mlps():
    from timm.layers import SwiGLU
    from timm.models.vision_transformer import VisionTransformer

    from regcache.registers import RegisterError, _check_model

    model = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_layer=SwiGLU)
    with pytest.raises(RegisterError, match="gated MLP"):
        _check_model(model)
    _check_model(VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2))


def test_random_weights_are_named_so_in_listings(tmp_path):
    """A set of timm's random weights was listed (and reported) under the hub model's bare name."""
    from conftest import NOREG, RESIZE, SIZE, make_shards
    from regcache.extract import extract
    from regcache.housekeeping import listing
    from regcache.settings import ExtractSettings

    data = make_shards(tmp_path / "s", n_shards=1, per_shard=3)
    extract(ExtractSettings.make({"model": NOREG, "random_init": 7, "model_args": {"depth": 1}, "data": data,
                                  "cache": tmp_path / "c", "size": SIZE, "resize": RESIZE, "workers": 0, "quiet": True}))
    (row,) = listing(tmp_path / "c")
    assert row["label"] == f"{NOREG} (random-init 7)" and row["model"] == NOREG
