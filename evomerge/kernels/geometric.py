"""Merge methods outside the task-vector pipeline: averages, spherical interpolation, model stock,
task singular vectors and layer passthrough."""

from __future__ import annotations

import math

import torch

from evomerge.kernels.params import MethodParams, NoParams, param
from evomerge.kernels.registry import register
from evomerge.kernels.taskvector import WeightParams

# ---------------------------------------------------------------- linear (model soup)


class LinearParams(MethodParams):
    normalize: bool = param(True, doc="divide by the sum of weights")


@register("linear", model_params=WeightParams, global_params=LinearParams, base="none", elementwise=True,
          paper="https://arxiv.org/abs/2203.05482", summary="weighted average sum w_i x_i / sum w_i")
def linear(xs, base, mps, gp, ctx):
    out = xs[0].mul_(mps[0].weight)
    for x, mp in zip(xs[1:], mps[1:], strict=True):
        out.add_(x, alpha=mp.weight)
    if gp.normalize:
        total = sum(mp.weight for mp in mps)
        out.div_(total if total != 0 else 1.0)
    return out


# ---------------------------------------------------------------- slerp

DOT_THRESHOLD = 0.9995


class SlerpParams(MethodParams):
    t: float = param(0.5, ge=0.0, le=1.0, search=(0.0, 1.0), doc="0 gives the first source, 1 the second")


STAT_CHUNK = 1 << 18  # entries per float64 partial sum of slerp's norms and dot product (every path alike)


def slerp_stats(a: torch.Tensor, c: torch.Tensor) -> tuple[float, float, float]:
    """|a|, |c| and a.c, accumulated in float64 over fixed chunks of the flattened tensors (any float dtype).

    The chunks are the same whether the tensors are whole float32 copies or stored-dtype views merged
    chunk by chunk, so both paths find the same coefficients and give the same bits. Non-finite exactly
    when an input holds a NaN or infinity (or, for float64 inputs, a sum overflows).
    """
    fa, fc = a.reshape(-1), c.reshape(-1)
    n = fa.numel()
    # One float64 buffer per call, refilled chunk by chunk (not two new float64 copies per chunk); each
    # chunk's dot products are the same calls on the same values as ever, so the sums keep their bits.
    buf = torch.empty(2, min(n, STAT_CHUNK), dtype=torch.float64, device=fa.device)
    aa = cc = ac = 0.0
    for start in range(0, n, STAT_CHUNK):
        m = min(STAT_CHUNK, n - start)
        x, y = buf[0, :m], buf[1, :m]
        x.copy_(fa[start:start + m])
        aa += float(torch.dot(x, x))
        y.copy_(fc[start:start + m])
        cc += float(torch.dot(y, y))
        ac += float(torch.dot(x, y))
    return math.sqrt(aa), math.sqrt(cc), ac


def slerp_coefficients(t: float, a: torch.Tensor, c: torch.Tensor, eps: float = 1e-8) -> tuple[float, float] | None:
    """(s_a, s_c) with slerp = s_a a + s_c c; None where slerp falls back to lerp (nearly (anti)parallel or
    zero tensors). NaN when an input is not finite."""
    return coefficients_from_stats(t, *slerp_stats(a, c), eps)


def coefficients_from_stats(t: float, na: float, nc: float, ac: float,
                            eps: float = 1e-8) -> tuple[float, float] | None:
    """``slerp_coefficients`` from the norms and dot product of ``slerp_stats``."""
    if not math.isfinite(na + nc + ac):
        return (math.nan, math.nan)
    if na <= eps or nc <= eps:
        return None
    dot = ac / (na * nc)
    if abs(dot) > DOT_THRESHOLD:
        return None
    omega = math.acos(max(-1.0, min(1.0, dot)))
    sin_omega = math.sin(omega)
    return math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega


