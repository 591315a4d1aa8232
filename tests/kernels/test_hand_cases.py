"""Every hand-computed case of shared/design/kernels.md (fisher, regmean and obim come later)."""

import math

import pytest
import torch

from evomerge.kernels import DepthScaling, TensorContext, get_method
from evomerge.kernels.select import exact_count, top_k_mask
from evomerge.kernels.taskvector import Magnitude, MagnitudeBand, dare_apply, della_keep_probs


def T(*v):
    return torch.tensor(v, dtype=torch.float32)


def run(name, xs, base=None, model=None, **glob):
    m = get_method(name)
    mps = [m.model_params(**(model[i] if model else {})) for i in range(len(xs))]
    ctx = TensorContext("t", model_ids=tuple(f"m{i}" for i in range(len(xs))))
    return m.fn([x.clone() for x in xs], base, mps, m.global_params(**glob), ctx)


def close(a, b, tol=1e-5):
    expected = b if isinstance(b, torch.Tensor) else torch.tensor(b, dtype=torch.float32)
    torch.testing.assert_close(a, expected, atol=tol, rtol=0)


def test_1_task_arithmetic_and_linear():
    b = T(1, 1, 1, 1)
    t1, t2 = T(1, -2, 0.5, 3), T(2, 1, -0.5, -1)
    close(run("task_arithmetic", [b + t1, b + t2], b, lam=0.5), [2.5, 0.5, 1, 2])
    close(run("linear", [b + t1, b + t2], model=[{"weight": 1}, {"weight": 3}]), [2.75, 1.25, 0.75, 1.0])


def test_2_ties_disjoint_mean_and_sum():
    b = torch.zeros(5)
    ts = [T(1, -2, 3, 0, -1), T(2, 1, -1, 0, 2), T(-4, 1, -1, 0, 0)]
    close(run("ties", ts, b), [-4, 1, 3, 0, 2])
    close(run("ties", ts, b, normalize=False), [-4, 2, 3, 0, 2])


def test_3_trim_keeps_exact_top_k():
    t = T(0.1, -0.5, 0.3, -0.2, 0.05)
    m = get_method("ties").model_params(density=0.4)
    out = Magnitude().apply([t.clone()], [m], None, TensorContext("t", model_ids=("a",)))[0]
    close(out, [0, -0.5, 0.3, 0, 0])
    assert exact_count(0.29, 100) == 29
    assert int(top_k_mask(torch.ones(10), 3).sum()) == 3  # all tied: still exactly k


def test_4_dare_on_given_mask_and_statistics():
    close(dare_apply(T(0.2, -0.4, 0.6, 0.8), torch.tensor([True, False, True, False]), 0.5), [0.4, 0, 1.2, 0])
    n, d = 100_000, 0.3
    t = torch.full((n,), 0.5)
    out = run("dare_linear", [t], torch.zeros(n), model=[{"density": d}])
    kept = float((out != 0).float().mean())
    assert abs(kept - d) <= 3 * math.sqrt(d * (1 - d) / n)
    assert abs(float(out.mean()) - 0.5) < 0.02


def test_5_slerp():
    close(run("slerp", [T(1, 0), T(0, 1)], t=0.5), [0.70711, 0.70711])
    close(run("slerp", [T(1, 0), T(0, 1)], t=1 / 3), [0.86603, 0.5])
    close(run("slerp", [T(2, 0), T(0, 1)], t=0.5), [1.41421, 0.70711])
    close(run("slerp", [T(1, 1), T(2, 2)], t=0.25), [1.25, 1.25])


def test_6_model_stock():
    b = torch.zeros(2)
    close(run("model_stock", [T(2, 0), T(1, 1)], b), [1.24264, 0.41421])
    b = T(0.5, -1)
    close(run("model_stock", [b + T(1, 0), b + T(0, 3)], b), b)


