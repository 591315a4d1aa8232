"""Exact-count selection masks and seeded random streams shared by the kernels."""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Callable

import torch

from evomerge.kernels.bracket import Bracket, Settled, in_eager, sample_positions


def exact_count(fraction: float, n: int) -> int:
    """``floor(fraction * n)`` computed so float error cannot lose one (0.29 * 100 gives 29, not 28)."""
    return min(n, max(0, math.floor(round(fraction * n, 6))))


BLOCK = 1 << 18  # elements per chunk of eager chunked merging (1 MiB of float32)


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
    settled = None
    if flat.dtype == torch.float32 and n >= (1 << 16) and in_eager(flat.device):
        bracket = Bracket(k, n, flat[sample_positions(n)])
        bracket.observe(flat, 0)
        settled = bracket.resolve()
    if settled is not None and settled.cut is not None:  # the kept ties end at a known position
        mask = flat > settled.threshold
        mask[: settled.cut] |= flat[: settled.cut] == settled.threshold
        return mask.view(magnitude.shape)
    if settled is not None:
        threshold, above, equal = settled.threshold, settled.above, settled.ties
    else:
        threshold, above, equal = kth_largest(flat, k)
    mask = flat >= threshold
    extra = above + equal - k
    if extra > 0:  # more values equal the threshold than fit: drop the ones at the highest indices
        ties = torch.nonzero(flat == threshold).squeeze(1)
        mask[ties[equal - extra:]] = False
    return mask.view(magnitude.shape)


def _float(bits: int) -> float:
    """The float32 with this bit pattern."""
    return struct.unpack("<f", struct.pack("<I", bits))[0]


