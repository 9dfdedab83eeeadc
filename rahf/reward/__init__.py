"""Uses built on a RAHF model: best-of-N selection, inpainting masks, concept-bottleneck
aggregation, TextNorm calibration and reward-model ensembles."""
