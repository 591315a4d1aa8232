"""Exact-count selection masks and seeded random streams shared by the kernels."""

from __future__ import annotations

import hashlib
import math

import torch


def exact_count(fraction: float, n: int) -> int:
    """``floor(fraction * n)`` computed so float error cannot lose one (0.29 * 100 gives 29, not 28)."""
    return min(n, max(0, math.floor(round(fraction * n, 6))))


def _select_bucket(keys: torch.Tensor, bins: int, k: int) -> tuple[int, int]:
    """The bucket holding the k-th largest key, and how many keys lie in higher buckets."""
    counts = torch.bincount(keys, minlength=bins)
    at_or_above = counts.flip(0).cumsum(0).flip(0)  # at_or_above[b] = count of keys in buckets >= b
    bucket = int(torch.nonzero(at_or_above >= k).max())
    return bucket, int(at_or_above[bucket] - counts[bucket])


def kth_largest(values: torch.Tensor, k: int) -> tuple[torch.Tensor, int, int]:
    """The k-th largest of non-negative float32 ``values`` (1 <= k <= n), exactly, by radix selection.

    Non-negative IEEE floats order like their bit patterns: a histogram of the top 16 bits finds the
    bucket holding the k-th largest, a histogram of the low 16 bits inside it finds the value. A few
    linear passes, and no selection algorithm to degrade on repeated values (common in bf16 deltas).
    Returns (threshold, count of values above it, count equal to it).
    """
    flat = values.reshape(-1)
    if flat.dtype != torch.float32 or flat.numel() < (1 << 16):
        thr = torch.kthvalue(flat, flat.numel() - k + 1).values
        return thr, int(torch.count_nonzero(flat > thr)), int(torch.count_nonzero(flat == thr))
    bits = flat.view(torch.int32)
    high = bits >> 16
    bucket, above = _select_bucket(high, 1 << 15, k)
    low = bits[high == bucket] & 0xFFFF
    sub, above_in_bucket = _select_bucket(low, 1 << 16, k - above)
    equal = int(torch.count_nonzero(low == sub))
    thr = torch.tensor([(bucket << 16) | sub], dtype=torch.int32, device=flat.device).view(torch.float32)[0]
    return thr, above + above_in_bucket, equal


def top_k_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` largest entries; ties at the threshold go to the lowest indices."""
    n = magnitude.numel()
    if k <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    if k >= n:
        return torch.ones_like(magnitude, dtype=torch.bool)
    flat = magnitude.reshape(-1)
    threshold, above, equal = kth_largest(flat, k)
    mask = flat >= threshold
    extra = above + equal - k
    if extra > 0:  # more values equal the threshold than fit: drop the ones at the highest indices
        ties = torch.nonzero(flat == threshold).squeeze(1)
        mask[ties[equal - extra:]] = False
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
