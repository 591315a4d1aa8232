"""The native kernels (kernels/native.py): TIES agreeing with the eager kernels wherever the kept ties stop,
over threads, dtypes and model counts; task arithmetic; non-finite reports; building, caching and falling back."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.kernels import TensorContext, chunked, fused, get_method, native
from evomerge.kernels.bracket import Bracket, delta_magnitude
from evomerge.kernels.select import exact_count

BLK = 256  # native_merge.c's block
COMBINE_ABOVE = chunked._combine_above  # the compiled combining pass, before a fixture replaces it

pytestmark = pytest.mark.skipif(native.available() is not None, reason=str(native.available()))


def eager(raws, mps, gp=None, method="ties", scale=1.0, out_dtype=torch.float32) -> torch.Tensor:
    """The whole-tensor eager kernel's result (then depth scaling as run_fused applies it)."""
    m = get_method(method)
    ctx = TensorContext("t", model_ids=tuple("abcd"[: len(raws) - 1]))
    out = m.fn([r.to(torch.float32, copy=True) for r in raws[:-1]], raws[-1].float(), mps, gp or m.global_params(), ctx)
    if scale != 1.0:
        b = raws[-1].float()
        out = (out - b) * scale + b
    return out.to(out_dtype)


def run(raws, mps, gp=None, method="ties", scale=1.0, out_dtype=torch.float32, on_nonfinite=None) -> torch.Tensor:
    m = get_method(method)
    out = torch.empty(raws[0].shape, dtype=out_dtype)
    ctx = TensorContext("t", model_ids=tuple("abcd"[: len(raws) - 1]))
    chunked.run_fused(m.fn, list(raws), mps, gp or m.global_params(), ctx, out, scale=scale, on_nonfinite=on_nonfinite)
    return out


@pytest.fixture(autouse=True)
def native_only(monkeypatch):
    """run_fused takes the native path: calls of the compiled combining kernels would fail the test."""
    monkeypatch.setenv(fused.ENV, "1")
    monkeypatch.setattr(chunked, "_combine_above", lambda *a, **k: pytest.fail("compiled combining pass used"))
    calls = []
    real = native.topk_merge
    monkeypatch.setattr(native, "topk_merge", lambda *a, **k: calls.append(1) or real(*a, **k))
    yield calls


