"""Task encoding: cached-activation extraction, task vectors and task decodability (TD).

Definitions (Han et al. 2025; DESIGN.md):

- the representation of a prompt at layer ``l`` is the residual stream at its query position (the
  last token before the answer). Layer 0 is the embedding (``blocks.0.hook_resid_pre``), layer
  ``l > 0`` the output of block ``l - 1`` (``blocks.{l-1}.hook_resid_post``): ``n_layers + 1`` layers;
- a task vector of task A at layer l is the mean representation of A's prompts;
- TD at layer l is the leave-one-out k-nearest-neighbour accuracy (k=10, Euclidean, majority vote,
  ties to the lowest task index as scikit-learn) of the prompts' latent task: each prompt is
  classified by its k nearest *other* prompts. ``DecodabilityResult`` carries a bootstrap CI over
  prompts and, on request, the shuffled-label null (``tvlens.stats``).

The package, by concept: ``extraction`` (layers, ``extract``, ``TaskEncodings``), ``vectors`` (``TaskVectors``,
their checks), ``td`` (kNN, ``task_decodability``, ``DecodabilityResult``), ``emergence`` (TD and accuracy across
checkpoints; the training callback). Where a prompt's representation is read: ``tvlens.positions``.
"""

from __future__ import annotations

from tvlens.encoding.emergence import EmergenceResult, emergence, encoding_callback
from tvlens.encoding.extraction import (
    TaskEncodings,
    check_layers,
    extract,
    model_fingerprint,
    n_resid_layers,
    resid_hook_name,
)
from tvlens.encoding.td import DecodabilityResult, check_encodings, knn_loo_neighbors, knn_loo_predict, task_decodability
from tvlens.encoding.vectors import TaskVectors, check_vectors, vector_tasks
from tvlens.positions import AT, check_at, representation_mask

__all__ = [
    "AT",
    "DecodabilityResult",
    "EmergenceResult",
    "TaskEncodings",
    "TaskVectors",
    "check_at",
    "check_encodings",
    "check_layers",
    "check_vectors",
    "emergence",
    "encoding_callback",
    "extract",
    "knn_loo_neighbors",
    "knn_loo_predict",
    "model_fingerprint",
    "n_resid_layers",
    "representation_mask",
    "resid_hook_name",
    "task_decodability",
    "vector_tasks",
]
