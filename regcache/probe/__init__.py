"""Stage 2: linear heads on cached features, evaluated for accuracy and OOD detection (docs/design.md, "Probing").

Never loads a backbone. `data` reads the cached sets, `head` is a trained head, `minibatch` and
`solvers` train every head of a grid in one pass, `run` puts a whole run together (the `probe` and
`score` actions), `knn` holds the kNN and few-shot protocols.
"""
from .data import ProbeError, Split, StreamedSplit, holdout, load_split, map_labels
from .evaluate import Row, evaluate
from .head import Head, accuracy, load_heads, predict, save_heads, select
from .knn import fewshot, knn
from .minibatch import train_heads
from .run import ProbeResult, probe, run_probe, score
from .sets import RunSets, find_sets
from .solvers import SOLVERS, fit_heads, refit

__all__ = ["Head", "ProbeError", "ProbeResult", "Row", "RunSets", "SOLVERS", "Split", "StreamedSplit", "accuracy",
           "evaluate", "fewshot", "find_sets", "fit_heads", "holdout", "knn", "load_heads", "load_split", "map_labels",
           "predict", "probe", "refit", "run_probe", "save_heads", "score", "select", "train_heads"]
