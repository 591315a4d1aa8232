"""Exact-count selection masks and seeded random streams shared by the kernels."""

from __future__ import annotations

import hashlib
import math
import struct

import torch


def exact_count(fraction: float, n: int) -> int:
    """``floor(fraction * n)`` computed so float error cannot lose one (0.29 * 100 gives 29, not 28)."""
    return min(n, max(0, math.floor(round(fraction * n, 6))))


BLOCK = 1 << 18  # elements per random-stream block and per chunk of chunked merging (1 MiB of float32)


def _select_bucket(keys: torch.Tensor, bins: int, k: int) -> tuple[int, int]:
    """The bucket holding the k-th largest key, and how many keys lie in higher buckets."""
    return _bucket_from_counts(torch.bincount(keys, minlength=bins), k)


def _bucket_from_counts(counts: torch.Tensor, k: int) -> tuple[int, int]:
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


class StreamTopK:
    """Exact top-k of non-negative float32 values seen chunk by chunk, with the same result as top_k_mask.

    Two histogram passes over the chunks (``observe_high`` on all, then ``observe_low`` on all) fix the
    threshold; then ``mask`` is called on the chunks in order, admitting values equal to the threshold
    lowest index first until k are kept.
    """

    def __init__(self, k: int, n: int, device: torch.device | str = "cpu"):
        self.k, self.n = k, n
        self.trivial = k <= 0 or k >= n
        self.high = torch.zeros(1 << 15, dtype=torch.int64, device=device)
        self.low = torch.zeros(1 << 16, dtype=torch.int64, device=device)
        self.bucket = self.above = self.threshold = self.ties_wanted = self.ties_total = None
        self.ties_seen = 0

    def observe_high(self, magnitude: torch.Tensor) -> None:
        self.high += torch.bincount(magnitude.reshape(-1).view(torch.int32) >> 16, minlength=1 << 15)

    def choose_bucket(self) -> None:
        self.bucket, self.above = _bucket_from_counts(self.high, self.k)

    def observe_low(self, magnitude: torch.Tensor) -> None:
        bits = magnitude.reshape(-1).view(torch.int32)
        self.low += torch.bincount(bits[(bits >> 16) == self.bucket] & 0xFFFF, minlength=1 << 16)

    def finish(self) -> None:
        sub, above_in_bucket = _bucket_from_counts(self.low, self.k - self.above)
        self.threshold = struct.unpack("<f", struct.pack("<i", (self.bucket << 16) | sub))[0]
        self.ties_wanted = self.k - self.above - above_in_bucket
        self.ties_total = int(self.low[sub])

    def mask(self, magnitude: torch.Tensor) -> torch.Tensor:
        if self.trivial:
            return torch.full_like(magnitude, self.k > 0, dtype=torch.bool)
        if self.ties_wanted == self.ties_total:
            return magnitude >= self.threshold
        keep = magnitude > self.threshold
        ties = (magnitude == self.threshold).reshape(-1)
        count = int(torch.count_nonzero(ties))
        if count:
            rank = ties.cumsum(0) + self.ties_seen
            keep.view(-1).logical_or_(ties & (rank <= self.ties_wanted))
            self.ties_seen += count
        return keep


def uniform(seed: int, model_id: str, tensor_name: str, start: int, end: int,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform [0, 1) draws for flat positions [start, end) of a tensor; start is a multiple of BLOCK.

    Each BLOCK of positions has its own stream, seeded by (seed, model, tensor, block), so a chunked
    merge and a whole-tensor merge draw identical values.
    """
    if start % BLOCK:
        raise ValueError(f"start {start} is not a multiple of {BLOCK}")
    parts = []
    for block_start in range(start, end, BLOCK):
        size = min(BLOCK, end - block_start)
        g = generator(seed, model_id, f"{tensor_name}#{block_start // BLOCK}", device)
        parts.append(torch.rand(size, generator=g, device=device))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def stream_seed(seed: int, model_id: str, tensor_name: str) -> int:
    """A 63-bit seed derived from (run seed, model identity, tensor name), independent of order."""
    digest = hashlib.sha256(f"{seed}\x00{model_id}\x00{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, model_id: str, tensor_name: str, device: torch.device | str) -> torch.Generator:
    """A torch generator on ``device`` for one (seed, model, tensor). Bits match on the same device type."""
    g = torch.Generator(device=device)
    g.manual_seed(stream_seed(seed, model_id, tensor_name))
    return g
