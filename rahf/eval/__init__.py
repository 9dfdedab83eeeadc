"""Inference and evaluation: the one inference path (:mod:`rahf.eval.predict`), the metrics, the
evaluation loop used by training and ``rahf eval``, the batched scorer and the visual reports."""
