"""Post-hoc registers (PH-Reg, `regcache registers distill`): the teacher's views and their alignment against loops
written from the definition, the student's conversion and what trains, the checkpoint in timm and regcache,
bit-identical resumption, the cached targets, and what is refused. Tiny random-weight ViTs (2 blocks, 56 px)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import regcache.distill.teacher as teacher_module
from regcache.cli import main
from regcache.distill import DistillError, distill
from regcache.distill.augment import (align, augment, fill_value, sample_views, shift_limit, view_index, view_rng,
                                      Views)
from regcache.distill.output import extract_command, save_checkpoint
from regcache.distill.student import Arch, build_student, student_arch, unlock
from regcache.distill.teacher import Augment, denoised
from regcache.distill.train import Schedule, batch_rows, lr_at, train
from regcache.models import load_model, preprocess_for
from regcache.registry import IMAGENET_MEAN
from regcache.settings import Backbone
from regcache.settings.distill import UNLOCK, DistillSettings
from regcache.shards import write_shards
from regcache.store import FeatureSet, list_feature_sets

from conftest import NOREG, random_images

SIZE, RESIZE, ARGS = 56, 64, {"depth": 2, "embed_dim": 48}
REG4 = "vit_small_patch14_reg4_dinov2"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 2-block teacher checkpoint (layer scales raised so tokens differ between images) and two shards of 6
    images, one of them corrupt (skipped by name)."""
    root = tmp_path_factory.mktemp("distill")
    torch.manual_seed(0)
    model = timm.create_model(NOREG, pretrained=False, img_size=SIZE, num_classes=0, **ARGS)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".gamma"):
                p.copy_(torch.randn_like(p) * 0.5)
    save_file(model.state_dict(), str(root / "teacher.safetensors"))
    samples = list(random_images(12))
    samples[8] = ("broken", b"not a png", 0)
    write_shards(samples, str(root / "s" / "part-%03d.tar"), per_shard=6)
    return {"root": root, "ckpt": root / "teacher.safetensors", "data": str(root / "s" / "part-{000..001}.tar")}


def settings(world, out: str, **kw) -> DistillSettings:
    values = {"model": NOREG, "checkpoint": str(world["ckpt"]), "model_args": ARGS, "data": world["data"],
              "size": SIZE, "resize": RESIZE, "steps": 4, "batch_size": 4, "cache": str(world["root"] / "cache"),
              "out": str(world["root"] / out), "device": "cpu", "quiet": True, **kw}
    return DistillSettings.make(values)


def teacher_model(world) -> torch.nn.Module:
    return load_model(Backbone(model=NOREG, checkpoint=world["ckpt"], model_args=ARGS), SIZE)


# --------------------------------------------------------------------------- the views, from the definition

def brute_view(image: np.ndarray, dy: int, dx: int, flipped: bool, fill) -> np.ndarray:
    """out[c, y, x] = in[c, y + dy, x' + dx] (x' = W - 1 - x when flipped), ``fill[c]`` outside: explicit loops."""
    c, h, w = image.shape
    out = np.empty_like(image)
    for ch in range(c):
        for y in range(h):
            for x in range(w):
                xs = w - 1 - x if flipped else x
                sy, sx = y + dy, xs + dx
                out[ch, y, x] = image[ch, sy, sx] if 0 <= sy < h and 0 <= sx < w else fill[ch]
    return out


