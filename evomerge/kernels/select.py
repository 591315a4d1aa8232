"""Exact-count selection masks and seeded random streams shared by the kernels."""

from __future__ import annotations

import hashlib
import math

import torch


def exact_count(fraction: float, n: int) -> int:
    """``floor(fraction * n)`` computed so float error cannot lose one (0.29 * 100 gives 29, not 28)."""
    return min(n, max(0, math.floor(round(fraction * n, 6))))


def top_k_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` largest entries; ties at the threshold go to the lowest indices."""
    n = magnitude.numel()
    if k <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(magnitude, dtype=torch.bool)
    flat = magnitude.reshape(-1)
    threshold = torch.kthvalue(flat, n - k + 1).values
    mask = flat > threshold
    need = k - int(mask.sum())
    if need > 0:
        ties = torch.nonzero(flat == threshold).squeeze(1)[:need]
        mask[ties] = True
    return mask.view(magnitude.shape)


def stream_seed(seed: int, model_id: str, tensor_name: str) -> int:
    """A 63-bit seed derived from (run seed, model identity, tensor name), independent of order."""
    digest = hashlib.sha256(f"{seed}\x00{model_id}\x00{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, model_id: str, tensor_name: str, device: torch.device | str) -> torch.Generator:
    """A torch generator on ``device`` for one (seed, model, tensor). Bits match on the same device type."""
    g = torch.Generator(device=device)
    g.manual_seed(stream_seed(seed, model_id, tensor_name))
    return g
