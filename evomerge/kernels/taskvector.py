"""The task-vector family as one pipeline, configured per method (kernels.md, "One pipeline").

    t_i' = sparsify(t_i)            per-model or joint selection of delta entries
    t_i' = w_i * t_i'               given weights, or energy weights (SCE)
    m_i  = consensus(t_1'..t_N')    none | sign election (TIES) | agreement masks (TALL)
    out  = sum_i m_i t_i'  [/ sum_i w_i m_i if normalize; a zero divisor becomes 1]
    out  = b + lam * out

TIES, DARE, DELLA, breadcrumbs, SCE and consensus merging are configurations of it, not copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from evomerge.kernels.params import MethodParams, param
from evomerge.kernels.registry import TensorContext, register
from evomerge.kernels.select import exact_count, generator, top_k_mask, uniform

# ---------------------------------------------------------------- parameter models

WEIGHT = dict(ge=-10.0, le=10.0, search=(0.0, 1.0), doc="multiplier of this model's task vector")


class WeightParams(MethodParams):
    weight: float = param(1.0, **WEIGHT)


class DensityParams(MethodParams):
    weight: float = param(1.0, **WEIGHT)
    density: float = param(1.0, ge=0.0, le=1.0, search=(0.1, 1.0), doc="fraction of delta entries kept")


class DropParams(MethodParams):
    weight: float = param(1.0, **WEIGHT)
    density: float = param(1.0, ge=0.01, le=1.0, search=(0.1, 1.0),
                           doc="keep probability; kept entries are rescaled by 1/density (floor 0.01)")


class DellaParams(DropParams):
    epsilon: float = param(0.1, ge=0.0, le=0.5, search=(0.0, 0.2),
                           doc="keep probability spread: density-eps for the smallest, density+eps for the largest")


class BreadcrumbsParams(DensityParams):
    gamma: float = param(0.01, ge=0.0, le=1.0, search=(0.0, 0.1),
                         doc="fraction of largest-magnitude entries dropped (density 1 keeps everything)")


class SumParams(MethodParams):
    lam: float = param(1.0, ge=0.0, le=10.0, search=(0.3, 1.5), doc="scale of the merged task vector")
    normalize: bool = param(False, doc="divide by the sum of weights (over agreeing entries for TIES)")


class MeanParams(SumParams):
    normalize: bool = param(True, doc="divide by the sum of weights (over agreeing entries for TIES)")


Rescale = Literal["inverse", "l1", "none"]
RESCALE_DOC = "kept entries: inverse = divide by the keep probability (papers); l1 = restore the tensor's L1 norm (mergekit); none"


class DropSumParams(SumParams):
    rescale: Rescale = param("inverse", doc=RESCALE_DOC)


class DropMeanParams(MeanParams):
    rescale: Rescale = param("inverse", doc=RESCALE_DOC)


class SceParams(MethodParams):
    lam: float = param(1.0, ge=0.0, le=10.0, search=(0.3, 1.5), doc="scale of the merged task vector")
    select_topk: float = param(1.0, gt=0.0, le=1.0, search=(0.1, 1.0),
                               doc="fraction of positions kept, by variance across models")


class ConsensusParams(MethodParams):
    lam: float = param(1.0, ge=0.0, le=10.0, search=(0.3, 1.5), doc="scale of the merged task vector")
    mask_ratio: float = param(0.4, ge=0.0, le=5.0, search=(0.2, 0.6),
                              doc="TALL mask: keep |t_i| > mask_ratio * |t_sum - t_i|")
    min_agree: int = param(2, ge=1, le=64, doc="positions kept where at least this many TALL masks agree")


# ---------------------------------------------------------------- strategies


class Sparsifier:
    """Selects delta entries; may work per model or jointly across models."""

    def apply(self, ts: list[torch.Tensor], mps, gp, ctx: TensorContext) -> list[torch.Tensor]:
        return ts


class Magnitude(Sparsifier):
    """Keep exactly floor(density * numel) entries of largest magnitude (TIES trimming)."""

    def apply(self, ts, mps, gp, ctx):
        for t, mp in zip(ts, mps, strict=True):
            if mp.density < 1.0:
                t.mul_(top_k_mask(t.abs(), exact_count(mp.density, t.numel())))
        return ts


def drop_and_rescale(t: torch.Tensor, keep: torch.Tensor, prob: float | torch.Tensor, rescale: str) -> torch.Tensor:
    """Zero the dropped entries of ``t`` in place and rescale the kept ones (see RESCALE_DOC).

    ``keep``: a mask, boolean or (faster in eager CPU torch) float 1.0 / 0.0.
    """
    if rescale == "l1":
        before = float(t.abs().sum())
        t.mul_(keep)
        after = float(t.abs().sum())
        return t.mul_(before / after) if before >= 1e-7 and after >= 1e-7 else t
    t.mul_(keep)
    return t.div_(prob) if rescale == "inverse" else t


def dare_apply(t: torch.Tensor, keep: torch.Tensor, density: float) -> torch.Tensor:
    """DARE on a given keep mask: zero dropped entries, rescale kept ones by 1/density (in place)."""
    return drop_and_rescale(t, keep, density, "inverse")


class RandomDrop(Sparsifier):
    """DARE: keep each entry with probability density (seeded per model and tensor)."""

    def apply(self, ts, mps, gp, ctx):
        for i, (t, mp) in enumerate(zip(ts, mps, strict=True)):
            if mp.density < 1.0:
                u = uniform(ctx.seed, ctx.model_ids[i], ctx.name, 0, t.numel(), t.device).view(t.shape)
                drop_and_rescale(t, u.lt_(mp.density), mp.density, gp.rescale)
        return ts


def della_keep_probs(magnitude: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Per-row keep probabilities rising linearly with magnitude rank from density-eps to density+eps."""
    rows = magnitude.reshape(-1, magnitude.shape[-1]) if magnitude.dim() > 0 else magnitude.reshape(1, 1)
    n = rows.shape[-1]
    if n == 1:
        return torch.full_like(magnitude, density)
    order = torch.argsort(rows, dim=-1, stable=True)
    ramp = torch.linspace(density - epsilon, density + epsilon, n, device=rows.device, dtype=rows.dtype)
    probs = torch.empty_like(rows).scatter_(-1, order, ramp.expand_as(rows))
    return probs.clamp_(0.01, 1.0).view(magnitude.shape)