def test_views_shift_and_flip_pixels_and_patch_indices_as_defined():
    rng = np.random.default_rng(1)
    patch, grid = 3, 4
    image = rng.normal(size=(3, patch * grid, patch * grid)).astype(np.float32)
    fill = fill_value("white", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert np.allclose(fill.numpy(), [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225])
    views = Views(offsets=np.array([[0, 0], [1, -2], [-1, 3], [2, 1]]), flips=np.array([False, True, False, True]))
    got = augment(torch.from_numpy(image), views, patch, fill).numpy()
    index = view_index((grid, grid), views).numpy()
    ids = np.arange(grid * grid, dtype=np.float32).reshape(1, grid, grid).repeat(patch, 1).repeat(patch, 2)
    for v, ((dy, dx), flipped) in enumerate(zip(views.offsets, views.flips)):
        assert np.array_equal(got[v], brute_view(image, dy * patch, dx * patch, flipped, fill.numpy()))
        # the index grid moves as the pixels do: a picture of each patch's index, shifted, shows the same indices
        moved = brute_view(ids, dy * patch, dx * patch, flipped, [-1.0])[0][::patch, ::patch]
        assert np.array_equal(index[v].reshape(grid, grid), moved)


def test_align_is_the_mean_over_the_views_that_show_each_patch():
    rng = np.random.default_rng(2)
    grid, dim = 5, 3
    truth = rng.normal(size=(grid, grid, dim))
    all_views = [sample_views(view_rng(0, f"k{b}"), grid, views=6, shift=0.4, flip=0.5) for b in range(2)]
    feats = np.zeros((2, 6, grid * grid, dim))
    for b, views in enumerate(all_views):  # what the view shows, plus noise; the fill tokens get garbage
        for v, ((dy, dx), flipped) in enumerate(zip(views.offsets, views.flips)):
            for r in range(grid):
                for c in range(grid):
                    sr, sc = r + dy, (grid - 1 - c if flipped else c) + dx
                    inside = 0 <= sr < grid and 0 <= sc < grid
                    feats[b, v, r * grid + c] = (truth[sr, sc] + rng.normal(size=dim) * 0.1 if inside else 1e6)
    index = torch.stack([view_index((grid, grid), v) for v in all_views])
    got = align(torch.from_numpy(feats).float(), index).numpy()
    want = np.zeros((2, grid * grid, dim))
    for b, views in enumerate(all_views):  # brute force: every view token, where it came from
        for p in range(grid * grid):
            r, c = divmod(p, grid)
            hits = [feats[b, v, rr * grid + cc] for v, ((dy, dx), flipped) in enumerate(zip(views.offsets, views.flips))
                    for rr in range(grid) for cc in range(grid)
                    if (rr + dy, (grid - 1 - cc if flipped else cc) + dx) == (r, c)]
            assert hits, "view 0 covers every patch"
            want[b, p] = np.mean(hits, axis=0)
    assert np.allclose(got, want, atol=1e-4)
    assert np.abs(got - truth.reshape(1, -1, dim)).max() < 0.5  # garbage never reaches a target


def test_view_sampling():
    grid = 37
    s = shift_limit(grid, 0.15)
    assert s == 6  # round(5.55), the authors' DINOv2 value at 518 px
    a = sample_views(view_rng(3, "img7"), grid)
    b = sample_views(view_rng(3, "img7"), grid)
    c = sample_views(view_rng(4, "img7"), grid)
    assert np.array_equal(a.offsets, b.offsets) and np.array_equal(a.flips, b.flips)
    assert not np.array_equal(a.offsets, c.offsets)
    assert a.offsets.shape == (10, 2) and a.offsets[0].tolist() == [0, 0] and not a.flips[0]
    assert np.abs(a.offsets).max() <= s and a.offsets.dtype.kind == "i"
    assert len({tuple(o) for o in a.offsets[1:]}) == 9  # farthest points: well spread, no repeats
    many = np.concatenate([sample_views(view_rng(0, f"k{i}"), grid).flips[1:] for i in range(200)])
    assert 0.4 < many.mean() < 0.6
    assert not sample_views(view_rng(0, "k"), grid, flip=0.0).flips.any()


# --------------------------------------------------------------------------- the student

def test_the_register_layout_with_no_registers_is_the_teacher():
    teacher = load_model(Backbone(model=NOREG, random_init=0, model_args=ARGS), SIZE)
    arch = student_arch(Arch(NOREG, ARGS), 0)
    student = build_student(teacher, arch, SIZE, 0, seed=0).eval()
    assert student.no_embed_class and student.pos_embed.shape[1] == (SIZE // 14) ** 2
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(student.forward_features(x), teacher.forward_features(x), atol=1e-5, rtol=0)
    assert student_arch(Arch(NOREG, ARGS), 4) == Arch(REG4, ARGS)  # timm's own register model


def test_a_register_count_timm_has_no_model_for_loads_with_model_arguments(tmp_path):
    teacher = load_model(Backbone(model=NOREG, random_init=0, model_args=ARGS), SIZE)
    arch = student_arch(Arch(NOREG, ARGS), 3)
    assert arch == Arch(NOREG, {**ARGS, "reg_tokens": 3, "no_embed_class": True})
    student = build_student(teacher, arch, SIZE, 3, seed=0).eval()
    save_checkpoint(student, arch, SIZE, tmp_path / "s.safetensors")
    command = extract_command(NOREG, arch.args, tmp_path / "s.safetensors", "d.yaml", preprocess_for(NOREG, size=SIZE))
    assert command[command.index("-m") + 1] == NOREG and "no_embed_class=true" in command
    given = command[command.index("--model-arg") + 1::2]  # KEY=VALUE as the command line gives them
    loaded = load_model(Backbone(model=NOREG, checkpoint=tmp_path / "s.safetensors", model_args=given), SIZE)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert loaded.reg_token.shape[1] == 3 and torch.equal(loaded.forward_features(x), student.forward_features(x))


def test_unlock_names_are_the_settings_choices():
    student = build_student(load_model(Backbone(model=NOREG, random_init=0, model_args=ARGS), SIZE),
                            Arch(REG4, ARGS), SIZE, 4, seed=0)
    for name in UNLOCK:
        assert set(unlock(student, [name])) > {"reg_token"}
    assert unlock(student, []) == ["reg_token"]
    assert set(unlock(student, ["pos_embed", "patch_embed", "last_block"])) == {
        "reg_token", "pos_embed", "cls_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
        *(n for n, _ in student.named_parameters() if n.startswith("blocks.1."))}
    reg = student.reg_token.detach()
    assert abs(float(reg.std()) - 48 ** -0.5) < 0.03  # N(0, 1/D)


def test_training_trains_the_unlocked_weights_only_and_the_checkpoint_is_the_student(world, tmp_path, caplog):
    teacher = teacher_model(world)
    student = build_student(teacher, Arch(REG4, ARGS), SIZE, 4, seed=0)
    trained = unlock(student, ["pos_embed", "patch_embed", "last_block"])
    before = {k: v.clone() for k, v in student.state_dict().items()}
    torch.manual_seed(0)
    images = torch.randint(0, 256, (6, 3, SIZE, SIZE), dtype=torch.uint8)
    norm = lambda x: (x.float() / 255 - 0.45) / 0.25  # noqa: E731
    target = denoised(teacher, norm(images), [f"k{i}" for i in range(6)], Augment(views=4, shift=0.3),
                      torch.zeros(3))
    sched = Schedule(images=6, batch_size=6, steps=6, lr=3e-4, end_lr=3e-4)
    losses, _ = train(student, images, norm, lambda rows: target[torch.from_numpy(rows)], sched,
                      state_path=tmp_path / "state", run={"t": 1}, save_every=100, device=torch.device("cpu"),
                      quiet=True)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.7 * losses[0], losses
    after = student.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]) == (k not in trained), k
    assert not (tmp_path / "state").exists()  # no state saved in the last step

    out = tmp_path / "student.safetensors"
    save_checkpoint(student, Arch(REG4, ARGS), SIZE, out)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        want = student.eval().forward_features(x)
        timm_model = timm.create_model(REG4, pretrained=False, num_classes=0, img_size=SIZE, **ARGS).eval()
        timm_model.load_state_dict(load_file(str(out)), strict=True)
        with caplog.at_level("WARNING", logger="regcache"):
            ours = load_model(Backbone(model="vits_reg", checkpoint=out, model_args=ARGS), SIZE)
        assert not caplog.records
        assert torch.equal(timm_model.forward_features(x), want)
        assert torch.equal(ours.forward_features(x), want)
        with caplog.at_level("WARNING", logger="regcache"):
            bigger = load_model(Backbone(model="vits_reg", checkpoint=out, model_args=ARGS), 84)  # resampled table
        assert f"trained at {SIZE} px and runs here at 84" in caplog.text  # said, not silent
        assert bigger.pos_embed.shape[1] == 36 and bigger.forward_features(torch.randn(1, 3, 84, 84)).isfinite().all()


