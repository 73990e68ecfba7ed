"""Out-of-distribution detection: scores from logits and features (`scores`), and their metrics (`metrics`)."""
from .metrics import METRICS, aupr_in, aupr_out, auroc, average_precision, fpr_at_tpr, roc_points
from .scores import LOGIT_SCORES, Mahalanobis, ViM, energy, knn_score, max_logit, msp

__all__ = ["LOGIT_SCORES", "METRICS", "Mahalanobis", "ViM", "aupr_in", "aupr_out", "auroc", "average_precision",
           "energy", "fpr_at_tpr", "knn_score", "max_logit", "msp", "roc_points"]
