"""Issue 15: what a new user meets first (a checkpoint with its classifier, random weights, worker count,
empty sets, install warnings, progress output in logs)."""
from __future__ import annotations

import logging

import pytest
import torch

from regcache.models import ModelError, load_model
from regcache.settings import Backbone, SettingsError

DEIT = "deit_tiny_distilled_patch16_224"


def _save(sd: dict, path) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


# --------------------------------------------------------------------------- 1: a checkpoint with its classifier

def test_checkpoint_with_classifier_loads_as_timm_does(tmp_path, caplog):
    """The model's own state_dict (head and head_dist included) gives timm's features, and says what it dropped."""
    import timm

    torch.manual_seed(0)
    full = timm.create_model(DEIT, pretrained=False, img_size=32).eval()  # 1000 classes: head, head_dist
    assert {"head.weight", "head_dist.weight"} <= set(full.state_dict())
    path = _save(full.state_dict(), tmp_path / "deit.safetensors")
    with caplog.at_level(logging.INFO, logger="regcache"):
        model = load_model(Backbone(model=DEIT, checkpoint=path), 32)
    dropped = [r.getMessage() for r in caplog.records if "classifier" in r.getMessage()]
    assert len(dropped) == 1 and "head.weight" in dropped[0] and "head_dist.bias" in dropped[0]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), full.forward_features(x))
    assert not any(k.startswith("head") for k in model.state_dict())


def test_checkpoint_other_mismatches_still_named(tmp_path):
    """Only the classifier is forgiven: a stray key, and a missing block weight, are still named."""
    import timm

    sd = timm.create_model(DEIT, pretrained=False, img_size=32).state_dict()
    sd["fc_norm.weight"] = torch.ones(192)  # fc_norm is the model's own pooling norm: never dropped
    del sd["blocks.0.attn.qkv.weight"]
    path = _save(sd, tmp_path / "deit.safetensors")
    with pytest.raises(ModelError) as e:
        load_model(Backbone(model=DEIT, checkpoint=path), 32)
    msg = str(e.value)
    assert "fc_norm.weight" in msg and "blocks.0.attn.qkv.weight" in msg and "head" not in msg


# --------------------------------------------------------------------------- 7: progress in log files

class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_progress_outside_a_terminal_writes_a_line_per_interval():
    """1000 updates one second apart, a line every 30 s: 33 lines on the way (t = 30, 60, …, 990) and the last."""
    import io

    from regcache.progress import LogProgress

    out, clock = io.StringIO(), _Clock()
    bar = LogProgress(total=1000, desc="vits fmnist", unit="img", stream=out, interval=30, clock=clock)
    for _ in range(1000):
        clock.t += 1
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == sum(1 for t in range(1, 1001) if t % 30 == 0) + 1
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("vits fmnist: 30/1000 img (3%)") and lines[-1].startswith("vits fmnist: 1000/1000 img")


def test_progress_picks_tqdm_on_a_terminal_only():
    import io

    from tqdm import tqdm

    from regcache.progress import LogProgress, progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(progress(total=3, stream=Tty()), tqdm)
    assert isinstance(progress(total=3, stream=io.StringIO()), LogProgress)
    out = io.StringIO()
    assert list(progress(range(5), desc="heads", stream=out)) == list(range(5))
    assert out.getvalue().splitlines() == [l for l in out.getvalue().splitlines() if l.startswith("heads: 5/5 it")]
    assert len(out.getvalue().splitlines()) == 1


# --------------------------------------------------------------------------- 3: default workers

def _two_cores() -> None:
    import os

    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])


def _extract_on_two_cores(reg_ckpt, tmp_path, *extra: str):
    import subprocess

    from conftest import cli_args, cli_env, make_shards

    data = make_shards(tmp_path / "shards", n_shards=4, per_shard=2)
    args = [a for a in cli_args(reg_ckpt, data, tmp_path / f"cache{len(extra)}", "--device", "cpu", *extra)
            if a != "-q"]
    return subprocess.run(args, env=cli_env(), capture_output=True, text=True, timeout=600, preexec_fn=_two_cores)


def test_default_workers_fit_a_two_core_machine(reg_ckpt, tmp_path):
    """Torch's own check warns for 4 workers on 2 cores; the default makes none and says what it chose.

    stderr is a pipe here, as in CI: progress comes as summary lines, never carriage returns.
    """
    warning = "This DataLoader will create"
    default = _extract_on_two_cores(reg_ckpt, tmp_path)
    assert default.returncode == 0, default.stderr
    assert warning not in default.stderr
    assert "0 decode workers" in default.stderr
    assert "\r" not in default.stderr and "8/8 img (100%)" in default.stderr
    four = _extract_on_two_cores(reg_ckpt, tmp_path, "--workers", "4")
    assert four.returncode == 0, four.stderr
    assert warning in four.stderr  # the check above can fail