def test_schedule_and_data_order():
    s = Schedule(images=10, batch_size=4, steps=9, lr=1e-4, end_lr=5e-6)  # 3 steps per epoch, 3 epochs
    r = 5e-6 / 1e-4
    assert [lr_at(k, s) for k in (0, 1, 2, 3, 4, 8)] == pytest.approx(
        [1e-4, 1e-4 * r ** (1 / 3), 1e-4 * r ** (1 / 3), 1e-4 * r ** (1 / 3), 1e-4 * r ** (2 / 3), 5e-6])
    step = Schedule(images=10, batch_size=4, steps=9, kind="step")
    assert lr_at(0, step) == pytest.approx(1e-4) and lr_at(8, step) == pytest.approx(5e-6)
    epoch = np.concatenate([batch_rows(k, s) for k in range(3)])
    assert sorted(epoch) == list(range(10)) and [len(batch_rows(k, s)) for k in range(3)] == [4, 4, 2]
    assert not np.array_equal(epoch, np.concatenate([batch_rows(k, s) for k in range(3, 6)]))
    assert np.array_equal(batch_rows(4, s), batch_rows(4, Schedule(images=10, batch_size=4, steps=9)))


# --------------------------------------------------------------------------- distill, end to end

def test_a_killed_distillation_resumes_to_the_same_weights(world):
    class Killed(Exception):
        pass

    def kill(step, loss):
        if step == 4:
            raise Killed

    resumed = settings(world, "resumed/s.safetensors", steps=6, save_every=2)
    with pytest.raises(Killed):
        distill(resumed, on_step=kill)
    state = resumed.out.with_name(resumed.out.name + ".state")
    assert state.is_file() and not resumed.out.exists()
    again = distill(resumed)
    assert again.resumed_at == 4 and not state.exists()
    whole = distill(settings(world, "whole/s.safetensors", steps=6, save_every=2))
    assert whole.resumed_at == 0 and whole.losses == again.losses
    a, b = load_file(str(resumed.out)), load_file(str(whole.checkpoint))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert distill(resumed).reused  # made already: nothing to do

    other = settings(world, "resumed/s.safetensors", steps=6, save_every=2, lr=2e-4)
    with pytest.raises(Killed):
        distill(other, on_step=kill)
    with pytest.raises(DistillError, match="differs in lr"):
        distill(settings(world, "resumed/s.safetensors", steps=6, save_every=2, lr=3e-4))


