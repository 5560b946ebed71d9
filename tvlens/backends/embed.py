"""The continuous read-in of regression models (``LinearEmbed``), shared by both backends and the loaders."""

from __future__ import annotations

import math

import torch
from torch import nn

from tvlens.errors import ConfigError


class LinearEmbed(nn.Module):
    """Read-in of continuous inputs into the residual stream: ``x @ W_E + b_E``.

    ``W_E`` is ``[d_in, d_model]``, the same layout as a token embedding's ``[d_vocab, d_model]``.
    """

    def __init__(self, d_in: int, d_model: int) -> None:
        super().__init__()
        self.W_E = nn.Parameter(torch.randn(d_in, d_model) / math.sqrt(d_in))
        self.b_E = nn.Parameter(torch.zeros(d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_tensor(x) and x.is_floating_point() and x.ndim == 3):
            raise ConfigError(
                "a regression model takes float inputs of shape [batch, pos, d_in]; "
                f"got {type(x).__name__} {getattr(x, 'shape', '')} {getattr(x, 'dtype', '')}"
            )
        if x.shape[-1] != self.W_E.shape[0]:
            raise ConfigError(f"input dimension {x.shape[-1]} does not fit this model (d_in={self.W_E.shape[0]})")
        return x.to(self.W_E.device) @ self.W_E + self.b_E


def read_in_of(model) -> LinearEmbed | None:
    """A bridge's continuous read-in (regression models), or None."""
    orig = model.__dict__.get("original_model") or getattr(model, "original_model", None)
    return getattr(orig, "tvlens_read_in", None)
