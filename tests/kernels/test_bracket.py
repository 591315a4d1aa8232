"""Top-k selection from a sampled bracket gives exactly what the histogram passes and the definition give:
the k largest values, ties at the threshold kept lowest position first, on adversarial inputs."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.kernels import TensorContext, bracket, chunked, get_method
from evomerge.kernels import settle as settling
from evomerge.kernels.bracket import Bracket, sample_positions
from evomerge.kernels.select import StreamTopK, top_k_mask


@pytest.fixture(autouse=True)
def eager_brackets(monkeypatch):
    """Brackets in eager CPU code too (off by default there, for speed), so the tests reach them."""
    monkeypatch.setattr(bracket, "EAGER_CPU", True)


def reference_mask(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The definition: the k largest, ties at the threshold to the lowest positions (a stable sort)."""
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask


def values(kind: str, n: int, seed: int = 0) -> torch.Tensor:
    """Non-negative float32 magnitudes of the kinds that make selection hard."""
    g = torch.Generator().manual_seed(seed)
    if kind == "bf16 deltas":  # |x - b| of bf16 weights: few distinct values, thousands of ties each
        b = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
        x = (b.float() + torch.randn(n, generator=g) * 0.002).to(torch.bfloat16)
        return (x.float() - b.float()).abs()
    if kind == "all equal":
        return torch.full((n,), 0.375)
    if kind == "mostly zero":  # 90% unchanged entries: the k-th largest is often 0
        return torch.where(torch.rand(n, generator=g) < 0.9, 0.0, torch.rand(n, generator=g))
    if kind == "three values":
        return torch.tensor([0.0, 1e-45, 2.0])[torch.randint(3, (n,), generator=g)]
    if kind == "subnormal":
        return torch.rand(n, generator=g) * 1e-38
    if kind == "sorted":  # ascending: a strided sample would see one end of every row; the last kept tie is late
        return torch.sort((torch.randn(n, generator=g) * 0.01).to(torch.bfloat16).float().abs()).values
    return torch.rand(n, generator=g)


KINDS = ["bf16 deltas", "all equal", "mostly zero", "three values", "subnormal", "sorted", "uniform"]