def test_cached_targets_are_reused_and_other_views_make_another_set(world, monkeypatch):
    calls = []
    real = teacher_module.denoised
    monkeypatch.setattr(teacher_module, "denoised", lambda m, images, *a, **k: calls.append(len(images)) or
                        real(m, images, *a, **k))
    first = distill(settings(world, "cached/a.safetensors", views=3))
    assert sum(calls) == first.teacher_images == 11 and not first.reused_targets  # the corrupt image skipped
    fs = FeatureSet(first.targets)
    assert list(fs.errors.key) == ["broken"] and len(fs.index) == 11 and fs.features == ("tokens",)
    assert fs.identity["augment"]["views"] == 3 and fs.identity["model"].startswith("phreg-targets:")
    n = len(calls)
    second = distill(settings(world, "cached/b.safetensors", views=3, registers=2, unlock="", seed=5))
    assert len(calls) == n and second.reused_targets and second.targets == first.targets and second.teacher_images == 0
    third = distill(settings(world, "cached/c.safetensors", views=4))
    assert len(calls) > n and not third.reused_targets and third.targets != first.targets
    record = json.loads(first.record.read_text())
    assert record["targets"]["fingerprint"] == fs.fingerprint and len(record["losses"]) == 4
    assert record["teacher"]["identity"]["checkpoint"].startswith("sha256:")
    assert record["student"]["alias"] == "vits_reg"


