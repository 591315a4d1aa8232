"""Fused (torch.compile) chunk kernels: agreement with the whole-tensor kernels, seeded randomness, and the
eager fallback. Compiling takes seconds per kernel structure, so the cases share a few structures."""

from __future__ import annotations

import logging
import struct

import pytest
import torch

from evomerge.kernels import TensorContext, chunked, fused, get_method, native, settle
from evomerge.kernels.select import StreamTopK, hashed_uniform, uniform

pytestmark = pytest.mark.slow

N = 3 * (1 << 14) + 4096 + 123  # several chunks, a partial chunk and a partial tie-count block


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    if fused.available() is not None:
        pytest.skip(f"no compiled kernels here: {fused.available()}")
    monkeypatch.setenv(fused.ENV, "1")
    monkeypatch.setattr(fused, "CHUNK", 1 << 14)


@pytest.fixture(params=["native", "compiled"])
def topk_path(request, monkeypatch):
    """Top-k merges on the CPU: by the native kernel (kernels/native.py), or by compiled kernels alone."""
    if request.param == "native" and native.available() is not None:
        pytest.skip(native.available())
    if request.param == "compiled":
        monkeypatch.setenv(native.ENV, "0")
    return request.param


def models(kind: str, n: int = N, dtype=torch.bfloat16, seed: int = 0) -> list[torch.Tensor]:
    """Two experts and a base: random deltas, heavily tied deltas, or mostly unchanged entries."""
    g = torch.Generator().manual_seed(seed)
    if kind == "tied":  # small integer multiples of 2^-8: exact in bf16, thousands of equal magnitudes
        base = torch.randint(-64, 64, (n,), generator=g) / 256.0
        xs = [base + torch.randint(-3, 4, (n,), generator=g) / 256.0 for _ in range(2)]
    elif kind == "unchanged":  # 90% of entries equal the base: the k-th largest delta is 0
        base = torch.randn(n, generator=g) * 0.02
        xs = [torch.where(torch.rand(n, generator=g) < 0.9, base, base + torch.randn(n, generator=g) * 0.002)
              for _ in range(2)]
    else:
        base = torch.randn(n, generator=g) * 0.02
        xs = [base + torch.randn(n, generator=g) * 0.002 for _ in range(2)]
    return [t.to(dtype) for t in (*xs, base)]


def both(name: str, raws, params: list[dict], out_dtype=torch.float32, seed: int = 3, **gp):
    """(whole-tensor eager kernel, fused chunks) outputs for sources raws[:-1] over base raws[-1]."""
    m = get_method(name)
    mps = [m.model_params(**p) for p in params]
    gps = m.global_params(**gp)
    ctx = TensorContext("model.layers.0.mlp.up_proj.weight", seed=seed, model_ids=("a", "b"))
    ref = m.fn([r.to(torch.float32, copy=True) for r in raws[:-1]], raws[-1].float(), mps, gps, ctx).to(out_dtype)
    out = torch.empty(raws[0].shape, dtype=out_dtype)
    chunked.run_fused(m.fn, list(raws), mps, gps, ctx, out)
    return ref, out


def close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """float32 agreement to 1e-6 relative (eager's fused multiply-add can move the last bit)."""
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))


CASES = [
    ("task_arithmetic", [{"weight": 0.7}, {"weight": 0.5}], {}),
    ("task_arithmetic", [{"weight": 1.0}, {"weight": -0.95}], {"normalize": True}),  # 1/0.05: task-vector form
    ("ties", [{"weight": 0.7, "density": 0.4}, {"weight": 0.5, "density": 1.0}], {}),
    ("ties", [{"weight": 1.0, "density": 0.0}, {"weight": 0.5, "density": 0.3}], {"lam": 0.8}),
    ("breadcrumbs_ties", [{"weight": 0.7, "density": 0.8, "gamma": 0.05}, {"weight": 0.5, "density": 0.5}], {}),
    ("breadcrumbs", [{"weight": 0.7, "density": 0.6, "gamma": 0.2}, {"weight": 0.5, "density": 0.9}], {}),
    ("dare_ties", [{"weight": 0.7, "density": 0.4}, {"weight": 0.5, "density": 0.9}], {}),
    ("dare_linear", [{"weight": 0.7, "density": 0.3}, {"weight": 0.5, "density": 1.0}], {"rescale": "none"}),
]


