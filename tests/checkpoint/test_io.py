import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.checkpoint import Checkpoint, CheckpointWriter, TensorSpec
from evomerge.checkpoint.naming import is_vocab_tensor, parse, with_layer
from evomerge.checkpoint.writer import output_config, parse_size
from evomerge.errors import CheckpointError


def test_writer_shards_and_reader_reads_back(tmp_path):
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(16, 8) for i in range(5)}
    tensors["model.embed_tokens.weight"] = torch.randn(10, 8).to(torch.bfloat16)
    tensors["counter"] = torch.arange(4)
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    w = CheckpointWriter(tmp_path / "out", specs, max_shard_bytes=1100)
    for n in reversed(list(tensors)):  # any order
        w.write(n, tensors[n])
    out = w.finish({"architectures": ["X"], "num_hidden_layers": 5})
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    ck = Checkpoint(out)
    for n, t in tensors.items():
        assert torch.equal(ck.get(n, dtype=None), t)
        assert torch.equal(load_file(out / index["weight_map"][n])[n], t)  # the safetensors library agrees
    assert not list(tmp_path.glob(".out.partial*"))


def test_large_tensors_read_back_after_early_writeback(tmp_path, monkeypatch):
    """Tensors of several MiB, at offsets that do not fall on page boundaries, are handed to the disk as
    they are written; what is read back is what was written, neighbours included."""
    from evomerge.checkpoint import writer

    calls = []
    real = writer._start_writeback
    monkeypatch.setattr(writer, "_start_writeback", lambda fd, off, n: (calls.append((off, n)), real(fd, off, n)))
    tensors = {"a": torch.randn(3), "b": torch.randn(700_001), "c": torch.randn(3, 5), "d": torch.randn(1 << 20)}
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    w = CheckpointWriter(tmp_path / "out", specs)
    for n, t in tensors.items():
        w.write(n, t)
    out = w.finish({"architectures": ["X"], "num_hidden_layers": 1})
    assert len(calls) == len(tensors)
    back = load_file(out / "model.safetensors")
    assert all(torch.equal(back[n], t) for n, t in tensors.items())


def test_writer_refuses_nonempty_output_and_abort_leaves_nothing(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="not empty"):
        CheckpointWriter(tmp_path / "out", [TensorSpec("a", torch.float32, (2,))])
    w = CheckpointWriter(tmp_path / "new", [TensorSpec("a", torch.float32, (2,))])
    w.abort()
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new*"))
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


def test_writer_checks_shape_and_completeness(tmp_path):
    w = CheckpointWriter(tmp_path / "o", [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.float32, (1,))])
    with pytest.raises(CheckpointError, match="shape"):
        w.write("a", torch.zeros(3))
    w.write("a", torch.zeros(2))
    with pytest.raises(CheckpointError, match="never written"):
        w.finish({})
    w.abort()


def test_reader_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(tmp_path / "nope")
    d = tmp_path / "m"
    d.mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        Checkpoint(d)
    (d / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights"):
        Checkpoint(d)
    torch.save({"w": torch.ones(3)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        Checkpoint(d)
    ck = Checkpoint(d, allow_pickle=True)
    assert torch.equal(ck.get("w"), torch.ones(3))
    (d / "pytorch_model.bin").unlink()
    save_file({"w": torch.ones(1000)}, d / "model.safetensors")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint(d)
    (d / "model.safetensors").write_bytes(b"\xff" * 4)
    with pytest.raises(CheckpointError, match="not a safetensors"):
        Checkpoint(d)


def test_sharded_hf_checkpoint_is_read(tmp_path, zoo):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(zoo["base"])
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ck, ref = Checkpoint(tmp_path / "sharded"), Checkpoint(zoo["base"])
    assert set(ck.names) == set(ref.names)
    for n in ref.names:
        assert torch.equal(ck.get(n), ref.get(n))


@pytest.mark.parametrize("name,layer,component", [
    ("model.embed_tokens.weight", None, "embedding"),
    ("model.layers.3.self_attn.q_proj.weight", 3, "attention"),
    ("model.layers.11.mlp.down_proj.weight", 11, "mlp"),
    ("model.layers.0.post_attention_layernorm.weight", 0, "norm"),
    ("model.norm.weight", None, "norm"),
    ("lm_head.weight", None, "head"),
    ("transformer.wte.weight", None, "embedding"),
    ("transformer.h.1.attn.c_attn.weight", 1, "attention"),
    ("transformer.h.1.mlp.c_fc.bias", 1, "mlp"),
    ("transformer.h.0.ln_1.weight", 0, "norm"),
    ("transformer.ln_f.weight", None, "norm"),
    ("model.layers.2.self_attn.k_proj.bias", 2, "attention"),  # qwen2 biases
    ("backbone.blocks.7.ffn.w1.weight", 7, "mlp"),  # generic fallback
])
def test_naming(name, layer, component):
    info = parse(name)
    assert (info.layer, info.component) == (layer, component)


def test_naming_helpers():
    assert with_layer("model.layers.3.mlp.up_proj.weight", 12) == "model.layers.12.mlp.up_proj.weight"
    assert parse("model.layers.3.self_attn.o_proj.weight").is_branch_output
    assert is_vocab_tensor("lm_head.weight") and not is_vocab_tensor("transformer.wpe.weight")
    with pytest.raises(ValueError):
        with_layer("lm_head.weight", 1)


def test_output_config_follows_layer_origin():
    cfg = {"num_hidden_layers": 3, "layer_types": ["a", "b", "c"], "architectures": ["X"], "dtype": "float32"}
    out = output_config(cfg, dtype=torch.bfloat16, layer_origin=[0, 1, 1, 2])
    assert out["num_hidden_layers"] == 4 and out["layer_types"] == ["a", "b", "b", "c"]
    assert out["dtype"] == "bfloat16" and cfg["num_hidden_layers"] == 3


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 1024**3 and parse_size(100) == 100
    with pytest.raises(ValueError, match="size"):
        parse_size("lots")


def test_reading_releases_pages(tmp_path):
    """Reading every tensor keeps resident memory near one tensor, not the whole file."""
    import psutil

    big = {f"t{i}": torch.randn(1024, 1024) for i in range(24)}  # 96 MiB
    d = tmp_path / "big"
    d.mkdir()
    (d / "config.json").write_text("{}")
    save_file(big, d / "model.safetensors")
    del big
    proc = psutil.Process()
    ck = Checkpoint(d)
    before = proc.memory_info().rss
    peak = 0
    for n in ck.names:
        t = ck.get(n)
        peak = max(peak, proc.memory_info().rss - before)
        del t
    assert peak < 40 * 2**20, f"resident memory grew by {peak / 2**20:.0f} MiB while reading 96 MiB"