def test_a_killed_teacher_pass_resumes_at_the_first_uncommitted_shard(world, monkeypatch):
    calls = []
    real = teacher_module.denoised
    first = {f"img{i:05d}" for i in range(6)}  # the first shard's samples

    def dies_in_the_second_shard(m, images, keys, *a, **k):
        if not set(keys) <= first:
            raise KeyboardInterrupt
        calls.append(len(images))
        return real(m, images, keys, *a, **k)

    monkeypatch.setattr(teacher_module, "denoised", dies_in_the_second_shard)
    s = settings(world, "teacher_killed/a.safetensors", views=5)
    with pytest.raises(KeyboardInterrupt):
        distill(s)
    assert sum(calls) == 6  # the first shard, committed
    monkeypatch.setattr(teacher_module, "denoised", lambda m, images, *a, **k: calls.append(len(images)) or
                        real(m, images, *a, **k))
    res = distill(s)
    assert res.teacher_images == 5 and sum(calls) == 11 and FeatureSet(res.targets).complete


def test_the_limit_takes_the_shards_that_hold_the_first_images(world):
    res = distill(settings(world, "limit/a.safetensors", images=5, views=2))
    assert len(FeatureSet(res.targets).shards) == 1 and json.loads(res.record.read_text())["data"]["images"] == 5


def test_a_model_that_is_not_a_vit_is_refused_by_name_before_any_data_is_read(world):
    with pytest.raises(DistillError, match="resnet18 is a ResNet, not a timm VisionTransformer"):
        distill(DistillSettings.make(model="resnet18", random_init=0, data="/nonexistent/x.tar",
                                     out=str(world["root"] / "r.safetensors"), cache=str(world["root"] / "cache")))
    with pytest.raises(DistillError, match="already has 4 trained registers"):
        distill(DistillSettings.make(model=REG4, random_init=0, data="/nonexistent/x.tar",
                                     out=str(world["root"] / "r.safetensors")))