@pytest.mark.parametrize("kind", ["random", "tied", "unchanged"])
@pytest.mark.parametrize("name,params,gp", CASES)
def test_fused_agrees_with_whole_tensor_kernel(name, params, gp, kind, topk_path):
    ref, out = both(name, models(kind), params, **gp)
    close(out, ref)


def test_fused_bf16_output_and_float32_subnormal_deltas(topk_path):
    ref, out = both("ties", models("random"), [{"density": 0.5}, {"density": 0.5}], out_dtype=torch.bfloat16)
    assert torch.equal(out.float(), ref.float())
    raws = [t * 1e-36 for t in models("random", dtype=torch.float32)]  # deltas ~1e-39: subnormal floats
    ref, out = both("ties", raws, [{"density": 0.5}, {"density": 0.7}])
    assert torch.equal(out, ref)


@pytest.mark.parametrize("kind,dtype", [("random", torch.bfloat16), ("tied", torch.bfloat16),
                                        ("unchanged", torch.bfloat16), ("random", torch.float32)])
def test_kept_histograms_settle_new_densities_exactly(kind, dtype, topk_path):
    """A search merges the same sources with new densities: the histograms built by the first merge settle
    the later ones (float32 inputs: thresholds among impure magnitudes, settled by an exact bracket)."""
    raws = models(kind, dtype=dtype)
    m = get_method("ties")
    ctx = TensorContext("t", model_ids=("a", "b"))
    store = settle.HistogramStore()
    kept = None
    for d1, d2 in [(0.4, 0.7), (0.05, 0.95), (0.6, 0.3), (0.4, 0.7)]:
        mps = [m.model_params(weight=0.7, density=d1), m.model_params(weight=0.5, density=d2)]
        gp = m.global_params()
        ref = m.fn([r.to(torch.float32, copy=True) for r in raws[:-1]], raws[-1].float(), mps, gp, ctx)
        out = torch.empty(N)
        chunked.run_fused(m.fn, list(raws), mps, m.global_params(), ctx, out, histograms=store)
        close(out, ref)
        kept = kept or dict(store.kept)
        assert store.kept == kept  # the same histogram objects: built once per source, then reused
    assert set(kept) == {0, 1}


def test_a_tie_cut_one_past_a_chunk_start_runs_a_one_entry_piece(monkeypatch):
    """The kept ties end right after the first entry of a chunk: that entry is merged on its own (compiled
    kernels; the native kernel places cuts inside its single pass)."""
    monkeypatch.setenv(native.ENV, "0")
    n, chunk = N, fused.CHUNK
    base = torch.zeros(n)
    x = torch.zeros(n)
    x[:100] = 2 / 256  # the largest magnitudes: kept
    ties = torch.arange(chunk - 384, chunk + 116)  # 500 equal magnitudes across the first chunk boundary
    x[ties] = -1 / 256
    raws = [x.to(torch.bfloat16), (x * 0.5).to(torch.bfloat16), base.to(torch.bfloat16)]
    k = 100 + 385  # keeps the ties up to and including position `chunk`
    m = get_method("ties")
    mps = [m.model_params(weight=0.7, density=k / n), m.model_params(weight=0.5, density=1.0)]
    ctx = TensorContext("t", model_ids=("a", "b"))
    gp = m.global_params()
    ref = m.fn([r.to(torch.float32, copy=True) for r in raws[:-1]], raws[-1].float(), mps, gp, ctx)
    out = torch.empty(n)
    pieces = []
    monkeypatch.setattr(chunked, "_check", lambda flags, spans, on_nonfinite: pieces.extend(spans))
    chunked.run_fused(m.fn, raws, mps, m.global_params(), ctx, out, histograms=settle.HistogramStore())
    assert (chunk, chunk + 1) in pieces
    assert torch.equal(out, ref)
    assert float(out[chunk]) != float(out[chunk + 1])  # kept tie, then a dropped one