class RankedDrop(Sparsifier):
    """DELLA: magnitude-ranked keep probabilities per row, kept entries rescaled by 1/p."""

    def apply(self, ts, mps, gp, ctx):
        for i, (t, mp) in enumerate(zip(ts, mps, strict=True)):
            if mp.density >= 1.0 and mp.epsilon == 0.0:
                continue
            probs = della_keep_probs(t.abs(), mp.density, mp.epsilon)
            g = generator(ctx.seed, ctx.model_ids[i], ctx.name, t.device)
            keep = torch.rand(t.shape, generator=g, device=t.device).lt_(probs)
            drop_and_rescale(t, keep, probs, gp.rescale)
        return ts


def band_counts(mp, n: int) -> tuple[int, int]:
    """Breadcrumbs: how many entries are kept, and how many of the largest are dropped above them."""
    keep_count = exact_count(mp.density, n)
    return keep_count, min(exact_count(mp.gamma, n), n - keep_count)


class MagnitudeBand(Sparsifier):
    """Breadcrumbs: keep exactly floor(density * n) entries, dropping the top gamma fraction by magnitude
    and the rest from the bottom (if density + gamma > 1 the top cut shrinks so density still holds)."""

    def apply(self, ts, mps, gp, ctx):
        for t, mp in zip(ts, mps, strict=True):
            if mp.density >= 1.0:
                continue
            keep_count, n_top = band_counts(mp, t.numel())
            mag = t.abs()
            t.mul_(top_k_mask(mag, keep_count + n_top) & ~top_k_mask(mag, n_top))
        return ts


