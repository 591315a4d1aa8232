"""The driver's shared weight file and the block grouping of VLLMBackend.load_weights (no vLLM needed)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from evomerge.fitness.backends.vllm_weights import SharedWeights, checkpoint_tensors
from evomerge.fitness.backends.vllm_worker import block_of


def test_block_of_groups_by_numbered_block():
    assert block_of("model.layers.12.mlp.up_proj.weight") == "model.layers.12"
    assert block_of("model.layers.0.self_attn.q_proj.weight") == "model.layers.0"
    # A layer's experts are one fused MoE weight in vLLM: they must share the layer's block.
    assert block_of("model.layers.3.mlp.experts.7.gate_proj.weight") == "model.layers.3"
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert block_of(name) == ""


@pytest.fixture
def sharded(tmp_path):
    """A two-shard checkpoint with an index: bfloat16 and float32 weights and an int64 buffer."""
    g = torch.Generator().manual_seed(0)
    first = {
        "model.embed_tokens.weight": torch.randn(10, 4, generator=g).bfloat16(),
        "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4, generator=g).bfloat16(),
    }
    second = {
        "model.layers.1.mlp.up_proj.weight": torch.randn(6, 4, generator=g),
        "model.layers.1.counter": torch.arange(3),
        "model.norm.weight": torch.randn(3, generator=g).bfloat16(),  # 6 bytes: the next slot realigns
    }
    save_file(first, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(second, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {name: "model-00001-of-00002.safetensors" for name in first}
    weight_map |= {name: "model-00002-of-00002.safetensors" for name in second}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tmp_path, {**first, **second}


def test_checkpoint_tensors_reads_every_shards_header(sharded):
    path, tensors = sharded
    found = checkpoint_tensors(path)
    assert set(found) == set(tensors)
    assert found["model.layers.0.mlp.up_proj.weight"] == (
        str(path / "model-00001-of-00002.safetensors"),
        "bfloat16",
        (6, 4),
    )
    assert found["model.layers.1.counter"][1:] == ("int64", (3,))
    assert checkpoint_tensors(path / "nothing-here") == {}


def test_shared_weights_cast_fill_and_a_second_mapping_sees_writes(sharded, tmp_path):
    path, tensors = sharded
    shared = SharedWeights(tmp_path / "weights.bin", checkpoint_tensors(path), torch.float32)
    # Floating tensors take the engine's dtype, others keep theirs; every slot is 64-byte aligned.
    assert {name: dtype for name, (_, dtype, _) in shared.slots.items()} == {
        "model.embed_tokens.weight": "float32",
        "model.layers.0.mlp.up_proj.weight": "float32",
        "model.layers.1.counter": "int64",
        "model.layers.1.mlp.up_proj.weight": "float32",
        "model.norm.weight": "float32",
    }
    assert all(offset % SharedWeights.ALIGN == 0 for offset, _, _ in shared.slots.values())
    assert not shared.filled  # nothing is read from the checkpoint until a slot is needed

    new = torch.randn(6, 4, dtype=torch.float64)
    shared.write("model.layers.0.mlp.up_proj.weight", new)
    shared.fill(["model.layers.0.mlp.up_proj.weight", "model.norm.weight", "model.layers.1.counter"])
    assert shared.filled == {
        "model.layers.0.mlp.up_proj.weight",
        "model.norm.weight",
        "model.layers.1.counter",
    }
    # The worker's view: an independent mapping of the same file.
    other = torch.from_file(shared.path, shared=True, size=shared.size, dtype=torch.uint8)

    def read(name):
        offset, dtype, shape = shared.slots[name]
        kind = getattr(torch, dtype)
        return other[offset : offset + kind.itemsize * torch.Size(shape).numel()].view(kind).view(shape)

    # A written slot keeps the new value (cast once), not the checkpoint's; filled ones are cast exactly.
    assert torch.equal(read("model.layers.0.mlp.up_proj.weight"), new.float())
    assert torch.equal(read("model.norm.weight"), tensors["model.norm.weight"].float())
    assert torch.equal(read("model.layers.1.counter"), torch.arange(3))
    assert not read("model.embed_tokens.weight").any()  # never written, never filled

    # dtype None (a quantized engine) keeps every tensor's checkpoint dtype.
    raw = SharedWeights(tmp_path / "raw.bin", checkpoint_tensors(path), None)
    assert raw.slots["model.norm.weight"][1] == "bfloat16"
    raw.fill(["model.norm.weight"])
    assert torch.equal(raw.view("model.norm.weight"), tensors["model.norm.weight"])
