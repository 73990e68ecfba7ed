"""Out-of-distribution detection: metrics (`metrics`), logit scores (`scores`), the scorer registry
(`scorers`) with its entries by what they read (`from_logits`, `from_head`, `from_bank`), and fitting
on the training bank in chunks (`fit`)."""
from .fit import Bank, FitError, Moments, quantile, topk_similarities
from .metrics import (METRICS, Metric, ap_in, ap_out, aupr_in_openood, aupr_out_openood, auroc, average_precision, fpr_at_tpr,
                      fpr_at_tpr_openood, roc_points, trapezoid_pr_area)
from .scorers import SCORERS, Linear, Params, Scorer, make, parse_args, register, resolve
from . import from_logits  # noqa: F401, I001  (each registers its scorers, in this order)
from . import from_head  # noqa: F401
from . import from_bank  # noqa: F401
from .scores import energy, max_logit, msp, softmax

__all__ = ["METRICS", "SCORERS", "Bank", "FitError", "Linear", "Metric", "Moments", "Params", "Scorer", "ap_in", "ap_out",
           "aupr_in_openood", "aupr_out_openood", "auroc", "average_precision", "energy", "fpr_at_tpr",
           "fpr_at_tpr_openood", "make", "max_logit", "msp", "parse_args", "quantile", "register", "resolve",
           "roc_points", "softmax", "topk_similarities", "trapezoid_pr_area"]