def ks(n: int) -> list[int]:
    return sorted({k for k in (1, 2, n // 100, n // 3, n // 2, n - n // 10, n - 1) if 0 < k < n})


def histogram_select(v: torch.Tensor, k: int, block: int) -> StreamTopK:
    """The exact histogram passes over chunks of ``block`` entries."""
    sel = StreamTopK(k, v.numel())
    for a in range(0, v.numel(), block):
        sel.observe_high(v[a:a + block])
    sel.choose_bucket()
    for a in range(0, v.numel(), block):
        sel.observe_low(v[a:a + block])
    sel.finish()
    return sel


def bracket_select(v: torch.Tensor, k: int, block: int, positions: torch.Tensor | None = None):
    """The bracket's counting pass over chunks of ``block`` entries: (its result, a selection settled by it)."""
    n = v.numel()
    b = Bracket(k, n, v[sample_positions(n) if positions is None else positions])
    for a in range(0, n, block):
        b.observe(v[a:a + block], a)
    settled = b.resolve()
    return settled, settle(k, n, settled)


def settle(k, n, settled) -> StreamTopK:
    """A fresh selection settled by ``settled`` (a selection's mask and tie cut are used once, in order)."""
    sel = StreamTopK(k, n)
    if settled is not None:
        sel.settle(settled)
    return sel


def chunk_masks(sel: StreamTopK, v: torch.Tensor, block: int) -> torch.Tensor:
    """The eager chunk loop's masks, joined."""
    return torch.cat([sel.mask(v[a:a + block]) for a in range(0, v.numel(), block)]).bool()


def fused_mask(sel: StreamTopK, v: torch.Tensor, block: int) -> torch.Tensor:
    """The fused kernels' rule, keep |t| > bound or (|t| == bound and position < cut), with the cut per chunk."""
    pos = torch.arange(v.numel())
    cuts = torch.empty(v.numel(), dtype=torch.int64)
    for a in range(0, v.numel(), block):
        b = min(v.numel(), a + block)

        def count(a=a, b=b):
            return int((v[a:b] == sel.bound).sum())

        def nth(j, a=a, b=b):
            return a + int(torch.nonzero(v[a:b] == sel.bound).view(-1)[j - 1])

        cuts[a:b] = sel.tie_cut(a, b, count, nth)
    return (v > sel.bound) | ((v == sel.bound) & (pos < cuts))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n,block", [(3, 2), (1000, 64), (50_000, 4096), (300_007, 1 << 16)])
def test_bracket_selection_equals_histogram_selection_and_definition(kind, n, block):
    v = values(kind, n, seed=n)
    resolved = 0
    for k in ks(n):
        want = reference_mask(v, k)
        exact = histogram_select(v, k, block)
        settled, sel = bracket_select(v, k, block)
        if settled is None:  # outside the bracket: the caller runs the histogram passes
            continue
        resolved += 1
        assert (sel.threshold, sel.ties_wanted, sel.ties_total) == \
            (exact.threshold, exact.ties_wanted, exact.ties_total), k
        assert torch.equal(chunk_masks(sel, v, block), want), k
        assert torch.equal(fused_mask(settle(k, n, settled), v, block), want), k
        assert torch.equal(chunk_masks(exact, v, block), want), k
    assert resolved >= len(ks(n)) - 1  # the sample misses rarely (5 standard deviations of margin)


@pytest.mark.parametrize("kind", KINDS)
def test_top_k_mask_equals_definition_on_large_tensors(kind):
    n = 70_007
    v = values(kind, n, seed=1)
    for k in ks(n):
        assert torch.equal(top_k_mask(v.view(7, 10_001), k).view(-1), reference_mask(v, k)), k


def test_huge_tensor_in_chunks():
    """Five million values, 2^18 per chunk: the k-th largest and the last kept tie fall in a middle chunk."""
    n, block = 5_000_000, 1 << 18
    v = values("bf16 deltas", n, seed=5)
    k = int(n * 0.37)
    want = reference_mask(v, k)
    settled, sel = bracket_select(v, k, block)
    assert settled is not None and settled.cut is not None and 0 < settled.cut < n - block
    assert torch.equal(chunk_masks(sel, v, block), want)
    assert torch.equal(fused_mask(settle(k, n, settled), v, block), want)
    assert torch.equal(top_k_mask(v, k), want)


def test_threshold_at_either_end_of_the_bracket():
    """Many ties at a sampled endpoint: the threshold is the endpoint, and the ties are counted, not gathered."""
    n = 100_000
    v = torch.cat([torch.full((n // 2,), 2.0), torch.full((n // 2,), 1.0)])
    v[::3] = torch.rand(len(v[::3]), generator=torch.Generator().manual_seed(0)) + 0.5
    for k in (n // 3, n // 2, int(n * 0.8)):
        settled, sel = bracket_select(v, k, 4096)
        exact = histogram_select(v, k, 4096)
        assert settled is not None
        assert (sel.threshold, sel.ties_wanted, sel.ties_total) == \
            (exact.threshold, exact.ties_wanted, exact.ties_total)
        assert torch.equal(chunk_masks(sel, v, 4096), reference_mask(v, k))
        assert torch.equal(fused_mask(settle(k, n, settled), v, 4096), reference_mask(v, k))
    assert bracket_select(v, n // 3, 4096)[0].cut is None  # a tie of 2.0 or 1.0 (endpoints): counted only


def test_a_sample_far_off_or_nan_gives_no_result():
    n = 10_000
    v = torch.rand(n, generator=torch.Generator().manual_seed(2))
    top = torch.sort(v, descending=True).indices[:200]
    assert bracket_select(v, n // 2, 512, positions=top)[0] is None  # the bracket lies above the k-th largest
    assert bracket_select(v, n // 2, 512, positions=torch.sort(v).indices[:200])[0] is None  # below it
    v[123] = math.nan
    assert bracket_select(v, n // 2, 512)[0] is None  # NaN is ordered against nothing: counts do not add up
    with pytest.raises(ValueError):
        Bracket(0, n, v)


@pytest.mark.parametrize("n,row", [(1_000_000, 1000), (576 * 49152, 576), (1536 * 576, 1536), (5120 * 700, 5120)])
def test_sample_is_about_sample_size_and_visits_every_column(n, row):
    sample = sample_positions(n)
    positions = torch.arange(sample.start, n, sample.step)
    assert bracket.SAMPLE // 2 <= positions.numel() <= bracket.SAMPLE
    assert int(positions.min()) >= 0 and int(positions.max()) < n
    assert torch.unique(positions % row).numel() == min(row, positions.numel())
    assert torch.equal(torch.arange(500)[sample_positions(500)], torch.arange(500))


def unlucky_sample(n):
    """Positions of the sources' largest deltas only (``tensors`` below puts them first)."""
    return slice(0, min(n, 256))


def tensors(n: int, seed: int = 0) -> list[torch.Tensor]:
    """Two bf16 experts and a base with heavily tied deltas; the first 256 deltas are the largest."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-64, 64, (n,), generator=g) / 256.0
    xs = [base + torch.randint(-3, 4, (n,), generator=g) / 256.0 for _ in range(2)]
    for x in xs:
        x[:256] = base[:256] + 1.0
    return [t.to(torch.bfloat16) for t in (*xs, base)]


SELECTING = [  # methods whose chunk loop settles whole-tensor selections, with two models' parameters
    ("ties", [{"weight": 0.7, "density": 0.4}, {"weight": 0.5, "density": 0.9}]),
    ("breadcrumbs_ties", [{"weight": 0.7, "density": 0.5, "gamma": 0.1}, {"weight": 0.5, "density": 0.3}]),
]


@pytest.mark.parametrize("unlucky", [False, True])
@pytest.mark.parametrize("name,params", SELECTING)
def test_chunked_pipeline_equals_whole_tensor_kernel(monkeypatch, name, params, unlucky):
    """The eager chunk loop, settled by brackets or (an unlucky sample) by the histogram passes, over
    chunks of 1000 entries, gives the bits of the whole-tensor kernel."""
    monkeypatch.setattr(chunked, "BLOCK", 1000)
    if unlucky:
        monkeypatch.setattr(settling, "sample_positions", unlucky_sample)
    raws = tensors(20_000)
    m = get_method(name)
    mps = [m.model_params(**p) for p in params]
    gp = m.global_params()
    ctx = TensorContext("t", model_ids=("a", "b"))
    ref = m.fn([r.float() for r in raws[:-1]], raws[-1].float(), mps, gp, ctx)
    out = torch.empty(20_000)
    chunked.run_chunked(m.fn, list(raws), mps, gp, ctx, out)
    assert torch.equal(out, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name,params", SELECTING)
def test_cuda_chunk_loop_and_top_k_mask_agree_with_cpu(monkeypatch, name, params):
    """The eager chunk loop and top_k_mask on CUDA tensors select what the CPU selects."""
    monkeypatch.setattr(chunked, "BLOCK", 1000)
    raws = tensors(20_000)
    m = get_method(name)
    mps = [m.model_params(**p) for p in params]
    gp = m.global_params()
    ctx = TensorContext("t", model_ids=("a", "b"))
    ref = m.fn([r.float() for r in raws[:-1]], raws[-1].float(), mps, gp, ctx)
    out = torch.empty(20_000, device="cuda")
    chunked.run_chunked(m.fn, [r.cuda() for r in raws], mps, gp, ctx, out)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))
    for kind in KINDS:
        v = values(kind, 70_007, seed=3)
        for k in ks(v.numel()):
            assert torch.equal(top_k_mask(v.cuda(), k).cpu(), reference_mask(v, k)), (kind, k)