@pytest.mark.parametrize("path", ["compiled", "native"])
def test_histogram_keys_kernel_truncates_like_bit_operations(path):
    if path == "native" and native.available() is not None:
        pytest.skip(native.available())
    g = torch.Generator().manual_seed(1)
    spread = torch.rand(100_000, generator=g) * 10.0 ** torch.randint(-45, 38, (100_000,), generator=g).float()
    patterns = torch.arange(0, 0x7F80, 7, dtype=torch.int32) << 16
    edges = [(patterns + d).view(torch.float32) for d in (0, 1, 0x7FFF, 0x8000, 0x8001)]
    special = torch.tensor([0.0, 2.0 ** -126, 2.0 ** -127, 2.0 ** -133, 2.0 ** -149, 1.0, 3.4e38, float("inf"),
                            float("nan")])
    v = torch.cat([spread, *edges, special])
    if path == "native":
        key, mark, impure, largest = native.histogram_keys([v, torch.zeros_like(v)], (0,))
        assert float(largest) == float("inf")
        v = v[:-2]  # and without the infinite and NaN values: the largest finite one
        assert native.histogram_keys([v, torch.zeros_like(v)], (0,))[3] == float(v.abs().max())
        key, mark, impure, largest = native.histogram_keys([v.to(torch.float16)[:0], v.new_zeros(0)], (0,))
        assert key.numel() == 0 and impure == 0
        v = torch.cat([v, special[-2:]])
        key, mark, impure, largest = native.histogram_keys([v, torch.zeros_like(v)], (0,))
    else:
        body = fused.kernel(("keys-test",), lambda: fused.histogram_keys_body(1, (0,)), "cpu", exact_casts=True)
        key, mark, impure, largest = body(v, torch.zeros_like(v))
    clean = torch.where(torch.isnan(v), float("inf"), v.abs())  # NaN counts as +inf
    bits = clean.view(torch.int32)
    assert torch.equal(key.view(torch.int16), (bits >> 16).to(torch.int16))
    inexact = (bits & 0xFFFF) != 0
    assert torch.equal(mark.view(torch.int16) != 0, inexact) and int(impure) == int(inexact.sum())
    assert float(largest) == float("inf")