class VarianceTopK(Sparsifier):
    """SCE select: keep the top fraction of varying positions (by variance across models), one mask for all."""

    def apply(self, ts, mps, gp, ctx):
        if gp.select_topk >= 1.0 or len(ts) < 2:
            return ts
        mean = sum(ts) / len(ts)
        var = sum((t - mean).square_() for t in ts)
        keep = top_k_mask(var, exact_count(gp.select_topk, int(torch.count_nonzero(var))))
        for t in ts:
            t.masked_fill_(~keep, 0.0)
        return ts


class Consensus:
    """Per-model masks m_i over the weighted task vectors; None means all ones."""

    def masks(self, ts, gp) -> list[torch.Tensor] | torch.Tensor | None:
        return None


class SignElection(Consensus):
    """TIES: elect sign(sum_i w_i t_i') per entry (0 goes to +); keep entries agreeing with it."""

    def masks(self, ts, gp):
        # t agrees with the elected sign s (+1 where the sum is >= 0, else -1) exactly when t * s > 0;
        # zeros (trimmed or unchanged entries) never agree. The sum starts at int 0, so it is never -0.0
        # and copysign gives s. Float 1.0 / 0.0 masks: eager CPU torch is several times slower on bools.
        total = sum(ts)
        elected = torch.ones_like(total).copysign_(total)
        return [torch.mul(t, elected).gt_(0) for t in ts]


class Agreement(Consensus):
    """TALL masks: m_i = |t_i| > l |t_sum - t_i|; keep positions where at least k masks agree."""

    def masks(self, ts, gp):
        total = sum(ts)
        count = torch.zeros_like(total, dtype=torch.int32)
        for t in ts:
            count += (t.abs() > gp.mask_ratio * (total - t).abs()).to(torch.int32)
        return count >= gp.min_agree


# ---------------------------------------------------------------- the pipeline


@dataclass(frozen=True)
class TaskVectorPipeline:
    sparsifier: Sparsifier
    consensus: Consensus
    energy_weights: bool = False
    normalize: bool | None = None  # None: the method's `normalize` parameter decides

    @property
    def elementwise(self) -> bool:
        """No selection, no consensus: each output entry depends on the same entry of the inputs only."""
        return type(self.sparsifier) is Sparsifier and type(self.consensus) is Consensus and not self.energy_weights

    @staticmethod
    def one_pass_coefficients(mps, gp) -> tuple[float, list[float]] | None:
        """(1 - c W, [c w_i]) of the one-pass form b (1 - c W) + sum_i c w_i x_i, or None to use task vectors."""
        weights = [mp.weight for mp in mps]
        total = sum(weights)
        c = gp.lam / (total if total != 0 else 1.0) if gp.normalize else gp.lam
        # The one-pass form rounds at the scale of c * sum|w_i| * |x|, not of the task vectors: take it only
        # while that amplification is modest (normalizing by a near-zero sum of weights would swamp t_i).
        if abs(c) * sum(abs(w) for w in weights) > 16.0:
            return None
        return 1.0 - c * total, [c * w for w in weights]

    def keeps_inputs(self, mps, gp) -> bool:
        """Whether a call with these parameters never writes into its input tensors (the one-pass form:
        base times one coefficient plus the weighted sources, into a new tensor)."""
        return self.elementwise and self.one_pass_coefficients(mps, gp) is not None

    @staticmethod
    def _one_pass(xs, base, mps, gp):
        coefficients = TaskVectorPipeline.one_pass_coefficients(mps, gp)
        if coefficients is None:
            return None
        # b + c * sum_i w_i (x_i - b) computed as b (1 - c W) + c sum_i w_i x_i: one pass per input.
        out = base.mul(coefficients[0])
        for x, alpha in zip(xs, coefficients[1], strict=True):
            out.add_(x, alpha=alpha)
        return out

    def __call__(self, xs, base, mps, gp, ctx):
        if self.elementwise:
            out = self._one_pass(xs, base, mps, gp)
            if out is not None:
                return out
        ts = [x.sub_(base) for x in xs]
        return self.combine(self.sparsifier.apply(ts, mps, gp, ctx), base, mps, gp)

    def combine(self, ts, base, mps, gp):
        """Weights, consensus, normalization and lam over sparsified task vectors (entrywise but for SCE)."""
        weights = [mp.weight for mp in mps]
        masks = None
        if self.energy_weights:
            masks = self.consensus.masks(ts, gp)  # SCE elects signs on the unweighted deltas
            energy = [w * float(t.square().mean()) for w, t in zip(weights, ts, strict=True)]
            total = sum(energy)
            weights = [e / total for e in energy] if total > 0 else [1.0 / len(ts)] * len(ts)
        for t, w in zip(ts, weights, strict=True):
            t.mul_(w)
        if masks is None:
            masks = self.consensus.masks(ts, gp)
        normalize = gp.normalize if self.normalize is None else self.normalize
        if masks is None:
            out = sum(ts)
            if normalize:
                divisor = sum(weights)
                out = out / (divisor if divisor != 0 else 1.0)
        elif isinstance(masks, torch.Tensor):
            out = sum(ts).mul_(masks)
        else:
            out = torch.zeros_like(base)
            divisor = torch.zeros_like(base) if normalize else None
            for t, m, w in zip(ts, masks, weights, strict=True):
                out.add_(t.mul_(m))
                if divisor is not None:
                    divisor.add_(m, alpha=w)
            if divisor is not None:  # a zero divisor becomes 1
                out.div_(divisor.add_(torch.eq(divisor, 0, out=torch.empty_like(divisor))))
        return base + gp.lam * out if gp.lam != 1.0 else out.add_(base)


