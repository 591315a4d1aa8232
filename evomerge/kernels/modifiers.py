"""Modifiers applied to a merged tensor after its method ran."""

from __future__ import annotations

import torch

from evomerge.kernels.params import MethodParams, param


class DepthScaling(MethodParams):
    """LiNeS (https://arxiv.org/abs/2410.17146): scale the merged task vector by alpha + beta * l/(L-1)."""

    alpha: float = param(1.0, ge=0.0, le=10.0, search=(0.0, 1.0), doc="scale of the first layer and of non-layer tensors")
    beta: float = param(0.0, ge=-10.0, le=10.0, search=(0.0, 1.0), doc="extra scale reached at the last layer")

    def scale(self, depth: float | None) -> float:
        """The factor for a tensor at relative depth ``depth`` (None: outside the layer stack)."""
        return self.alpha if depth is None else self.alpha + self.beta * depth

    def apply(self, merged: torch.Tensor, base: torch.Tensor, depth: float | None) -> torch.Tensor:
        s = self.scale(depth)
        if s == 1.0:
            return merged
        return merged.sub_(base).mul_(s).add_(base)