def test_fused_dare_is_deterministic_and_seeded():
    raws = models("random")
    params = [{"density": 0.5}, {"density": 0.5}]
    _, a = both("dare_ties", raws, params, seed=1)
    _, b = both("dare_ties", raws, params, seed=1)
    _, c = both("dare_ties", raws, params, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_hashed_uniform_matches_between_eager_and_compiled():
    low = torch.arange(5, 5 + 70_001, dtype=torch.int64)
    draw = torch.compile(lambda pos, k1, k2: hashed_uniform(pos, k1, k2), dynamic=True, fullgraph=True)
    k1, k2 = torch.tensor(0x9E3779B9), torch.tensor(0x7F4A7C15)
    assert torch.equal(draw(low, k1, k2), hashed_uniform(low, int(k1), int(k2)))
    u = uniform(7, "m", "t", 0, 1 << 20)
    assert torch.equal(u[5:70_006], uniform(7, "m", "t", 5, 70_006))  # any chunking draws the same values
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0 and abs(float(u.mean()) - 0.5) < 3e-3


@pytest.mark.parametrize("bucket", [0, 1, 0x3A8F, 0x3F80, 0x7F7F])
def test_bucket_range_gives_exact_low_bits(bucket):
    sel = StreamTopK(1, 2)
    sel.bucket = bucket
    lo, hi, f1, f2 = sel.bucket_range()
    bits = torch.arange(0, 1 << 16, 97, dtype=torch.int64) | (bucket << 16)
    values = torch.tensor([struct.unpack("<f", struct.pack("<I", b))[0] for b in bits.tolist()], dtype=torch.float32)
    assert bool(((values >= lo) & (values < hi)).all())
    assert torch.equal(((values - lo) * f1 * f2).to(torch.int64), bits & 0xFFFF)
    assert struct.unpack("<I", struct.pack("<f", hi))[0] == (bucket + 1) << 16


def test_nonfinite_chunks_are_reported(topk_path):
    raws = models("random")
    raws[1][20_000] = float("inf")
    seen = []
    m = get_method("ties")
    mps = [m.model_params(density=0.5)] * 2
    chunked.run_fused(m.fn, raws, mps, m.global_params(), TensorContext("t", model_ids=("a", "b")),
                      torch.empty(N), on_nonfinite=lambda a, b: seen.append((a, b)))
    # one report, for the chunk holding the entry (TIES on the CPU: a piece of it, or the entry itself)
    assert len(seen) == 1 and 16_384 <= seen[0][0] <= 20_000 < seen[0][1] <= 32_768


def test_nan_among_magnitudes_settled_by_histograms_is_reported(monkeypatch, topk_path):
    """float32 inputs: the k-th magnitude lies among inexact ones, whose bracket a NaN leaves unsettled; the
    exact passes settle it and the NaN's chunk is reported."""
    exact = []
    settle_exactly = settle.exactly
    monkeypatch.setattr(settle, "exactly", lambda live, *a: (exact.append(len(live)), settle_exactly(live, *a)))
    raws = models("random", dtype=torch.float32)
    raws[1][20_000] = float("nan")
    seen = []
    m = get_method("ties")
    mps = [m.model_params(density=0.5)] * 2
    chunked.run_fused(m.fn, raws, mps, m.global_params(), TensorContext("t", model_ids=("a", "b")),
                      torch.empty(N), on_nonfinite=lambda a, b: seen.append((a, b)), histograms=settle.HistogramStore())
    assert exact == [1]  # the model with the NaN
    assert len(seen) == 1 and 16_384 <= seen[0][0] <= 20_000 < seen[0][1] <= 32_768


def test_compile_failure_falls_back_to_eager_once(monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(fused, "_kernels", {})
    monkeypatch.setattr(fused, "_disabled", None)
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    monkeypatch.setenv(native.ENV, "0")  # TIES would not call a compiled kernel otherwise
    m = get_method("ties")
    mps = [m.model_params(density=0.5)] * 2
    with caplog.at_level(logging.WARNING), pytest.raises(fused.Unavailable):
        chunked.run_fused(m.fn, models("random"), mps, m.global_params(), TensorContext("t", model_ids=("a", "b")),
                          torch.empty(N))
    assert "merging eagerly" in caplog.text and fused.available() is not None
    assert not fused.wanted(("any",), 1 << 30, torch.device("cpu"))


def test_when_compiled_kernels_are_used(monkeypatch):
    monkeypatch.setattr(fused, "_repeats", False)  # as in a process that is no search evaluator
    cpu = torch.device("cpu")
    key = ("test-structure",)
    assert fused.wanted(key, fused.MIN_NUMEL, cpu) and not fused.wanted(key, fused.MIN_NUMEL - 1, cpu)
    assert not fused.wanted(key, 1 << 30, torch.device("meta"))
    monkeypatch.setenv(fused.ENV, "0")
    assert not fused.wanted(key, 1 << 30, cpu)
    monkeypatch.delenv(fused.ENV)  # auto: once the structure has spent AUTO_AFTER_S in eager loops
    assert not fused.wanted(key, 1 << 30, cpu)
    fused.note_eager(key, fused.AUTO_AFTER_S)
    assert fused.wanted(key, 1 << 30, cpu)
    # a search's evaluator compiles every structure at its first large tensor
    other = ("another-structure",)
    assert not fused.wanted(other, 1 << 30, cpu)
    fused.expect_repeats()
    assert fused.wanted(other, 1 << 30, cpu) and not fused.wanted(other, fused.MIN_NUMEL - 1, cpu)
    monkeypatch.setenv(fused.ENV, "0")
    assert not fused.wanted(other, 1 << 30, cpu)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", ["random", "tied", "unchanged"])
@pytest.mark.parametrize("name,params,gp", CASES)
def test_fused_on_cuda_agrees_with_whole_tensor_kernel(monkeypatch, name, params, gp, kind):
    """Triton kernels on CUDA tensors, several chunks: the CPU whole-tensor result to float32 rounding
    (selections and DARE draws exactly: a wrong entry would differ by a whole delta)."""
    monkeypatch.setattr(fused, "CUDA_CHUNK", 1 << 14)
    raws = models(kind)
    m = get_method(name)
    mps = [m.model_params(**p) for p in params]
    gps = m.global_params(**gp)
    ctx = TensorContext("model.layers.0.mlp.up_proj.weight", seed=3, model_ids=("a", "b"))
    ref = m.fn([r.float() for r in raws[:-1]], raws[-1].float(), mps, gps, ctx)
    out = torch.empty(N, device="cuda")
    chunked.run_fused(m.fn, [r.cuda() for r in raws], mps, gps, ctx, out)
    assert out.device.type == "cuda"
    close(out.cpu(), ref)