def test_the_command_distills_and_its_extract_command_reads_the_student(world, tmp_path):
    out = tmp_path / "cli.safetensors"
    model_args = [x for k, v in ARGS.items() for x in ("--model-arg", f"{k}={v}")]
    args = ["registers", "distill", "-m", NOREG, "--checkpoint", str(world["ckpt"]), *model_args, "-d", world["data"],
            "--size", str(SIZE), "--resize", str(RESIZE), "--steps", "2", "--views", "2",
            "--cache", str(world["root"] / "cache"), "-o", str(out), "-q"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    command = json.loads(out.with_name(out.name + ".json").read_text())["extract"]["args"]
    assert command[:4] == ["regcache", "extract", "-m", "vits_reg"] and command[-len(model_args):] == model_args
    assert " ".join(command[1:4]) in r.output
    r = CliRunner().invoke(main, [*command[1:], "--cache", str(tmp_path / "x"), "-f", "reg_all,tokens", "-q"])
    assert r.exit_code == 0, r.output
    got, = list_feature_sets(tmp_path / "x")
    assert got.layout.num_reg == 4 and len(got.index) == 11
    listed = json.loads(CliRunner().invoke(main, ["ls", "--json", "--cache", str(tmp_path / "x")]).output)
    assert listed["label"] == "vits_reg (cli.safetensors)" and listed["checkpoint"] == str(out.resolve())
    assert listed["model"] == "vits_reg"  # the name -m takes
    bad = CliRunner().invoke(main, [*args[:-3], "-o", str(tmp_path / "x.pt")])
    assert bad.exit_code == 2 and "--out" in bad.output


# --------------------------------------------------------------------------- as a pipeline step

def test_a_pipeline_distils_then_extracts_and_probes_the_student_and_a_rerun_does_nothing(world, tmp_path):
    """A models[] entry with a distill block: the distill stage makes the student once (a checkpoint under the
    cache root, named by what determines it), its sets are extracted with the student (4 registers, so the [CLS;μR]
    combination runs), the plain entry beside it skips that combination; a second run does no work at all."""
    from regcache.pipeline import load_pipeline, run_pipeline
    from regcache.shards import write_set

    items = [(k, img, y % 2) for k, img, y in random_images(8, seed=3)]
    write_set(tmp_path / "ds", "d", items, len(items), 8, role="id-train", classes=["a", "b"])
    args = json.dumps(ARGS)
    (tmp_path / "p.yaml").write_text(f"""
name: phreg
cache: cache
out: out
models:
  - {{model: {NOREG}, checkpoint: {world['ckpt']}, model_args: {args}, label: plain}}
  - model: {NOREG}
    checkpoint: {world['ckpt']}
    model_args: {args}
    label: phreg
    distill: {{data: "{world['data']}", steps: 2, batch_size: 4, views: 2, size: {SIZE}, resize: {RESIZE}}}
datasets: [ds/d.yaml]
extract: {{size: {SIZE}, resize: {RESIZE}, workers: 0}}
probes:
  - {{name: t, features: [cls, "cls,reg"], train: d, lr: 0.1, iterations: 5, batch_size: 4, plots: false}}
""")
    lines = []
    run_pipeline(load_pipeline(tmp_path / "p.yaml"), dry_run=True, echo=lines.append)
    plan = "\n".join(lines)
    assert "distillations: 1 (0 cached)" in plan and "its student is distilled first" in plan, plan
    run = run_pipeline(load_pipeline(tmp_path / "p.yaml"), progress=False, echo=lambda s: None)
    (job,) = run.distill
    ckpt = job.student["checkpoint"]
    assert job.status == "ran" and job.student["model"] == "vit_small_patch14_reg4_dinov2" and \
        ckpt.startswith(str(tmp_path / "cache" / "distilled"))
    sets = {j.model.label: FeatureSet(j.path) for j in run.extract}
    assert sets["phreg"].layout.num_reg == 4 and sets["plain"].layout.num_reg == 0
    assert sets["phreg"].identity["checkpoint"].startswith("sha256:")
    combos = {j.model.label: [",".join(c) for c in j.settings.features] for j in run.probes}
    assert combos == {"plain": ["cls"], "phreg": ["cls", "cls,reg"]}
    # a student's numbers name its checkpoint, never the bare register model's name
    models = {j.model.label: set(pd.read_parquet(j.run / "results.parquet").model) for j in run.probes}
    assert models == {"plain": {f"{NOREG} (teacher.safetensors)"}, "phreg": {f"{REG4} ({Path(ckpt).name})"}}
    report = (tmp_path / "out" / "report.md").read_text()  # the entries' labels, tagged with their weights
    assert "| plain (teacher.safetensors) |" in report and f"| phreg ({Path(ckpt).name}) |" in report, report
    again = run_pipeline(load_pipeline(tmp_path / "p.yaml"), progress=False, echo=lambda s: None)
    assert [j.status for j in again.distill] == ["cached"]
    assert {j.status for j in again.extract} == {"cached"} and {j.status for j in again.probes} == {"cached"}


def test_a_finished_distillation_is_found_before_the_teacher_loads_and_a_replaced_file_is_not(world, monkeypatch):
    """The record's key (`student_key`) is checked before any weight loads; the device and how often state is saved
    are not part of it; a checkpoint whose bytes are no longer the record's is made again."""
    import regcache.distill.run as run_module

    s = settings(world, "done.safetensors", save_every=2)
    distill(s)
    real = run_module.load_model

    def no_load(*a, **k):
        raise AssertionError("the teacher was loaded for a finished distillation")
    monkeypatch.setattr(run_module, "load_model", no_load)
    again = distill(s.model_copy(update={"save_every": 3}))
    assert again.reused and again.losses
    s.out.write_bytes(s.out.read_bytes()[:-1] + b"\0")
    monkeypatch.setattr(run_module, "load_model", real)
    remade = distill(s)
    assert not remade.reused and remade.steps == s.steps


def test_a_pipeline_names_the_student_by_what_determines_it_and_reads_its_images_as_the_teacher(world, tmp_path):
    """Another lr makes another checkpoint, another device or save interval the same; a dry run hashes none of the
    distill data; the student (timm's name, whose own transform is 518 px) reads images as its teacher (the alias
    vits: 224 of 256) and as the plain entry beside it."""
    from regcache.pipeline import load_pipeline, run_pipeline
    from regcache.pipeline.students import distill_jobs, with_students
    from regcache.pipeline.jobs import extract_jobs
    from regcache.shards import write_set

    items = [(k, img, y % 2) for k, img, y in random_images(4, seed=5)]
    write_set(tmp_path / "ds", "d", items, len(items), 4, role="id-train", classes=["a", "b"])
    args = json.dumps(ARGS)

    def pipeline(distill_extra: str = "") -> Path:
        (tmp_path / "p.yaml").write_text(f"""
name: names
cache: cache
models:
  - {{model: vits, checkpoint: {world['ckpt']}, model_args: {args}, label: plain}}
  - model: vits
    checkpoint: {world['ckpt']}
    model_args: {args}
    label: phreg
    distill: {{data: "{world['data']}", steps: 2, batch_size: 4, size: {SIZE}, resize: {RESIZE}{distill_extra}}}
datasets: [ds/d.yaml]
""")
        return tmp_path / "p.yaml"

    run = run_pipeline(load_pipeline(pipeline()), dry_run=True, echo=lambda s: None)
    memo = " ".join(f.read_text() for f in (tmp_path / "cache" / ".digests").glob("*.json"))
    assert "part-000.tar" not in memo and "part-001.tar" not in memo  # the weights are hashed, no shard is
    assert "unhashed" in run.distill[0].student["checkpoint"]
    pre = {j.model.label: {f: getattr(j.settings, f) for f in ("size", "resize", "crop_mode", "mean", "std")}
           for j in run.extract}
    assert (pre["phreg"]["size"], pre["phreg"]["resize"], pre["phreg"]["crop_mode"]) == (224, 256, "center")
    assert run.extract[1].settings.model == REG4 and pre["phreg"]["mean"] == pytest.approx(IMAGENET_MEAN)
    names = {}
    for extra in ("", ", device: cpu, save_every: 1", ", lr: 0.001"):
        pl = load_pipeline(pipeline(extra))
        (job,) = distill_jobs(pl)
        names[extra] = Path(job.student["checkpoint"]).name
        planned = extract_jobs(with_students(pl, [job]))
        assert [j.settings.size for j in planned] == [None, 224]  # plain: the alias's own, resolved when planned
    assert names[""] == names[", device: cpu, save_every: 1"] != names[", lr: 0.001"]


def test_no_room_for_the_students_crops_is_an_error_naming_the_folder_and_leaves_no_file(world, tmp_path, monkeypatch):
    import errno

    import regcache.distill.run as run_module

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(run_module.os, "posix_fallocate", full)
    s = settings(world, "full/out.safetensors")
    with pytest.raises(DistillError, match=r"full: no room for the student's 11 crops .*No space left"):
        distill(s)
    assert not list(s.out.parent.iterdir())


def test_equal_weights_save_to_equal_bytes_whatever_order_safetensors_writes_its_metadata():
    """safetensors writes metadata in hash order: the same student saved twice had two digests (so two sets)."""
    from safetensors import safe_open
    from safetensors.torch import save

    from regcache.files import canonical_safetensors

    tensors = {"b": torch.arange(6.0).view(2, 3), "a": torch.ones(3, dtype=torch.float16)}
    meta = {f"key{i}": "v" * i for i in range(8)}
    raw = {save(tensors, metadata=dict(reversed(meta.items()))) for _ in range(8)} | {save(tensors, metadata=meta)}
    assert len({canonical_safetensors(b) for b in raw}) == 1
    data = canonical_safetensors(raw.pop())
    path = Path(tempfile.mkdtemp()) / "x.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == meta and all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())
