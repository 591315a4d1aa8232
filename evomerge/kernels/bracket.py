"""The exact k-th largest of non-negative values in one pass, from a bracket guessed on a sample.

A fixed strided sample of the values gives order statistics ``lo <= hi`` that enclose the k-th
largest with high probability (SIGMAS binomial standard deviations of margin on either side). One pass
over the values, in any chunks, counts those above ``hi``, equal to ``hi``, equal to ``lo`` and below
``lo``, and gathers the positions and values strictly between (a few percent of them). If the k-th
largest lies within [lo, hi] it is then found exactly: among the gathered values, with the position of
the last tie kept (ties go to the lowest positions), or at an endpoint, with the count of its ties only.
Otherwise (an unlucky sample, NaN, values spread so that the counts do not add up) ``resolve`` says so
and the caller runs the exact histogram passes (select.StreamTopK): the sample decides the speed, never
the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SAMPLE = 1 << 14  # sample size for large tensors: the bracket holds about 4 / sqrt(SAMPLE) of the values
SIGMAS = 5.0  # margin on either side of the sample's estimate, in binomial standard deviations
EAGER_CPU = False  # whether eager torch code on the CPU settles selections by brackets (see ``in_eager``)


def in_eager(device: torch.device | str) -> bool:
    """Whether eager torch code on ``device`` should settle a selection by a bracket. Not on the CPU: there
    eager boolean comparisons make the counting pass slower than the histogram passes (measured on the
    135M-parameter bench, single thread: 4.1 s against 2.5 s per TIES merge); fused kernels always do."""
    return torch.device(device).type != "cpu" or EAGER_CPU


@dataclass(frozen=True)
class Settled:
    """The k-th largest value ``threshold``, how many values lie above it and how many equal it; ``cut``:
    the position bound below which its ties are kept (None when the ties were counted, not gathered)."""

    threshold: float
    above: int
    ties: int
    cut: int | None


def sample_positions(n: int) -> slice:
    """About min(n, SAMPLE) evenly strided positions in [0, n): a view, no index gather. The stride has no
    prime factor below 11, so on a tensor whose rows have 2^a 3^b 5^c 7^d entries (the usual sizes) the
    sample visits every column rather than a few."""
    if n <= SAMPLE:
        return slice(0, n, 1)
    stride = -(-n // SAMPLE)
    while math.gcd(stride, 210) != 1:
        stride += 1
    return slice(stride // 2, n, stride)


def delta_magnitude(x: torch.Tensor, base: torch.Tensor, positions: torch.Tensor | slice | None = None) \
        -> torch.Tensor:
    """|x - base| in float32 at ``positions`` of flat stored-dtype tensors (the kernels' own arithmetic)."""
    if positions is not None:
        x, base = x[positions], base[positions]
    return (x.float() - base.float()).abs_()


class Bracket:
    """One selection of the k largest of n values: the sampled bracket, then one observing pass."""

    def __init__(self, k: int, n: int, sample: torch.Tensor):
        if not 0 < k < n:
            raise ValueError(f"a bracket needs 0 < k < n, got k={k}, n={n}")
        sample = sample.reshape(-1).float()
        s = sample.numel()
        p = k / n
        expected = p * s  # sample values at or above the k-th largest, on average
        margin = SIGMAS * math.sqrt(s * p * (1.0 - p)) + 4.0
        upper, lower = math.floor(expected - margin), math.ceil(expected + margin)
        self._start(k, n, float(torch.kthvalue(sample, s - lower + 1).values) if lower <= s else -math.inf,
                    float(torch.kthvalue(sample, s - upper + 1).values) if upper >= 1 else math.inf)

    @classmethod
    def between(cls, k: int, n: int, lo: float, hi: float) -> Bracket:
        """A bracket [lo, hi] known to hold the k-th largest (from exact counts): no sample, never missed."""
        bracket = cls.__new__(cls)
        bracket._start(k, n, lo, hi)
        return bracket

    def _start(self, k: int, n: int, lo: float, hi: float) -> None:
        self.k, self.n, self.lo, self.hi = k, n, lo, hi
        self._counts: list[torch.Tensor] = []
        self._positions: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []

    @property
    def bounds(self) -> tuple[float, float]:
        return self.lo, self.hi

    def observe(self, values: torch.Tensor, start: int) -> None:
        """Count and gather one chunk of float32 values that begins at flat position ``start``."""
        v = values.reshape(-1)
        lo, hi = self.lo, self.hi
        counts = torch.stack([torch.count_nonzero(v > hi), torch.count_nonzero(v == hi),
                              torch.count_nonzero(v == lo), torch.count_nonzero(v < lo)])
        idx = torch.nonzero((v > lo) & (v < hi)).view(-1)
        self.add(counts, idx + start, v[idx])

    def add(self, counts: torch.Tensor, positions: torch.Tensor, values: torch.Tensor) -> None:
        """One chunk's result computed elsewhere (a fused kernel): counts [above hi, equal hi, equal lo, below lo],
        and the flat positions (ascending) and values of the entries strictly inside (lo, hi)."""
        self._counts.append(counts)
        self._positions.append(positions)
        self._values.append(values)

    def resolve(self) -> Settled | None:
        """The exact selection, or None if the k-th largest is outside the bracket (or the counts are off)."""
        above, equal_hi, equal_lo, below = (int(c) for c in torch.stack(self._counts).sum(0).tolist()) \
            if self._counts else (0, 0, 0, 0)
        values = torch.cat(self._values) if self._values else torch.empty(0)
        if self.lo == self.hi:
            equal_lo = 0  # one endpoint: its entries were counted twice
        inside = values.numel()
        if above + equal_hi + inside + equal_lo + below != self.n:
            return None  # NaN somewhere: not every value was ordered against the bracket
        k = self.k
        if k <= above:
            return None
        if k <= above + equal_hi:
            return Settled(self.hi, above, equal_hi, None)
        if k <= above + equal_hi + inside:
            j = k - above - equal_hi  # the threshold is the j-th largest gathered value
            threshold = torch.kthvalue(values, inside - j + 1).values
            ties = torch.nonzero(values == threshold).view(-1)  # ascending: positions are in order
            above_thr = above + equal_hi + int(torch.count_nonzero(values > threshold))
            wanted = k - above_thr
            positions = torch.cat(self._positions)
            cut = int(positions[ties[wanted - 1]]) + 1  # wanted >= 1: fewer than j gathered values exceed it
            return Settled(float(threshold), above_thr, int(ties.numel()), cut)
        if k <= above + equal_hi + inside + equal_lo:
            return Settled(self.lo, above + equal_hi + inside, equal_lo, None)
        return None