@pytest.mark.parametrize("cores, device, expected", [(16, "cuda", 4), (16, "cpu", 4), (3, "cpu", 3),
                                                     (2, "cpu", 0), (1, "cpu", 0), (2, "cuda", 2)])
def test_default_workers_rule(monkeypatch, cores, device, expected):
    import os

    from regcache.extract import default_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert default_workers(torch.device(device)) == expected


# --------------------------------------------------------------------------- 4: analysis of an empty set

@pytest.mark.parametrize("command", [["norms"], ["tokenprobe"], ["featuremap", "--keys", "a", "--no-images"]])
def test_analysis_refuses_an_empty_set_by_name(tmp_path, command, monkeypatch):
    import numpy as np
    from click.testing import CliRunner

    monkeypatch.chdir(tmp_path)  # the default output folder (runs/...) would be made here, and removed on failure
    from conftest import PROBE_LAYOUT, make_set
    from regcache.cli import main

    tokens = PROBE_LAYOUT.num_prefix + PROBE_LAYOUT.grid[0] * PROBE_LAYOUT.grid[1]
    fs = make_set(tmp_path, "nothing", {"norms": np.zeros((0, tokens), np.float32),
                                        "tokens": np.zeros((0, 4, PROBE_LAYOUT.dim), np.float32)}, np.zeros(0, int))
    r = CliRunner().invoke(main, [command[0], str(fs.path), *command[1:]], catch_exceptions=True)
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.exception  # a message, not a traceback
    assert not list((tmp_path / "runs").iterdir())  # and no empty run folder left behind
    assert f"m / nothing ({fs.path}) has no rows" in r.output


# --------------------------------------------------------------------------- 5: install warnings

def test_pyproject_applies_without_warnings():
    """What `pip install -e .` reads of pyproject.toml, with the hatchling its build requirement allows."""
    import tomllib
    import warnings
    from importlib.metadata import version
    from pathlib import Path

    from hatchling.metadata.core import ProjectMetadata
    from packaging.requirements import Requirement

    root = Path(__file__).resolve().parents[1]
    config = tomllib.loads((root / "pyproject.toml").read_text())
    (req,) = [Requirement(r) for r in config["build-system"]["requires"] if r.startswith("hatchling")]
    assert req.specifier.contains(version("hatchling"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        meta = ProjectMetadata(str(root), None, config)
        core = meta.core
        assert core.license_expression == "MIT" and core.name == "regcache"
    assert [str(w.message) for w in caught] == []


# --------------------------------------------------------------------------- 2: random weights

def test_random_init_is_timms_seeded_init():
    """--random-init SEED gives exactly timm's weights after torch.manual_seed(SEED), and leaves the global RNG alone."""
    import timm

    from conftest import REG, SIZE

    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    model = load_model(Backbone(model=REG, random_init=7), SIZE)
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(7)
    ref = timm.create_model(REG, pretrained=False, num_classes=0, img_size=SIZE)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())
    other = load_model(Backbone(model=REG, random_init=8), SIZE)
    assert not torch.equal(other.pos_embed, model.pos_embed)
    with pytest.raises(SettingsError, match="either"):
        Backbone.make(model=REG, checkpoint="w.safetensors", random_init=0)


def test_random_init_sets_are_recorded_and_refused_by_the_probe(tmp_path):
    from click.testing import CliRunner

    from conftest import REG, RESIZE, SIZE, make_shards
    from regcache.cli import main
    from regcache.store import FeatureSet

    data = make_shards(tmp_path / "shards", n_shards=2, per_shard=6)
    cache = tmp_path / "cache"
    for name, shard in (("rtrain", "000"), ("rtest", "001")):  # other images for test
        r = CliRunner().invoke(main, ["extract", "-m", REG, "--random-init", "0", "-d",
                                      data.replace("{000..001}", shard), "--name", name,
                                      "--cache", str(cache), "--size", str(SIZE), "--resize", str(RESIZE), "-q",
                                      "--device", "cpu"])
        assert r.exit_code == 0, r.output
    (path,) = (cache / "rtrain").iterdir()
    fs = FeatureSet(path)
    assert fs.identity["random_init"] == 0 and fs.meta.model.checkpoint is None
    probe = ["probe", "-m", REG, "-f", "cls", "--train", "rtrain", "--test", "rtest", "--cache", str(cache),
             "--iterations", "5", "--batch-size", "8", "--no-plots", "-q"]
    r = CliRunner().invoke(main, [*probe, "--out", str(tmp_path / "run0")])
    assert r.exit_code == 1 and "random" in r.output and "--allow-random-init" in r.output, r.output
    r = CliRunner().invoke(main, [*probe, "--out", str(tmp_path / "run1"), "--allow-random-init"])
    assert r.exit_code == 0, r.output
