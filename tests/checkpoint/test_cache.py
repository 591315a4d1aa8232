"""Checkpoints kept open across plans: mapped reads equal pread reads, and a changed file is read afresh."""

import json
import os
import struct

import pytest
import torch
from safetensors.torch import save, save_file

from evomerge.checkpoint import Checkpoint, CheckpointWriter, TensorSpec
from evomerge.checkpoint.reader import CheckpointCache
from evomerge.plan import build_plan
from evomerge.recipe.schema import Recipe, Source


def _model(path, tensors, layers=1):
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"architectures": ["X"], "num_hidden_layers": layers}))
    return path


def _all(ck):
    return {n: ck.get(n, dtype=None) for n in ck.names}


def test_mapped_reads_equal_pread_reads(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f32": torch.randn(7, 5, generator=g),
        "bf16": torch.randn(3, 9, generator=g).to(torch.bfloat16),
        "f16": torch.randn(11, generator=g).to(torch.float16),
        "i64": torch.arange(6).reshape(2, 3),
        "u8": torch.arange(5, dtype=torch.uint8),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    w = CheckpointWriter(tmp_path / "sharded", specs, max_shard_bytes=120)
    for n, t in tensors.items():
        w.write(n, t)
    sharded = w.finish({"architectures": ["X"], "num_hidden_layers": 1})
    assert len(list(sharded.glob("*.safetensors"))) > 1
    for path in (_model(tmp_path / "single", tensors), sharded):
        with Checkpoint(path) as plain, Checkpoint(path, mapped=True) as mapped:
            for n, t in tensors.items():
                assert torch.equal(mapped.get(n, dtype=None), t) and mapped.get(n, dtype=None).dtype == t.dtype
                assert torch.equal(mapped.get(n, dtype=None), plain.get(n, dtype=None))
                if t.dtype.is_floating_point:
                    assert torch.equal(mapped.get(n), plain.get(n))  # cast to float32 on the way out


def test_mapped_get_hands_out_copies(tmp_path):
    path = _model(tmp_path / "m", {"w": torch.ones(4, 4)})
    with Checkpoint(path, mapped=True) as ck:
        first = ck.get("w", dtype=None)
        first.mul_(3)  # kernels work in place on their inputs
        assert torch.equal(ck.get("w", dtype=None), torch.ones(4, 4))
    assert torch.equal(Checkpoint(path).get("w", dtype=None), torch.ones(4, 4))  # the file is untouched


def test_misaligned_tensor_is_read_with_pread(tmp_path):
    """Safetensors writers align tensors, but the format allows any offset: a float32 tensor one byte in
    cannot be viewed in place, so it is read the ordinary way."""
    header = {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-(8 + len(raw)) % 4)  # data starts 4-aligned, so 'b' starts at an odd offset
    path = tmp_path / "m"
    path.mkdir()
    (path / "model.safetensors").write_bytes(
        struct.pack("<Q", len(raw)) + raw + bytes([7]) + struct.pack("<2f", 1.5, -2.0))
    (path / "config.json").write_text(json.dumps({"architectures": ["X"], "num_hidden_layers": 1}))
    with Checkpoint(path, mapped=True) as ck:
        assert ck.meta("b").start % 4 == 1
        assert torch.equal(ck.get("b", dtype=None), torch.tensor([1.5, -2.0]))
        assert torch.equal(ck.get("a", dtype=None), torch.tensor([7], dtype=torch.uint8))


def test_cache_reuses_an_unchanged_checkpoint(tmp_path):
    path = _model(tmp_path / "m", {"w": torch.ones(2)})
    cache = CheckpointCache()
    ck = cache.open(path)
    assert cache.open(tmp_path / "." / "m") is ck  # keyed by resolved path
    assert cache.opened == 1
    cache.close()
    assert torch.equal(cache.open(path).get("w"), torch.ones(2)) and cache.opened == 2


@pytest.mark.parametrize("how", ["rewritten in place", "replaced by rename", "config edited"])
def test_cache_reopens_a_changed_checkpoint(tmp_path, how):
    path = _model(tmp_path / "m", {"w": torch.ones(8), "b": torch.zeros(3)})
    cache = CheckpointCache()
    before = cache.open(path)
    assert torch.equal(before.get("w"), torch.ones(8))
    new = {"w": torch.full((8,), 2.0), "b": torch.ones(3)}
    weights = path / "model.safetensors"
    if how == "rewritten in place":  # same inode, same size, new bytes
        inode, size = os.stat(weights).st_ino, os.stat(weights).st_size
        data = save(new)
        assert len(data) == size
        with open(weights, "r+b") as f:
            f.write(data)
        assert os.stat(weights).st_ino == inode
        # File times can be coarser than two writes in a row: move the clock on as a later write would.
        st = os.stat(weights)
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    elif how == "replaced by rename":
        save_file({"b": torch.ones(3), "w": torch.full((8,), 2.0)}, str(tmp_path / "tmp.safetensors"))
        os.replace(tmp_path / "tmp.safetensors", weights)
    else:
        (path / "config.json").write_text(json.dumps({"architectures": ["X"], "num_hidden_layers": 2}))
    after = cache.open(path)
    assert after is not before and cache.opened == 2
    if how == "config edited":
        assert after.num_layers == 2
    else:
        assert torch.equal(after.get("w"), torch.full((8,), 2.0)) and torch.equal(after.get("b"), torch.ones(3))
    assert cache.open(path) is after


def test_cache_keeps_at_most_size_open(tmp_path):
    paths = [_model(tmp_path / f"m{i}", {"w": torch.full((2,), float(i))}) for i in range(3)]
    cache = CheckpointCache(size=2)
    first = cache.open(paths[0])
    cache.open(paths[1])
    cache.open(paths[0])  # most recent now: paths[1] goes first
    cache.open(paths[2])
    assert cache.open(paths[0]) is first and cache.opened == 3
    cache.open(paths[1])
    assert cache.opened == 4
    with pytest.raises(ValueError, match="size"):
        CheckpointCache(size=0)


def test_plan_through_a_cache_equals_a_plain_plan_and_leaves_it_open(zoo, tmp_path):
    recipe = Recipe(method="task_arithmetic", base=str(zoo["base"]),
                    sources=[Source(model=str(zoo["e1"]), parameters={"weight": 0.7}),
                             Source(model=str(zoo["e2"]), parameters={"weight": 0.4})])
    cache = CheckpointCache()
    plain = build_plan(recipe, tmp_path, seed=1)
    cached = build_plan(recipe, tmp_path, seed=1, checkpoints=cache)
    assert cached.jobs == plain.jobs and cached.layer_origin == plain.layer_origin
    assert cached.out_dtype == plain.out_dtype and cached.donor == plain.donor
    cached.close()
    plain.close()
    again = build_plan(recipe, tmp_path, seed=1, checkpoints=cache)
    assert all(a is b for a, b in zip(again.checkpoints, cached.checkpoints, strict=True))
    job = again.jobs[0]
    assert torch.equal(again.checkpoints[job.inputs[0].model].get(job.inputs[0].name),
                       Checkpoint(zoo["e1"]).get(job.inputs[0].name))
