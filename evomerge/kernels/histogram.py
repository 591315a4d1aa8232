"""Exact magnitude histograms of one task vector, for top-k selections that can be reused.

A TIES merge keeps the k largest |x - base| of every source tensor. The histogram here counts those
magnitudes by key, the top 16 bits of their float32 pattern (a bfloat16 truncation: 128 keys per octave,
monotone), and separately the "impure" ones, which are not exactly their key's value. A key's bucket is
[value, next key's value): every pure member equals its bottom, every impure member lies above it. From the
histogram, any k is located in microseconds: the bucket holding the k-th largest, how many magnitudes
lie above it, how many in it. When the k-th largest is a pure member (the usual case: differences of
bfloat16 checkpoints mostly fit in 8 significant bits) it and its ties are known exactly at once;
otherwise it lies among the bucket's few impure members, whose open interval is an exact bracket for one
counting pass (kernels/bracket.py).

Built by one pass over the chunks (a fused kernel computes keys, a bincount counts them), and independent of k: a
search that merges the same sources with new densities builds it once per tensor (see merge.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

KEYS = 1 << 15  # top-16-bit patterns of non-negative float32 values (NaN's lie above +inf's, 0x7F80)
IMPURE_MARK = 0x4000  # bit pattern of bfloat16 2.0; keys of magnitudes below 2.0 lie below it


def _from_bits(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def key_value(key: int) -> float:
    """The value of bucket ``key``'s pure members: the float32 with bits ``key << 16``."""
    return _from_bits(key << 16)


def impure_bounds(key: int) -> tuple[float, float]:
    """The smallest and largest float32 that truncate to ``key`` without equalling its value (any finite key)."""
    return _from_bits((key << 16) + 1), _from_bits(((key + 1) << 16) - 1)


@dataclass(frozen=True)
class Located:
    """Where the k-th largest magnitude lies: its bucket's key, how many magnitudes lie in higher buckets, how
    many in this one, and how many of those are impure (above the key's value)."""

    key: int
    above: int
    count: int
    impure: int

    @property
    def value(self) -> float:
        return key_value(self.key)


class MagnitudeHistogram:
    """Counts of |x - base| by key over one tensor, stored for the keys in use only (about a thousand for a
    task vector: 128 keys per octave), so a model's worth costs little next to its weights."""

    def __init__(self, counts: torch.Tensor, impure: torch.Tensor | None):
        counts = counts.to(torch.int64).cpu()
        used = torch.nonzero(counts).view(-1)
        self.n = int(counts.sum())
        self.keys = used.to(torch.int32)
        self.counts = counts[used]
        # minus the number of magnitudes with key >= keys[j]: ascending, for a binary search
        self._minus_at_or_above = (-self.counts.flip(0).cumsum(0).flip(0)).numpy()
        self.impure = None if impure is None else impure.to(torch.int64).cpu()[used]

    @property
    def nbytes(self) -> int:
        return self._minus_at_or_above.nbytes + sum(t.numel() * t.element_size() for t in (
            self.keys, self.counts, self.impure) if t is not None)

    def locate(self, k: int) -> Located:
        """The key of the k-th largest magnitude (1 <= k <= n)."""
        if not 1 <= k <= self.n:
            raise ValueError(f"k must lie in [1, {self.n}], got {k}")
        j = int(np.searchsorted(self._minus_at_or_above, -k, side="right")) - 1  # the last with >= k at or above
        count = int(self.counts[j])
        impure = 0 if self.impure is None else int(self.impure[j])
        return Located(int(self.keys[j]), -int(self._minus_at_or_above[j]) - count, count, impure)


class HistogramBuilder:
    """Accumulates one histogram from chunks of keys (``add``), then ``finish``."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.counts = torch.zeros(KEYS, dtype=torch.int64, device=device)
        self.impure: torch.Tensor | None = None

    def add(self, keys: torch.Tensor, marks: torch.Tensor | None, largest: float) -> None:
        """One chunk: int16 ``keys`` of its magnitudes, int16 ``marks`` that are IMPURE_MARK where the magnitude
        is impure and 0 elsewhere (None: all are pure), and its largest magnitude.

        Magnitudes below 2.0 (keys below IMPURE_MARK, the usual case) are counted by one bincount of key +
        mark; a bincount of the impure keys alone would spend most of its time incrementing one bin."""
        if marks is None:
            self.counts.add_(torch.bincount(keys, minlength=KEYS)[:KEYS])
            return
        if self.impure is None:
            self.impure = torch.zeros_like(self.counts)
        if largest < 2.0:
            both = torch.bincount(keys + marks, minlength=2 * IMPURE_MARK)
            self.counts[:IMPURE_MARK].add_(both[:IMPURE_MARK]).add_(both[IMPURE_MARK:])
            self.impure[:IMPURE_MARK].add_(both[IMPURE_MARK:])
        else:
            self.counts.add_(torch.bincount(keys, minlength=KEYS)[:KEYS])
            self.impure.add_(torch.bincount(keys[marks != 0], minlength=KEYS)[:KEYS])

    def finish(self) -> MagnitudeHistogram:
        return MagnitudeHistogram(self.counts, self.impure)