def _pipeline(name, sparsifier, consensus, model_params, global_params, *, randomized=False, paper="",
              summary="", energy=False, normalize=None, min_models=1):
    pipeline = TaskVectorPipeline(sparsifier, consensus, energy, normalize)
    register(name, model_params=model_params, global_params=global_params, base="required", randomized=randomized,
             paper=paper, summary=summary, min_models=min_models, elementwise=pipeline.elementwise)(pipeline)


TA = "https://arxiv.org/abs/2212.04089"
TIES = "https://arxiv.org/abs/2306.01708"
DARE = "https://arxiv.org/abs/2311.03099"
DELLA = "https://arxiv.org/abs/2406.11617"
BREADCRUMBS = "https://arxiv.org/abs/2312.06795"

_pipeline("task_arithmetic", Sparsifier(), Consensus(), WeightParams, SumParams, paper=TA,
          summary="b + lam * sum_i w_i t_i")
_pipeline("ties", Magnitude(), SignElection(), DensityParams, MeanParams, paper=TIES,
          summary="trim to top-k by magnitude, elect signs, disjoint mean")
_pipeline("dare_linear", RandomDrop(), Consensus(), DropParams, DropSumParams, randomized=True, paper=DARE,
          summary="random drop with 1/density rescale, then weighted sum")
_pipeline("dare_ties", RandomDrop(), SignElection(), DropParams, DropMeanParams, randomized=True, paper=DARE,
          summary="random drop with 1/density rescale, then TIES sign election and disjoint mean")
_pipeline("della", RankedDrop(), SignElection(), DellaParams, DropMeanParams, randomized=True, paper=DELLA,
          summary="magnitude-ranked random drop per row, then TIES sign election")
_pipeline("della_linear", RankedDrop(), Consensus(), DellaParams, DropSumParams, randomized=True, paper=DELLA,
          summary="magnitude-ranked random drop per row, then weighted sum")
_pipeline("breadcrumbs", MagnitudeBand(), Consensus(), BreadcrumbsParams, SumParams, paper=BREADCRUMBS,
          summary="drop largest and smallest deltas, weighted sum")
_pipeline("breadcrumbs_ties", MagnitudeBand(), SignElection(), BreadcrumbsParams, MeanParams, paper=BREADCRUMBS,
          summary="drop largest and smallest deltas, TIES sign election")
_pipeline("sce", VarianceTopK(), SignElection(), WeightParams, SceParams, energy=True, normalize=True,
          min_models=2,
          paper="https://arxiv.org/abs/2408.07990",
          summary="select high-variance positions, energy weights, sign election, normalized sum")
_pipeline("consensus", Sparsifier(), Agreement(), WeightParams, ConsensusParams, normalize=False,
          paper="https://arxiv.org/abs/2405.07813", summary="TALL masks: keep entries at least k tasks rely on")
