"""A trained linear head: its weights, how it scores a split, how it is saved, and selection among heads."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import Split


@dataclass
class Head:
    """One trained linear head: ``logits = x @ weight.T + bias`` on the concatenation of ``features``.

    An lbfgs head has ``C`` (scikit-learn's) and ``wd = 1/(C·n)``, its weight decay on the mean loss.
    """

    features: tuple[str, ...]
    lr: float
    wd: float
    weight: torch.Tensor
    bias: torch.Tensor
    val_acc: float = float("nan")
    C: float = float("nan")
    iterations: int = -1    # iterations it trained (lbfgs: its own, at its stop rule; minibatch: the steps)

    def logits(self, split: Split, chunk: int = 65536) -> np.ndarray:
        out = [split.combo(self.features, np.arange(i, min(i + chunk, len(split)))) @ self.weight.T + self.bias
               for i in range(0, len(split), chunk)]
        return torch.cat(out).numpy()

    @property
    def name(self) -> str:
        return ",".join(self.features)


def save_heads(path: Path, heads: dict, meta: dict) -> None:
    """The heads with their settings, and ``meta`` (model, training set, the classes the outputs stand for), each
    as JSON in the file's metadata. A failure to write (a full disk) is an OSError."""
    import safetensors.torch
    from safetensors import SafetensorError

    tensors, info = {}, []
    for h in heads.values():
        tensors[f"{h.name}/weight"], tensors[f"{h.name}/bias"] = h.weight.contiguous(), h.bias.contiguous()
        info.append({"features": list(h.features), "lr": h.lr, "wd": h.wd, "val_acc": h.val_acc, "C": h.C,
                     "iterations": h.iterations})
    try:
        safetensors.torch.save_file(tensors, str(path), metadata={"heads": json.dumps(info),
                                                                  **{k: json.dumps(v) for k, v in meta.items()}})
    except SafetensorError as e:
        raise OSError(str(e)) from e


def load_heads(path: Path) -> list:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        info = json.loads(f.metadata()["heads"])
        return [Head(tuple(h["features"]), h["lr"], h["wd"], f.get_tensor(f"{','.join(h['features'])}/weight"),
                     f.get_tensor(f"{','.join(h['features'])}/bias"), h["val_acc"], h.get("C", float("nan")),
                     h.get("iterations", -1)) for h in info]


def accuracy(logits: np.ndarray, labels: np.ndarray, subset: np.ndarray | None = None) -> float:
    """Top-1; with a class subset, the logits are restricted to its columns before the argmax."""
    return float(np.mean(predict(logits, subset) == labels))


def predict(logits: np.ndarray, subset: np.ndarray | None = None) -> np.ndarray:
    if subset is None:
        return logits.argmax(1)
    return np.asarray(subset)[logits[:, subset].argmax(1)]


def select(heads: list[Head], val: Split) -> dict[tuple[str, ...], Head]:
    """Per feature combination, the head with the best validation accuracy (first on ties)."""
    best: dict[tuple[str, ...], Head] = {}
    for h in heads:
        h.val_acc = accuracy(h.logits(val), val.labels, val.subset)
        if h.features not in best or h.val_acc > best[h.features].val_acc:
            best[h.features] = h
    return best


