"""Issue 15: what a new user meets first (a checkpoint with its classifier, random weights, worker count,
empty sets, install warnings, progress output in logs)."""
from __future__ import annotations

import logging

import pytest
import torch

from regcache.models import ModelError, ModelSpec, load_model

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
        model = load_model(ModelSpec(DEIT, path), 32)
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
        load_model(ModelSpec(DEIT, path), 32)
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
