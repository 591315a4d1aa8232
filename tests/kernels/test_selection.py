"""The selection helpers the kernels share (exact top-k masks, exact counts) and the statistics of the
random drops (DARE, DELLA): kept fraction, rescaling, unbiasedness. Strategies and helpers come from
test_properties.py."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.kernels.select import exact_count, top_k_mask
from evomerge.kernels.taskvector import della_keep_probs
from tests.kernels.test_properties import FLOATS, PROPS, SHAPES_0D, ctx_for, defaults, run, tensor

# ---------------------------------------------------------------- selection helpers


@settings(PROPS, max_examples=100)
@given(data=st.data())
def test_top_k_mask_selects_exactly_k_largest_ties_to_lowest_indices(data):
    shape = data.draw(SHAPES_0D)
    elements = data.draw(st.sampled_from([FLOATS.map(abs), st.sampled_from([0.0, 1.0, 2.0]), st.just(0.5)]))
    mag = tensor(data.draw, shape, elements)
    check_top_k(mag, data.draw(st.integers(0, mag.numel())))


def check_top_k(mag, k):
    mask = top_k_mask(mag, k)
    assert mask.dtype == torch.bool and mask.shape == mag.shape
    assert int(mask.sum()) == k
    flat, sel = mag.reshape(-1), mask.reshape(-1)
    if 0 < k < flat.numel():
        lowest_kept = flat[sel].min()
        assert bool(lowest_kept >= flat[~sel].max())
        kept_tied = sel[flat == lowest_kept]  # ties at the threshold: the kept ones come first
        assert not bool((~kept_tied[:-1] & kept_tied[1:]).any())


@settings(PROPS, max_examples=10)
@given(n=st.integers(1 << 16, 70_000), seed=st.integers(0, 2**32 - 1), data=st.data(),
       palette=st.lists(st.one_of(FLOATS.map(abs), st.sampled_from([0.0, 1e-45, 1.0, 2.0**-126])),
                        min_size=1, max_size=6))
def test_top_k_mask_on_large_tensors_with_many_ties(n, seed, palette, data):
    """Tensors big enough for any bucketed selection path; only a few distinct values, so ties everywhere."""
    g = torch.Generator().manual_seed(seed)
    mag = torch.tensor(palette, dtype=torch.float32)[torch.randint(len(palette), (n,), generator=g)]
    if data.draw(st.booleans()):
        mag = mag + torch.rand(n, generator=g) * data.draw(st.sampled_from([0.0, 1e-3, 1.0]))
    for k in (0, n, n - 1, data.draw(st.integers(1, n)), int((mag > mag.median()).sum())):
        check_top_k(mag, k)


def test_top_k_mask_all_tied_and_out_of_range_k():
    for n in (1, 2, 7, 100):
        for k in range(-1, n + 2):
            mask = top_k_mask(torch.full((n,), 3.0), k)
            assert int(mask.sum()) == min(max(k, 0), n)
            assert bool(mask[: min(max(k, 0), n)].all())


def test_exact_count():
    assert exact_count(0.29, 100) == 29
    assert exact_count(0.0, 10) == 0
    assert exact_count(1.0, 10) == 10
    assert exact_count(0.5, 0) == 0


@settings(PROPS, max_examples=200)
@given(n=st.integers(1, 10**7), data=st.data())
def test_exact_count_inverts_k_over_n(n, data):
    k = data.draw(st.integers(0, n))
    assert exact_count(k / n, n) == k
    f = data.draw(st.floats(0.0, 1.0))
    assert 0 <= exact_count(f, n) <= n
    assert abs(exact_count(f, n) - f * n) < 1.0 + 1e-6


# ---------------------------------------------------------------- DARE and DELLA statistics

N_BIG = 100_000


def big_task_vector(seed):
    g = torch.Generator().manual_seed(seed)
    return 0.5 + 0.25 * torch.randn(N_BIG, generator=g)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("density", [0.1, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_dare_keeps_density_on_average_and_is_unbiased(name, density, seed):
    t = big_task_vector(seed)
    assert bool((t != 0).all())
    base = torch.zeros(N_BIG)
    mps, gp = defaults(name, 1, [{"density": density}])
    out = run(name, [t], base, mps, gp, ctx_for(1, seed=seed))
    kept = out != 0
    assert abs(float(kept.float().mean()) - density) <= 3 * math.sqrt(density * (1 - density) / N_BIG)
    torch.testing.assert_close(out[kept], t[kept] / density)  # inverse rescale of the kept entries
    sd = math.sqrt(float(t.square().sum()) * (1 - density) / density) / N_BIG
    assert abs(float(out.mean()) - float(t.mean())) <= 4 * sd


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("density", "epsilon"), [(0.3, 0.1), (0.5, 0.2)])
def test_della_keeps_density_on_average_favours_large_entries_and_is_unbiased(density, epsilon, seed):
    t = big_task_vector(seed).reshape(100, 1000)
    base = torch.zeros_like(t)
    mps, gp = defaults("della_linear", 1, [{"density": density, "epsilon": epsilon}])
    out = run("della_linear", [t], base, mps, gp, ctx_for(1, seed=seed))
    kept = out != 0
    assert abs(float(kept.float().mean()) - density) <= 3 * math.sqrt(density * (1 - density) / N_BIG)
    probs = della_keep_probs(t.abs(), density, epsilon)
    torch.testing.assert_close(out[kept], t[kept] / probs[kept])
    order = t.abs().argsort(dim=-1)
    small, large = kept.gather(-1, order[:, :300]), kept.gather(-1, order[:, -300:])
    assert float(large.float().mean()) > float(small.float().mean())
    sd = math.sqrt(float((t.square() * (1 - probs) / probs).sum())) / N_BIG
    assert abs(float(out.mean()) - float(t.mean())) <= 4 * sd


def test_della_keep_probs_row_of_five():
    mag = torch.tensor([3.0, 0.5, 5.0, 1.0, 2.0])
    probs = della_keep_probs(mag, 0.5, 0.1)
    torch.testing.assert_close(probs[mag.argsort()], torch.tensor([0.4, 0.45, 0.5, 0.55, 0.6]))
    for one in (torch.tensor(2.0), torch.tensor([0.0]), torch.tensor([[3.0], [0.0], [1e-30]])):  # rows of one
        torch.testing.assert_close(della_keep_probs(one, 0.5, 0.1), torch.full_like(one, 0.5))


@PROPS
@given(data=st.data())
def test_della_keep_probs_rise_with_magnitude_and_average_to_density(data):
    shape = data.draw(SHAPES_0D)
    mag = tensor(data.draw, shape, st.one_of(FLOATS.map(abs), st.sampled_from([0.0, 1.0])))
    density = data.draw(st.floats(0.01, 1.0))
    epsilon = data.draw(st.floats(0.0, 0.5))
    probs = della_keep_probs(mag, density, epsilon)
    assert probs.shape == mag.shape and probs.dtype == mag.dtype
    assert bool(torch.isfinite(probs).all())
    assert bool(((probs >= 0.01 - 1e-7) & (probs <= 1.0)).all())
    if mag.dim() == 0 or mag.shape[-1] == 1:
        torch.testing.assert_close(probs, torch.full_like(mag, density))  # rows of one: no 0/0
        return
    rows, prow = mag.reshape(-1, mag.shape[-1]), probs.reshape(-1, mag.shape[-1])
    ranked = prow.gather(-1, rows.argsort(dim=-1, stable=True))
    assert bool((ranked[:, 1:] >= ranked[:, :-1] - 1e-6).all())
    if density - epsilon >= 0.01 and density + epsilon <= 1.0:  # no clamping: the ramp averages to density
        torch.testing.assert_close(prow.mean(-1), torch.full((prow.shape[0],), density), atol=1e-5, rtol=0)
        torch.testing.assert_close(ranked[:, 0], torch.full((prow.shape[0],), density - epsilon), atol=1e-5, rtol=0)
        torch.testing.assert_close(ranked[:, -1], torch.full((prow.shape[0],), density + epsilon), atol=1e-5, rtol=0)