def test_7_breadcrumbs():
    t = T(0.1, -0.9, 0.3, -0.2, 0.05, 0.6, 0.4, -0.7, 0.15, 0.25)
    m = get_method("breadcrumbs").model_params(density=0.5, gamma=0.1)
    out = MagnitudeBand().apply([t.clone()], [m], None, TensorContext("t", model_ids=("a",)))[0]
    close(out, [0, 0, 0.3, 0, 0, 0.6, 0.4, -0.7, 0, 0.25])
    close(run("breadcrumbs", [t], torch.zeros(10), model=[{"density": 0.5, "gamma": 0.1}]),
          [0, 0, 0.3, 0, 0, 0.6, 0.4, -0.7, 0, 0.25])


def test_7b_breadcrumbs_gamma_zero_keeps_band():
    # A reference implementation's slice idx[n_bot:-n_top] empties the mask when n_top == 0.
    t = T(0.1, -0.9, 0.3, -0.2)
    close(run("breadcrumbs", [t], torch.zeros(4), model=[{"density": 0.5, "gamma": 0.0}]), [0, -0.9, 0.3, 0])


def test_8_della_keep_probs():
    probs = della_keep_probs(T(0.5, 0.1, 0.9, 0.3, 0.7), 0.5, 0.1)
    close(probs, [0.5, 0.4, 0.6, 0.45, 0.55])
    close(della_keep_probs(T(0.3), 0.5, 0.1), [0.5])  # a row of one: no 0/0


def test_9_sce():
    b = torch.zeros(4)
    close(run("sce", [T(1, -2, 3, 0), T(3, 2, -1, 2)], b), [2.125, 2, 3, 2])


def test_10_karcher():
    close(run("karcher", [T(1, 0), T(0, 2)]), [1.06066, 1.06066])


def test_11_tsv():
    b = torch.zeros(2, 2)
    close(run("tsv", [torch.diag(T(3, 1)), torch.diag(T(0, 2))], b), torch.diag(T(3, 2)))


def test_12_consensus():
    b = torch.zeros(3)
    close(run("consensus", [T(1, 0, 0.1), T(1, 2, 0), T(-1, 0, 0.1)], b, mask_ratio=0.5, min_agree=2), [1, 0, 0.2])


def test_13_depth_scaling():
    ds = DepthScaling(alpha=0.2, beta=0.6)
    ctxs = [TensorContext("x", layer=i, num_layers=4) for i in range(4)]
    assert [round(ds.scale(c.depth), 6) for c in ctxs] == [0.2, 0.4, 0.6, 0.8]
    assert ds.scale(TensorContext("embed").depth) == 0.2
    b = T(1, 1)
    close(ds.apply(T(3, 1), b, 0.0), [1.4, 1.0])


@pytest.mark.parametrize("name", ["dare_ties", "della"])
def test_randomized_methods_are_seeded_per_tensor(name):
    m = get_method(name)
    xs = [torch.randn(64), torch.randn(64)]
    b = torch.zeros(64)
    mps = [m.model_params(density=0.5)] * 2
    gp = m.global_params()

    def go(seed, tname="t", ids=("a", "b")):
        return m.fn([x.clone() for x in xs], b, mps, gp, TensorContext(tname, seed=seed, model_ids=ids))

    assert torch.equal(go(1), go(1))
    assert not torch.equal(go(1), go(2))
    assert not torch.equal(go(1, "t"), go(1, "u"))


@pytest.mark.parametrize("n", [10, 70_000, 300_001])
def test_top_k_mask_exact_on_large_tensors_with_ties(n):
    g = torch.Generator().manual_seed(n)
    mag = (torch.randn(n, generator=g) * 0.01).to(torch.bfloat16).float().abs()  # bf16 values: many ties
    mag[::7] = 0.0
    order = sorted(range(n), key=lambda i: (-float(mag[i]), i))  # reference: magnitude, then lowest index
    for k in (1, n // 3, n // 2, n - 1):
        mask = top_k_mask(mag, k)
        assert int(mask.sum()) == k
        expected = torch.zeros(n, dtype=torch.bool)
        expected[order[:k]] = True
        assert torch.equal(mask, expected)
