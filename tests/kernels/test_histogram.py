"""Magnitude histograms (kernels/histogram.py): where the k-th largest magnitude lies, exactly."""

from __future__ import annotations

import struct

import pytest
import torch

from evomerge.kernels.histogram import IMPURE_MARK, HistogramBuilder, impure_bounds, key_value


def _keys(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-16-bit keys and impure marks of non-negative float32 values, with integer operations."""
    bits = values.view(torch.int32)
    marks = torch.where((bits & 0xFFFF) != 0, IMPURE_MARK, 0).to(torch.int16)
    return (bits >> 16).to(torch.int16), marks


def _magnitudes(scale: float, seed: int = 0) -> torch.Tensor:
    """Task-vector-like magnitudes: bf16-exact differences (many ties), some impure ones, zeros."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(20_000, generator=g) * 0.02).to(torch.bfloat16).float()
    other = (base + torch.randn(20_000, generator=g) * 0.002).to(torch.bfloat16).float()
    other[:2000] = base[:2000]  # unchanged entries: magnitude 0
    return ((other - base).abs() * scale).contiguous()


def _build(values: torch.Tensor, pieces: int = 3):
    builder = HistogramBuilder()
    for chunk in values.tensor_split(pieces):
        keys, marks = _keys(chunk)
        builder.add(keys, marks if bool(marks.any()) else None, float(chunk.max()))
    return builder.finish()


@pytest.mark.parametrize("scale", [1.0, 2.0 ** 10])  # below 2.0: one combined bincount; above: two
def test_locate_agrees_with_sorting(scale):
    values = _magnitudes(scale)
    keys, marks = _keys(values)
    impure = marks != 0
    assert 0.01 < float(impure.float().mean()) < 0.5  # both kinds present
    hist = _build(values)
    ordered = values.sort(descending=True).values
    n = values.numel()
    for k in [1, 2, 17, n // 10, n // 3, n // 2, n - 2001, n - 2000, n - 1999, n]:
        at = hist.locate(k)
        assert at.key == int(ordered[k - 1].view(torch.int32)) >> 16
        assert at.above == int((keys > at.key).sum())
        assert at.count == int((keys == at.key).sum())
        assert at.impure == int(((keys == at.key) & impure).sum())
        in_bucket = values[keys == at.key]
        assert int((in_bucket == at.value).sum()) == at.count - at.impure  # pure members equal the value
    with pytest.raises(ValueError, match="k must lie"):
        hist.locate(n + 1)
    used = int((torch.bincount(keys.to(torch.int64)) > 0).sum())
    assert hist.nbytes <= 32 * used  # the keys in use only, not the span from 0 (zeros) to the largest


def test_all_pure_chunks_skip_the_impure_counts():
    values = torch.tensor([0.0, 0.5, 0.5, 1.0, 0.25] * 100)
    builder = HistogramBuilder()
    keys, _ = _keys(values)
    builder.add(keys, None, 1.0)
    hist = builder.finish()
    assert hist.impure is None
    at = hist.locate(150)  # the 101st..300th largest are 0.5
    assert (at.value, at.above, at.count, at.impure) == (0.5, 100, 200, 0)


def _bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


@pytest.mark.parametrize("key", [0, 1, 0x007F, 0x0080, 0x3A8F, 0x3F80, 0x7F7F])
def test_impure_bounds_are_the_bucket_without_its_value(key):
    lo, hi = impure_bounds(key)
    assert _bits(lo) >> 16 == key and _bits(hi) >> 16 == key
    assert lo > key_value(key) and _bits(lo) - 1 == _bits(key_value(key))  # just above the pure value
    assert _bits(hi) + 1 == (key + 1) << 16  # just below the next bucket
