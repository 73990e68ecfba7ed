"""Stage 2: linear heads on cached features, evaluated for accuracy and OOD detection (DESIGN §5).

Never loads a backbone. `data` finds and reads the cached sets, `heads` trains every head of a
grid in one pass, `run` puts a whole run together (train, select, test, score).
"""
from .data import ProbeError, Split, StreamedSplit, holdout, load_split, map_labels
from .heads import Head, ProbeConfig, accuracy, fit_heads, load_heads, predict, refit, save_heads, select, train_heads
from .run import FEATURE_SCORERS, SCORERS, ProbeJob, ProbeResult, Row, evaluate, run_probe, score_run

__all__ = ["FEATURE_SCORERS", "SCORERS", "Head", "ProbeConfig", "ProbeError", "ProbeJob", "ProbeResult", "Row",
           "Split", "StreamedSplit", "accuracy", "evaluate", "fit_heads", "holdout", "load_heads",
           "load_split", "map_labels", "predict", "refit", "run_probe", "save_heads", "score_run", "select", "train_heads"]
