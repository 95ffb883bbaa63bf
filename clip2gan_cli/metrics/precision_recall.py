"""Improved precision and recall (Kynkaanniemi et al. 2019), by torch-fidelity 0.4 (`metric_prc`).

Precision: the share of generated images inside the real manifold (the union of balls around
each real feature reaching its k-th nearest real neighbour); recall: the share of real images
inside the generated manifold. k = 3, the paper's choice and torch-fidelity's default.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UserInputError

if TYPE_CHECKING:
    import torch

PRC_NEIGHBORHOOD = 3
# cdist blocks of torch-fidelity's implementation (its default).
PRC_BATCH_SIZE = 10000


def precision_recall(fake_features: "torch.Tensor", real_features: "torch.Tensor",
                     k: int = PRC_NEIGHBORHOOD) -> dict:
    """{'precision', 'recall', 'f_score'} of a generated set against a real one (features [N, D]).

    Each set needs more than k images (a ball reaches the k-th neighbour besides the point itself).
    """
    from torch_fidelity.metric_prc import (KEY_METRIC_F_SCORE, KEY_METRIC_PRECISION, KEY_METRIC_RECALL,
                                           prc_features_to_metric)

    if k < 1:
        raise UserInputError(f"precision/recall needs k >= 1, got {k}")
    for features, what in ((fake_features, "the fake set"), (real_features, "the real set")):
        if len(features) <= k:
            raise UserInputError(f"precision/recall with k = {k} needs at least {k + 1} images per set; "
                                 f"{what} has {len(features)}")
    metric = prc_features_to_metric(fake_features.float().cpu(), real_features.float().cpu(),
                                    prc_neighborhood=k, prc_batch_size=PRC_BATCH_SIZE, save_cpu_ram=False,
                                    verbose=False)
    return {"precision": float(metric[KEY_METRIC_PRECISION]), "recall": float(metric[KEY_METRIC_RECALL]),
            "f_score": float(metric[KEY_METRIC_F_SCORE])}