def tied(n: int, count: int, seed: int, dtype=torch.bfloat16) -> list[torch.Tensor]:
    """``count`` experts and a base whose deltas are small multiples of 2^-8: thousands of equal magnitudes."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-64, 64, (n,), generator=g) / 256.0
    return [(base + torch.randint(-3, 4, (n,), generator=g) / 256.0).to(dtype) for _ in range(count)] + [base.to(dtype)]


@pytest.mark.parametrize("count", [1, 2, 3, 5])
@pytest.mark.parametrize("d", [0.05, 0.3, 0.5, 0.77, 1.0])
def test_every_density_and_model_count_agrees_with_eager(count, d, native_only):
    raws = tied(20_000, count, seed=count)
    m = get_method("ties")
    mps = [m.model_params(weight=0.3 + 0.2 * i, density=min(1.0, d + 0.1 * i)) for i in range(count)]
    assert torch.equal(run(raws, mps), eager(raws, mps))
    assert native_only


@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                             (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16)])
def test_dtypes_in_and_out(dtype, out_dtype):
    g = torch.Generator().manual_seed(4)
    base = torch.randn(30_000, generator=g) * 0.02
    raws = [(base + torch.randn(30_000, generator=g) * 0.003).to(dtype) for _ in range(2)] + [base.to(dtype)]
    m = get_method("ties")
    mps = [m.model_params(weight=0.7, density=0.4), m.model_params(weight=0.5, density=0.6)]
    got, ref = run(raws, mps, out_dtype=out_dtype), eager(raws, mps, out_dtype=out_dtype)
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-6, atol=1e-6 * float(ref.float().abs().max()))
    if out_dtype != torch.float32:  # rounding to the output dtype is torch's
        assert torch.equal(got, ref)


def test_summed_ties_lambda_and_depth_scaling():
    raws = tied(10_000, 2, seed=9)
    m = get_method("ties")
    mps = [m.model_params(weight=0.7, density=0.3), m.model_params(weight=-0.4, density=0.5)]
    gp = m.global_params(normalize=False, lam=0.6)
    assert torch.equal(run(raws, mps, gp, scale=0.35), eager(raws, mps, gp, scale=0.35))


@pytest.mark.parametrize("position", [BLK - 1, BLK, BLK + 1, 5 * BLK, 5 * BLK + 1])
def test_tie_cuts_at_and_around_block_edges(position):
    """All magnitudes tie; k keeps exactly the entries before ``position``: the cut lands on a block's edge,
    just before or just after it."""
    n = 8 * BLK + 17
    base = torch.zeros(n)
    x = torch.full((n,), 1 / 64)
    x[1::2] = -1 / 64
    raws = [x.to(torch.bfloat16), (0.5 * x).to(torch.bfloat16), base.to(torch.bfloat16)]
    m = get_method("ties")
    mps = [m.model_params(weight=1.0, density=position / n), m.model_params(weight=1.0, density=0.0)]
    assert exact_count(position / n, n) == position
    out = run(raws, mps)
    assert torch.equal(out, eager(raws, mps))
    assert torch.equal((out != 0).nonzero().flatten(), torch.arange(position))  # the lowest positions win


@pytest.mark.parametrize("threads", [2, 3])
def test_threads_split_ranges_and_agree_bit_for_bit(threads, monkeypatch):
    """Split over threads (the last range walked backwards, middle ranges told the ties before them): the
    same bits as one thread, with the cut in the first, a middle or the last range."""
    monkeypatch.setattr(native, "MIN_PER_THREAD", 2 * BLK)
    monkeypatch.setattr(native, "_CPUS", threads)  # three ranges on a two-core machine too
    raws = tied(50 * BLK + 3, 3, seed=5)
    m = get_method("ties")
    previous = torch.get_num_threads()
    for d in (0.1, 0.45, 0.9):
        mps = [m.model_params(weight=0.6, density=d), m.model_params(weight=0.4, density=1 - d),
               m.model_params(weight=0.5, density=0.5)]
        try:
            torch.set_num_threads(threads)
            split = run(raws, mps)
        finally:
            torch.set_num_threads(previous)
        assert torch.equal(split, eager(raws, mps))


def test_first_nonfinite_result_of_each_range_is_reported(monkeypatch):
    monkeypatch.setattr(native, "MIN_PER_THREAD", 4 * BLK)
    raws = tied(20 * BLK, 2, seed=1)
    raws[0][700] = float("nan")
    raws[1][701] = float("inf")
    raws[-1][19 * BLK] = float("inf")
    m = get_method("ties")
    mps = [m.model_params(density=0.5)] * 2
    seen = []
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        out = run(raws, mps, on_nonfinite=lambda a, b: seen.append((a, b)))
    finally:
        torch.set_num_threads(previous)
    assert seen == [(700, 701), (19 * BLK, 19 * BLK + 1)]
    assert not math.isfinite(float(out[700])) and not math.isfinite(float(out[701]))


def test_turned_off_or_unbuildable_falls_back_to_compiled_kernels(monkeypatch, tmp_path, native_only):
    raws = tied(20_000, 2, seed=2)
    m = get_method("ties")
    mps = [m.model_params(weight=0.7, density=0.4), m.model_params(weight=0.5, density=0.6)]
    monkeypatch.setattr(chunked, "_combine_above", COMBINE_ABOVE)
    monkeypatch.setenv(native.ENV, "0")
    assert "EVOMERGE_NATIVE=0" in native.available()
    assert torch.equal(run(raws, mps), eager(raws, mps)) and not native_only

    monkeypatch.delenv(native.ENV)
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_why_not", None)
    assert "/bin/false failed" in native.available()
    assert torch.equal(run(raws, mps), eager(raws, mps)) and not native_only


def test_library_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path))
    builds = []
    compile_ = native._compile
    monkeypatch.setattr(native, "_compile", lambda target: builds.append(target) or compile_(target))
    for _ in range(2):
        monkeypatch.setattr(native, "_lib", None)
        monkeypatch.setattr(native, "_why_not", None)
        assert native.library() is not None
    assert len(builds) == 1 and builds[0].exists() and builds[0].parent == tmp_path / "native"
    assert [p.name for p in (tmp_path / "native").iterdir()] == [builds[0].name]  # no temporary left


@pytest.mark.parametrize("lo,hi", [(0.0, 1.0), (1 / 128, 3 / 256), (2 / 256, 2 / 256), (0.5, 0.75)])
def test_bracket_counting_pass_matches_eager_observe(lo, hi):
    """Counts, positions and values as Bracket.observe gives them: with every entry inside (more than the
    first guess of room), a narrow bracket, a single value, and a bracket above every value."""
    raws = tied(20_000, 3, seed=7, dtype=torch.float32)
    raws[1] = raws[1].to(torch.bfloat16).float() + 1e-5  # inexact magnitudes too
    got = native.observe_brackets(raws, [0, 1, 2], [(lo, hi)] * 3)
    for i, (counts, positions, values) in enumerate(got):
        ref = Bracket.between(5, 20_000, lo, hi)
        ref.observe(delta_magnitude(raws[i], raws[-1]), 0)
        assert torch.equal(counts, ref._counts[0]) and torch.equal(positions, ref._positions[0])
        assert torch.equal(values, ref._values[0])


@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                             (torch.float16, torch.float32)])
def test_task_arithmetic_agrees_with_the_compiled_kernel(dtype, out_dtype, monkeypatch):
    """One pass b c_0 + sum_i c_i x_i, then depth scaling: the compiled kernel's bits, on one thread or
    split over two."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(9 * BLK + 5, generator=g)
    raws = [(base + 0.01 * torch.randn(base.shape, generator=g)).to(dtype) for _ in range(3)] + [base.to(dtype)]
    m = get_method("task_arithmetic")
    mps = [m.model_params(weight=w) for w in (0.7, -0.2, 0.4)]
    gp = m.global_params(lam=0.9)
    fast = run(raws, mps, gp, method="task_arithmetic", scale=0.6, out_dtype=out_dtype)
    monkeypatch.setenv(native.ENV, "0")
    compiled = run(raws, mps, gp, method="task_arithmetic", scale=0.6, out_dtype=out_dtype)
    assert torch.equal(fast, compiled)
    monkeypatch.delenv(native.ENV)
    monkeypatch.setattr(native, "MIN_PER_THREAD", 2 * BLK)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.equal(run(raws, mps, gp, method="task_arithmetic", scale=0.6, out_dtype=out_dtype), fast)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(fast.float(), eager(raws, mps, gp, "task_arithmetic", 0.6, out_dtype).float(),
                               rtol=1e-5, atol=1e-6)


def test_task_arithmetic_reports_the_first_nonfinite_result():
    raws = tied(4 * BLK, 2, seed=3)
    raws[1][300] = float("inf")
    raws[0][301] = float("nan")
    m = get_method("task_arithmetic")
    seen = []
    run(raws, [m.model_params(weight=0.5)] * 2, method="task_arithmetic", on_nonfinite=lambda a, b: seen.append((a, b)))
    assert seen == [(300, 301)]