class StreamTopK:
    """Exact top-k of non-negative float32 values seen chunk by chunk, with the same result as top_k_mask.

    Settled either from a sampled bracket and one counting pass (``settle`` with a Bracket's result), or by
    two histogram passes over the chunks (``observe_high`` on all, then ``observe_low`` on all, then
    ``finish``). Then ``mask`` is called on the chunks in order, admitting values equal to the threshold
    lowest index first until k are kept.
    """

    def __init__(self, k: int, n: int, device: torch.device | str = "cpu"):
        self.k, self.n, self.device = k, n, device
        self.trivial = k <= 0 or k >= n
        self._high = self._low = None  # histograms, allocated by the passes that need them
        self.bucket = self.above = self.threshold = self.ties_wanted = self.ties_total = self.cut = None
        self.ties_seen = 0
        self.position = 0  # where the next chunk given to ``mask`` starts

    @property
    def high(self) -> torch.Tensor:
        if self._high is None:
            self._high = torch.zeros(1 << 15, dtype=torch.int64, device=self.device)
        return self._high

    @property
    def low(self) -> torch.Tensor:
        if self._low is None:
            self._low = torch.zeros(1 << 16, dtype=torch.int64, device=self.device)
        return self._low

    def settle(self, settled: Settled) -> None:
        """Fix the selection from its threshold, the counts above and equal to it, and maybe the tie cut."""
        self.threshold = settled.threshold
        self.ties_wanted = self.k - settled.above
        self.ties_total = settled.ties
        self.cut = settled.cut

    def observe_high(self, magnitude: torch.Tensor) -> None:
        self.add_high(torch.bincount(magnitude.reshape(-1).view(torch.int32) >> 16, minlength=1 << 15))

    def add_high(self, counts: torch.Tensor) -> None:
        """First pass, from a histogram of the top 16 bits computed elsewhere (a fused kernel)."""
        self.high.add_(counts)

    def choose_bucket(self) -> None:
        self.bucket, self.above = _bucket_from_counts(self.high, self.k)

    def observe_low(self, magnitude: torch.Tensor) -> None:
        bits = magnitude.reshape(-1).view(torch.int32)
        self.add_low(torch.bincount(bits[(bits >> 16) == self.bucket] & 0xFFFF, minlength=1 << 16))

    def add_low(self, counts: torch.Tensor) -> None:
        """Second pass, from a histogram of the low 16 bits of the bucket's values computed elsewhere."""
        self.low.add_(counts[: 1 << 16])

    def bucket_range(self) -> tuple[float, float, float, float]:
        """After ``choose_bucket``: (lo, hi, f1, f2) with the bucket's values v in [lo, hi), and the low 16 bits
        of v's pattern equal to (v - lo) * f1 * f2 exactly (f1 * f2 = 1 / ulp, split to stay in range)."""
        exponent = max(1, self.bucket >> 7)  # subnormals share the ulp of the smallest exponent
        scale = 150 - exponent  # 1 / ulp = 2^scale for values with this exponent
        return _float(self.bucket << 16), _float((self.bucket + 1) << 16), 2.0 ** (scale // 2), \
            2.0 ** (scale - scale // 2)

    def finish(self) -> None:
        sub, above_in_bucket = _bucket_from_counts(self.low, self.k - self.above)
        self.settle(Settled(_float((self.bucket << 16) | sub), self.above + above_in_bucket, int(self.low[sub]), None))
        self._high = self._low = None

    def mask(self, magnitude: torch.Tensor) -> torch.Tensor:
        """The next chunk's keep mask as float32 1.0 / 0.0 (eager CPU torch is much faster on floats)."""
        start = self.position
        self.position += magnitude.numel()
        if self.trivial:
            return torch.full_like(magnitude, float(self.k > 0), dtype=torch.float32)
        if self.ties_wanted == self.ties_total or (self.cut is not None and self.cut >= self.position):
            return torch.ge(magnitude, self.threshold, out=torch.empty_like(magnitude, dtype=torch.float32))
        keep = torch.gt(magnitude, self.threshold, out=torch.empty_like(magnitude, dtype=torch.float32))
        if self.cut is not None:  # the kept ties end at a known position
            if self.cut > start:
                head = keep.view(-1)[: self.cut - start]
                head.add_(torch.eq(magnitude.reshape(-1)[: self.cut - start], self.threshold,
                                   out=torch.empty_like(head)))
            return keep
        ties = torch.eq(magnitude, self.threshold, out=torch.empty_like(keep)).view(-1)
        count = int(ties.sum())
        take = self.ties_wanted - self.ties_seen  # ties still to keep, lowest index first
        if count and take > 0:
            if count > take:  # the last kept tie is in this chunk: keep the first `take` of its ties
                ties.mul_(ties.cumsum(0).le_(take))  # float counts are exact below 2^24
            keep.view(-1).add_(ties)
        self.ties_seen += count
        return keep

    @property
    def bound(self) -> float:
        """The threshold as the fused kernels use it: values above it, or equal at positions below
        ``tie_cut``, are kept (every value above -1 when all are kept, none above +inf when none are)."""
        if self.trivial:
            return -1.0 if self.k > 0 else math.inf
        return self.threshold

    def tie_cut(self, start: int, end: int, count: Callable[[], int], nth: Callable[[int], int]) -> int:
        """For chunk [start, end), called on the chunks in order: the position bound below which values equal
        to the threshold are kept. ``count()``: how many equal it in the chunk; ``nth(j)``: the position of
        the j-th of them (1-based). Both are called only while the chunk decides where the ties end."""
        if self.trivial or self.ties_wanted == self.ties_total:
            return 1 << 62
        if self.cut is not None:
            return self.cut
        remaining = self.ties_wanted - self.ties_seen
        if remaining <= 0:
            return 0
        found = count()
        if found <= remaining:
            self.ties_seen += found
            return end
        self.ties_seen += remaining
        return nth(remaining) + 1


_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons' hash prospector), in place on int64 values in [0, 2^32): a bijection of them.

    The second multiplier 0x846CA68B is applied as its negative residue 0x846CA68B - 2^32, which gives the
    same product mod 2^32 while keeping every int64 product below 2^63 in magnitude (no overflow).
    """
    x.bitwise_xor_(x >> 16).mul_(0x7FEB352D).bitwise_and_(_M32)
    x.bitwise_xor_(x >> 15).mul_(-0x7B935975).bitwise_and_(_M32)
    return x.bitwise_xor_(x >> 16)


def hashed_uniform(low: torch.Tensor, k1, k2) -> torch.Tensor:
    """Uniform [0, 1) float32 draws for int64 positions ``low`` in [0, 2^32) of the stream keyed (k1, k2).

    A counter-based generator: each draw is a hash of its position, (lowbias32(position ^ k1) ^ k2) / 2^32
    to 24 bits, so any chunking of a tensor draws the same values, and a fused (compiled) kernel computes
    them with the same integer operations. One round of the hash: within a stream it is a bijection of the
    positions with full avalanche; streams of different keys see it at positions that differ in the bits
    of k1 ^ k1'. The keys are ints or 0-d int64 tensors in [0, 2^32); draws are multiples of 2^-24.
    """
    x = _mix32(low.bitwise_xor(k1)).bitwise_xor_(k2)
    return (x >> 8).to(torch.float32).mul_(2.0 ** -24)


def stream_keys(seed: int, model_id: str, tensor_name: str, start: int = 0) -> tuple[int, int]:
    """The hash keys (k1, k2) of one (seed, model, tensor) stream for positions in the 2^32-window of ``start``."""
    key = stream_seed(seed, model_id, tensor_name)
    return key & _M32, ((key >> 32) ^ (start >> 32)) & _M32


def uniform(seed: int, model_id: str, tensor_name: str, start: int, end: int,
            device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform [0, 1) float32 draws for flat positions [start, end) of a tensor.

    Seeded by (seed, model, tensor) and computed from each position alone (``hashed_uniform``), so a
    chunked merge, a fused kernel and a whole-tensor merge draw identical values. Works BLOCK positions
    at a time to bound the int64 temporaries.
    """
    out = torch.empty(max(0, end - start), dtype=torch.float32, device=device)
    a = start
    while a < end:
        b = min(end, a + BLOCK, (a | _M32) + 1)  # a piece never crosses a 2^32 boundary
        k1, k2 = stream_keys(seed, model_id, tensor_name, a)
        low = torch.arange(a & _M32, (a & _M32) + (b - a), dtype=torch.int64, device=device)
        out[a - start:b - start] = hashed_uniform(low, k1, k2)
        a = b
    return out


def stream_seed(seed: int, model_id: str, tensor_name: str) -> int:
    """A 63-bit seed derived from (run seed, model identity, tensor name), independent of order."""
    digest = hashlib.sha256(f"{seed}\x00{model_id}\x00{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(seed: int, model_id: str, tensor_name: str, device: torch.device | str) -> torch.Generator:
    """A torch generator on ``device`` for one (seed, model, tensor). Bits match on the same device type."""
    g = torch.Generator(device=device)
    g.manual_seed(stream_seed(seed, model_id, tensor_name))
    return g