def slerp_tensors(t: float, a: torch.Tensor, c: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two whole tensors; falls back to lerp when nearly (anti)parallel or zero."""
    coef = slerp_coefficients(t, a, c, eps)
    if coef is None:
        return torch.lerp(a, c, t)
    return a.mul_(coef[0]).add_(c, alpha=coef[1])


@register("slerp", global_params=SlerpParams, base="none", min_models=2, max_models=2,
          paper="https://arxiv.org/abs/2212.09849 (SLERP of whole tensors, Shoemake 1985)",
          summary="spherical interpolation between exactly two models")
def slerp(xs, base, mps, gp, ctx):
    return slerp_tensors(gp.t, xs[0], xs[1])


# ---------------------------------------------------------------- karcher mean


class KarcherParams(MethodParams):
    max_iter: int = param(10, ge=1, le=1000, doc="Riemannian gradient iterations")
    tol: float = param(1e-5, gt=0.0, le=1.0, doc="stop when the tangent step norm falls below this")


@register("karcher", model_params=WeightParams, global_params=KarcherParams, base="none", min_models=1,
          paper="https://arxiv.org/abs/2504.09287 (Karcher mean of weights)",
          summary="Riemannian mean of the directions on the sphere, scaled by the mean norm")
def karcher(xs, base, mps, gp, ctx):
    weights = torch.tensor([mp.weight for mp in mps], dtype=torch.float64)
    norms = [float(x.norm()) for x in xs]
    live = [i for i, n in enumerate(norms) if n > 1e-12]
    if not live:
        return torch.zeros_like(xs[0])
    total = float(weights[live].sum())
    w = weights[live] / (total if total != 0 else 1.0)  # a zero divisor becomes 1, as in linear
    mean_norm = float(sum(w[j] * norms[i] for j, i in enumerate(live)))
    units = [xs[i].reshape(-1).div(norms[i]) for i in live]
    if len(units) == 1:
        return units[0].mul_(mean_norm).view(xs[0].shape)
    mu = sum(float(w[j]) * u for j, u in enumerate(units))
    mu = mu / mu.norm().clamp_min(1e-12)
    for _ in range(gp.max_iter):
        step = torch.zeros_like(mu)
        for j, u in enumerate(units):
            cos = float(torch.dot(mu, u).clamp(-1.0, 1.0))
            theta = math.acos(cos)
            if theta < 1e-9:
                continue
            step.add_(u - cos * mu, alpha=float(w[j]) * theta / math.sin(theta))
        size = float(step.norm())
        if size < gp.tol:
            break
        mu = mu.mul_(math.cos(size)).add_(step, alpha=math.sin(size) / size)
        mu = mu / mu.norm().clamp_min(1e-12)
    return mu.mul_(mean_norm).view(xs[0].shape)


# ---------------------------------------------------------------- model stock


class ModelStockParams(MethodParams):
    filter_wise: bool = param(False, doc="one interpolation factor per row (last dim) instead of per tensor")
    clamp: bool = param(True, doc="treat negative mean cosine as 0 (s = 0); mergekit does not clamp")


@register("model_stock", global_params=ModelStockParams, base="required", min_models=2,
          paper="https://arxiv.org/abs/2403.19522",
          summary="interpolate mean(x_i) toward the base by the mean pairwise cosine of task vectors")
def model_stock(xs, base, mps, gp, ctx):
    n = len(xs)
    shape = base.shape
    rows = (lambda t: t.reshape(-1, shape[-1])) if gp.filter_wise and base.dim() > 0 else (lambda t: t.reshape(1, -1))
    ts = [rows(x - base) for x in xs]
    norms = [t.norm(dim=-1) for t in ts]
    total = torch.zeros_like(norms[0])
    for i in range(n):
        for j in range(i + 1, n):
            denom = norms[i] * norms[j]
            cos = torch.where(denom > 0, (ts[i] * ts[j]).sum(-1) / denom.clamp_min(1e-30), 0.0)
            total += cos.clamp_(-1.0, 1.0)
    c = total / (n * (n - 1) / 2)
    if gp.clamp:
        c = c.clamp(0.0, 1.0)  # negative agreement counts as none; also avoids the pole at c = -1/(N-1)
    denom = 1.0 + (n - 1) * c  # >= 0; 0 only at the pole c = -1/(N-1), reachable with clamp=False
    s = torch.where(denom > 0, n * c / denom, 0.0).unsqueeze(-1)  # at the pole keep the base, not NaN
    mean = rows(sum(xs) / n)
    return (mean * s + rows(base) * (1.0 - s)).reshape(shape)


# ---------------------------------------------------------------- task singular vectors


class TsvParams(MethodParams):
    lam: float = param(1.0, ge=0.0, le=10.0, search=(0.3, 1.5), doc="scale of the merged task vector")


def _polar(m: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ vh


@register("tsv", model_params=WeightParams, global_params=TsvParams, base="required", min_models=1,
          paper="https://arxiv.org/abs/2412.00081",
          summary="per-model top singular triplets, concatenated and orthogonalized (TSV-Merge)")
def tsv(xs, base, mps, gp, ctx):
    ts = [x.sub_(base).mul_(mp.weight) for x, mp in zip(xs, mps, strict=True)]
    if base.dim() != 2 or len(ts) == 1:
        return base + gp.lam * (sum(ts) / len(ts))
    rank = min(base.shape)
    k = max(1, rank // len(ts))
    us, ss, vs = [], [], []
    for t in ts:
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    u = _polar(torch.cat(us, dim=1))
    v = _polar(torch.cat(vs, dim=1))
    merged = (u * torch.cat(ss)) @ v.T
    return base + gp.lam * merged


# ---------------------------------------------------------------- passthrough


class ScaleParams(MethodParams):
    scale: float = param(1.0, ge=-10.0, le=10.0, search=(0.0, 2.0), doc="multiplier of the copied tensor")


@register("passthrough", model_params=ScaleParams, global_params=NoParams, base="none", max_models=1, elementwise=True,
          summary="copy one model's tensor (layer slices pick which), optionally scaled")
def passthrough(xs, base, mps, gp, ctx):
    return xs[0] if mps[0].scale == 1.0 else xs[0].mul_(mps[0].scale)


