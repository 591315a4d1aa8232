"""End to end: recipes over tiny checkpoints, through the planner and the streaming executor."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from evomerge.checkpoint import Checkpoint
from evomerge.cli import main
from evomerge.errors import CheckpointError, NonFiniteError, RecipeError
from evomerge.kernels import TensorContext, get_method
from evomerge.merge import run_merge
from evomerge.plan import build_plan
from evomerge.recipe import load_recipe


def merge(tmp_path, text, name="out", **kw):
    r = tmp_path / f"{name}.yaml"
    r.write_text(text)
    recipe, root = load_recipe(r)
    plan = build_plan(recipe, root, seed=kw.pop("seed", None))
    try:
        return run_merge(plan, tmp_path / name, progress=False, **kw), plan
    finally:
        plan.close()


def generate(path, prompt="the cat sat"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4
    return model


def recipe_for(zoo, method="ties", extra=""):
    return f"""
method: {method}
base: {zoo['base']}
sources:
  - model: {zoo['e1']}
    parameters: {{weight: 0.6, density: [0.3, 0.9]}}
  - model: {zoo['e2']}
    parameters: {{weight: 0.4, density: 0.5}}
{extra}"""


def test_merged_llama_loads_generates_and_matches_in_memory_merge(tmp_path, zoo):
    out, plan = merge(tmp_path, recipe_for(zoo, extra="dtype: bfloat16\n"))
    model = generate(out)
    assert model.dtype == torch.bfloat16
    assert (out / "tokenizer.json").read_bytes() == (zoo["base"] / "tokenizer.json").read_bytes()
    # Reference: whole state dicts in memory, the kernel applied tensor by tensor with hand-resolved params.
    sds = {k: load_file(zoo[k] / "model.safetensors") for k in ("base", "e1", "e2")}
    merged = load_file(out / "model.safetensors")
    ties = get_method("ties")
    n_layers = 4
    for name, b in sds["base"].items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        t = 0.0 if "embed" in name else (1.0 if layer is None else layer / (n_layers - 1))
        mps = [ties.model_params(weight=0.6, density=0.3 + 0.6 * t), ties.model_params(weight=0.4, density=0.5)]
        ref = ties.fn([sds["e1"][name].float(), sds["e2"][name].float()], b.float(), mps, ties.global_params(),
                      TensorContext(name, model_ids=("e1", "e2")))
        torch.testing.assert_close(merged[name], ref.to(torch.bfloat16), atol=0, rtol=0)


def test_sharded_output_loads(tmp_path, zoo):
    out, _ = merge(tmp_path, recipe_for(zoo, "task_arithmetic").replace(", density: [0.3, 0.9]", "")
                   .replace(", density: 0.5", ""), max_shard_bytes=20_000)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2
    assert (out / "model.safetensors.index.json").exists()
    generate(out)


def test_layer_slices_make_a_deeper_model(tmp_path, zoo):
    text = f"""
method: passthrough
slices:
  - sources: [{{model: {zoo['e1']}, layer_range: [0, 3]}}]
  - sources: [{{model: {zoo['e2']}, layer_range: [1, 4], parameters: {{scale: [{{filter: o_proj, value: 0.5}}, {{value: 1.0}}]}}}}]
"""
    out, plan = merge(tmp_path, text)
    model = generate(out)
    assert model.config.num_hidden_layers == 6 and plan.layer_origin == [0, 1, 2, 1, 2, 3]
    got = load_file(out / "model.safetensors")
    e1 = load_file(zoo["e1"] / "model.safetensors")
    e2 = load_file(zoo["e2"] / "model.safetensors")
    assert torch.equal(got["model.layers.2.mlp.up_proj.weight"], e1["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(got["model.layers.3.mlp.up_proj.weight"], e2["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(got["model.layers.5.self_attn.o_proj.weight"], 0.5 * e2["model.layers.3.self_attn.o_proj.weight"])
    assert torch.equal(got["model.embed_tokens.weight"], e1["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], e2["model.norm.weight"])


def test_slices_with_a_merge_method_and_base(tmp_path, zoo):
    text = f"""
method: task_arithmetic
base: {zoo['base']}
slices:
  - sources: [{{model: {zoo['base']}, layer_range: [0, 4]}}, {{model: {zoo['e1']}, layer_range: [0, 4]}}]
  - sources: [{{model: {zoo['base']}, layer_range: [2, 4]}}, {{model: {zoo['e2']}, layer_range: [2, 4]}}]
"""
    out, _ = merge(tmp_path, text)
    assert generate(out).config.num_hidden_layers == 6


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_randomized_merge_is_reproducible_by_seed(tmp_path, zoo, method):
    text = recipe_for(zoo, method).replace("[0.3, 0.9]", "0.5")
    a, _ = merge(tmp_path, text, "a", seed=7)
    b, _ = merge(tmp_path, text, "b", seed=7)
    c, _ = merge(tmp_path, text, "c", seed=8)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_depth_scaling_modifier(tmp_path, zoo):
    plain, _ = merge(tmp_path, recipe_for(zoo, "task_arithmetic").replace(", density: [0.3, 0.9]", "")
                     .replace(", density: 0.5", ""), "plain")
    scaled, _ = merge(tmp_path, recipe_for(zoo, "task_arithmetic").replace(", density: [0.3, 0.9]", "")
                      .replace(", density: 0.5", "") + "depth_scaling: {alpha: 0.5, beta: 0.5}\n", "scaled")
    p, s = load_file(plain / "model.safetensors"), load_file(scaled / "model.safetensors")
    b = load_file(zoo["base"] / "model.safetensors")
    for name, factor in [("model.layers.0.mlp.up_proj.weight", 0.5), ("model.layers.3.mlp.up_proj.weight", 1.0),
                         ("model.embed_tokens.weight", 0.5)]:
        torch.testing.assert_close(s[name] - b[name], factor * (p[name] - b[name]), atol=1e-6, rtol=1e-5)


def test_tied_embeddings_and_gpt2(tmp_path, zoo):
    from evomerge.zoo.tiny import expert_of, tiny_gpt2, tiny_llama

    tb = tiny_llama(tmp_path / "tb", tie=True)
    te = expert_of(tb, tmp_path / "te", seed=3)
    out, _ = merge(tmp_path, f"method: task_arithmetic\nbase: {tb}\nsources: [{{model: {te}}}]\n", "tied")
    assert "lm_head.weight" not in Checkpoint(out).names
    generate(out)
    g2 = expert_of(zoo["gpt2"], tmp_path / "g2", seed=4)
    out, _ = merge(tmp_path, f"method: ties\nbase: {zoo['gpt2']}\nsources: [{{model: {g2}, parameters: {{density: 0.5}}}}]\n",
                   "gpt2")
    generate(out)
    del tiny_gpt2


def test_vocab_mismatch_merges_common_rows(tmp_path, zoo):
    text = f"method: linear\nsources: [{{model: {zoo['bigvocab']}}}, {{model: {zoo['base']}}}]\n"
    out, plan = merge(tmp_path, text)
    assert any("vocabulary sizes differ" in n for n in plan.notes)
    got = load_file(out / "model.safetensors")["model.embed_tokens.weight"]
    big = load_file(zoo["bigvocab"] / "model.safetensors")["model.embed_tokens.weight"]
    small = load_file(zoo["base"] / "model.safetensors")["model.embed_tokens.weight"]
    n = small.shape[0]
    assert got.shape == big.shape
    torch.testing.assert_close(got[:n], (big[:n] + small) / 2)
    assert torch.equal(got[n:], big[n:])
    generate(out)


# ------------------------------------------------------------------ bad input: clear errors, nothing lost


def test_wrong_path(tmp_path, zoo):
    with pytest.raises(CheckpointError, match="does not exist"):
        merge(tmp_path, recipe_for(zoo).replace(str(zoo["e2"]), str(tmp_path / "nowhere")))
    assert not (tmp_path / "out").exists()


def test_mismatched_architectures(tmp_path, zoo):
    with pytest.raises(CheckpointError, match="different architectures.*GPT2LMHeadModel"):
        merge(tmp_path, recipe_for(zoo).replace(str(zoo["e2"]), str(zoo["gpt2"])))


def test_different_layer_counts(tmp_path, zoo):
    with pytest.raises(CheckpointError, match="different layer counts"):
        merge(tmp_path, recipe_for(zoo).replace(str(zoo["e2"]), str(zoo["deep"])))


def with_bad_value(tmp_path, source, name, tensor, index, value):
    """A copy of checkpoint ``source`` at tmp_path/name whose ``tensor`` holds ``value`` at ``index``."""
    bad = tmp_path / name
    shutil.copytree(source, bad)
    sd = load_file(bad / "model.safetensors")
    sd[tensor][index] = value
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    return bad


def test_nan_weights_are_refused_and_nothing_is_written(tmp_path, zoo):
    bad = with_bad_value(tmp_path, zoo["e2"], "nan", "model.layers.2.mlp.up_proj.weight", (0, 0), float("nan"))
    with pytest.raises(NonFiniteError, match=r"model.layers.2.mlp.up_proj.weight' of model '.*nan' contains NaN"):
        merge(tmp_path, recipe_for(zoo).replace(str(zoo["e2"]), str(bad)))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial*"))


def test_missing_tensor(tmp_path, zoo):
    bad = tmp_path / "missing"
    shutil.copytree(zoo["e2"], bad)
    sd = load_file(bad / "model.safetensors")
    del sd["model.layers.1.mlp.gate_proj.weight"]
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing from some models.*model.layers.1.mlp.gate_proj.weight"):
        merge(tmp_path, recipe_for(zoo).replace(str(zoo["e2"]), str(bad)))


def test_shape_mismatch(tmp_path, zoo):
    bad = tmp_path / "shape"
    shutil.copytree(zoo["e2"], bad)
    sd = load_file(bad / "model.safetensors")
    sd["model.layers.1.mlp.gate_proj.weight"] = torch.zeros(3, 3)
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="differ in shape.*gate_proj"):
        merge(tmp_path, recipe_for(zoo).replace(str(zoo["e2"]), str(bad)))


def test_method_constraints(tmp_path, zoo):
    with pytest.raises(RecipeError, match="needs a base"):
        merge(tmp_path, recipe_for(zoo).replace(f"base: {zoo['base']}\n", ""))
    three = "".join(f"  - model: {zoo[k]}\n" for k in ("e1", "e2", "e3"))
    with pytest.raises(RecipeError, match="takes at most 2"):
        merge(tmp_path, f"method: slerp\nsources:\n{three}")
    with pytest.raises(RecipeError, match="depth_scaling .* needs a method with a base"):
        merge(tmp_path, f"method: linear\nsources:\n{three}depth_scaling: {{alpha: 0.5}}\n")
    with pytest.raises(RecipeError, match="tokenizer_source 'elsewhere' is not one of"):
        merge(tmp_path, recipe_for(zoo) + "tokenizer_source: elsewhere\n")


def test_output_exists_is_refused(tmp_path, zoo):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        merge(tmp_path, recipe_for(zoo))
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_cli_merge_and_errors(tmp_path, zoo, capsys):
    r = tmp_path / "r.yaml"
    r.write_text(recipe_for(zoo))
    assert main(["merge", str(r), "-o", str(tmp_path / "o"), "-q"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["merge", str(tmp_path / "none.yaml"), "-o", str(tmp_path / "o2")]) == 2
    assert "error: recipe file" in capsys.readouterr().err
    assert main(["merge", str(r), "-o", str(tmp_path / "o"), "-q"]) == 2
    assert main(["merge", str(r), "-o", str(tmp_path / "o"), "-q", "--overwrite"]) == 0
    assert main(["methods"]) == 0 and "task_arithmetic" in capsys.readouterr().out


def test_merge_command_in_its_own_process(tmp_path, zoo):
    """The console entry point skips the interpreter's teardown after a merge: exit status, printed
    line and the written checkpoint must be those of an in-process merge; failures keep their status."""
    import subprocess
    import sys

    r = tmp_path / "r.yaml"
    r.write_text(recipe_for(zoo))
    cmd = [sys.executable, "-m", "evomerge", "merge", str(r), "-o", str(tmp_path / "o"), "-q"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("wrote ") and "tensors, recipe" in p.stdout
    ref, _ = merge(tmp_path, recipe_for(zoo), name="ref")
    got, want = load_file(tmp_path / "o" / "model.safetensors"), load_file(ref / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    again = subprocess.run(cmd, capture_output=True, text=True)  # the output exists now
    assert again.returncode == 2 and "error:" in again.stderr


@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
def test_chunked_elementwise_path_equals_whole_tensor_path(tmp_path, zoo, monkeypatch, method):
    import evomerge.merge as m

    monkeypatch.setenv("EVOMERGE_COMPILE", "0")  # the eager chunk loop (compiled kernels: tests below)
    text = recipe_for(zoo, method).replace(", density: [0.3, 0.9]", "").replace(", density: 0.5", "")
    if method == "linear":
        text = text.replace(f"base: {zoo['base']}\n", "")
    else:
        text += "depth_scaling: {alpha: 0.5, beta: 0.3}\n"
    monkeypatch.setattr(m, "CHUNK", 1 << 30)  # whole tensors
    whole, _ = merge(tmp_path, text, "whole")
    monkeypatch.setattr(m, "CHUNK", 64)  # every tensor of 256+ float32 entries goes in chunks of 64
    chunked, _ = merge(tmp_path, text, "chunked")
    assert (whole / "model.safetensors").read_bytes() == (chunked / "model.safetensors").read_bytes()


@pytest.mark.parametrize("other", ["e2", "e1"])  # e1 with itself: parallel, the lerp fallback
def test_chunked_slerp_equals_whole_tensor_slerp(tmp_path, zoo, monkeypatch, other):
    import evomerge.merge as m

    monkeypatch.setattr("evomerge.kernels.geometric.STAT_CHUNK", 48)  # partial sums over several chunks
    text = (f"method: slerp\nsources: [{{model: {zoo['e1']}}}, {{model: {zoo[other]}}}]\n"
            "parameters: {t: [0.2, 0.9]}\ndtype: bfloat16\n")
    monkeypatch.setattr(m, "CHUNK", 1 << 30)
    whole, _ = merge(tmp_path, text, "whole")
    calls = []
    real = m._merge_slerp_chunked
    monkeypatch.setattr(m, "_merge_slerp_chunked", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(m, "CHUNK", 64)
    chunked_out, _ = merge(tmp_path, text, "chunked")
    assert calls  # the chunked path ran
    assert (whole / "model.safetensors").read_bytes() == (chunked_out / "model.safetensors").read_bytes()


def stored_as(tmp_path, source, name, dtype, change=None):
    """A copy of checkpoint ``source`` at tmp_path/name with every tensor stored as ``dtype``; ``change``:
    (tensor, factor) that tensor is scaled by first."""
    out = tmp_path / name
    shutil.copytree(source, out)
    sd = load_file(out / "model.safetensors")
    if change is not None:
        sd[change[0]] *= change[1]
    save_file({k: v.to(dtype) for k, v in sd.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.mark.parametrize(("other", "stored", "dtype"), [
    ("e2", torch.bfloat16, "float32"),  # stored bfloat16, float32 output combined in place
    ("near", torch.float32, "float32"),  # one tensor scaled: the lerp fallback between different tensors
    ("near", torch.bfloat16, "bfloat16"),
])
def test_chunked_slerp_equals_whole_tensor_slerp_across_dtypes(tmp_path, zoo, monkeypatch, other, stored, dtype):
    import evomerge.merge as m
    from evomerge.kernels.geometric import slerp_coefficients

    monkeypatch.setattr("evomerge.kernels.geometric.STAT_CHUNK", 48)
    name = "model.layers.1.mlp.up_proj.weight"
    a = stored_as(tmp_path, zoo["e1"], "a", stored)
    c = stored_as(tmp_path, zoo["e1"], "c", stored, change=(name, 1.37)) if other == "near" \
        else stored_as(tmp_path, zoo[other], "c", stored)
    if other == "near":
        pair = [load_file(p / "model.safetensors")[name] for p in (a, c)]
        assert not torch.equal(*pair) and slerp_coefficients(0.3, *pair) is None
    text = f"method: slerp\nsources: [{{model: {a}}}, {{model: {c}}}]\nparameters: {{t: 0.3}}\ndtype: {dtype}\n"
    monkeypatch.setattr(m, "CHUNK", 1 << 30)
    whole, _ = merge(tmp_path, text, "whole")
    monkeypatch.setattr(m, "CHUNK", 64)
    chunked_out, _ = merge(tmp_path, text, "chunked")
    assert (whole / "model.safetensors").read_bytes() == (chunked_out / "model.safetensors").read_bytes()


def test_overflowing_slerp_output_is_refused_on_the_chunked_path(tmp_path, zoo, monkeypatch):
    """Finite inputs whose merge overflows float32 (opposite entries near the float32 limit, so lerp's c - a is
    infinite) are refused naming the merged tensor, by the chunk loop as by the whole-tensor path."""
    import evomerge.merge as m

    name = "model.layers.2.mlp.down_proj.weight"
    big = with_bad_value(tmp_path, zoo["e1"], "big", name, (1, 5), 3e38)
    low = with_bad_value(tmp_path, zoo["e2"], "low", name, (1, 5), -3e38)
    text = f"method: slerp\nsources: [{{model: {big}}}, {{model: {low}}}]\nparameters: {{t: 0.5}}\n"
    for chunk in (1 << 30, 64):
        monkeypatch.setattr(m, "CHUNK", chunk)
        with pytest.raises(NonFiniteError, match=rf"merged tensor '{name}' \(method slerp\) contains NaN"):
            merge(tmp_path, text, f"out{chunk}")
        assert not (tmp_path / f"out{chunk}").exists()


def test_nan_input_is_named_on_the_chunked_slerp_path(tmp_path, zoo, monkeypatch):
    import evomerge.merge as m

    monkeypatch.setattr(m, "CHUNK", 64)
    bad = with_bad_value(tmp_path, zoo["e2"], "nan", "model.layers.2.mlp.down_proj.weight", (1, 5), float("nan"))
    text = f"method: slerp\nsources: [{{model: {zoo['e1']}}}, {{model: {bad}}}]\nparameters: {{t: 0.5}}\n"
    with pytest.raises(NonFiniteError, match=r"down_proj.weight' of model '.*nan' contains NaN or infinity"):
        merge(tmp_path, text)
    assert not (tmp_path / "out").exists()


def test_nan_input_is_named_on_the_chunked_path(tmp_path, zoo, monkeypatch):
    import evomerge.merge as m

    monkeypatch.setenv("EVOMERGE_COMPILE", "0")
    monkeypatch.setattr(m, "CHUNK", 64)
    bad = with_bad_value(tmp_path, zoo["e1"], "inf", "model.layers.1.mlp.up_proj.weight", (3, 3), float("inf"))
    text = f"method: task_arithmetic\nbase: {zoo['base']}\nsources: [{{model: {bad}, parameters: {{weight: 0.0}}}}]\n"
    with pytest.raises(NonFiniteError, match=r"up_proj.weight' of model '.*inf' contains NaN or infinity"):
        merge(tmp_path, text)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown when CUDA is missing")
def test_cli_cuda_without_cuda_is_a_clear_error(tmp_path, zoo, capsys):
    r = tmp_path / "r.yaml"
    r.write_text(recipe_for(zoo))
    assert main(["merge", str(r), "-o", str(tmp_path / "o"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "slerp"])
def test_cuda_merge_matches_cpu(tmp_path, zoo, method):
    text = recipe_for(zoo, method) if method != "slerp" else \
        f"method: slerp\nsources: [{{model: {zoo['e1']}}}, {{model: {zoo['e2']}}}]\nparameters: {{t: 0.3}}\n"
    if method == "task_arithmetic":
        text = text.replace(", density: [0.3, 0.9]", "").replace(", density: 0.5", "")
    cpu, _ = merge(tmp_path, text, "cpu")
    gpu, _ = merge(tmp_path, text, "gpu", device="cuda")
    a, b = load_file(cpu / "model.safetensors"), load_file(gpu / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("method,params", [
    ("ties", "density: 0.4"), ("breadcrumbs", "density: 0.5, gamma: 0.1"),
    ("breadcrumbs_ties", "density: 0.9, gamma: 0.2"), ("dare_ties", "density: 0.5"), ("dare_linear", "density: 0.3"),
])
def test_chunked_pipeline_equals_whole_tensor_path(tmp_path, zoo, monkeypatch, method, params):
    """Two histogram passes + entrywise chunks give the same bits as whole-tensor selection."""
    import evomerge.merge as m

    monkeypatch.setenv("EVOMERGE_COMPILE", "0")
    text = f"""method: {method}
base: {zoo['base']}
sources:
  - {{model: {zoo['e1']}, parameters: {{weight: 0.7, {params}}}}}
  - {{model: {zoo['e2']}, parameters: {{weight: 0.5, {params}}}}}
depth_scaling: {{alpha: 0.6, beta: 0.4}}
dtype: bfloat16
"""
    monkeypatch.setattr(m.chunked, "BLOCK", 256)  # chunks and random-stream blocks of 256 entries
    monkeypatch.setattr("evomerge.kernels.select.BLOCK", 256)
    monkeypatch.setattr(m, "CHUNK", 1 << 30)
    whole, _ = merge(tmp_path, text, "whole")
    monkeypatch.setattr(m, "CHUNK", 64)  # tensors over 256 bytes go through the chunked pipeline
    chunked_out, _ = merge(tmp_path, text, "chunked")
    a, b = load_file(whole / "model.safetensors"), load_file(chunked_out / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def fused_everywhere(monkeypatch):
    """Compiled chunk kernels for every tensor, in chunks of 64 entries (several per tensor of the zoo)."""
    from evomerge.kernels import fused

    if fused.available() is not None:
        pytest.skip(f"no compiled kernels here: {fused.available()}")
    monkeypatch.setenv("EVOMERGE_COMPILE", "1")
    monkeypatch.setattr(fused, "MIN_NUMEL", 0)
    monkeypatch.setattr(fused, "CHUNK", 64)
    return fused


@pytest.mark.slow
@pytest.mark.parametrize("method,params", [("ties", "density: 0.4"), ("dare_ties", "density: 0.5"),
                                           ("task_arithmetic", "")])
def test_compiled_path_agrees_with_eager_path(tmp_path, zoo, monkeypatch, method, params):
    """The fused kernels through the planner and executor: the eager result to float32 rounding."""
    text = f"""method: {method}
base: {zoo['base']}
sources:
  - {{model: {zoo['e1']}, parameters: {{weight: 0.7{', ' + params if params else ''}}}}}
  - {{model: {zoo['e2']}, parameters: {{weight: 0.5{', ' + params if params else ''}}}}}
depth_scaling: {{alpha: 0.6, beta: 0.4}}
"""
    monkeypatch.setenv("EVOMERGE_COMPILE", "0")
    eager, _ = merge(tmp_path, text, "eager", seed=5)
    fused = fused_everywhere(monkeypatch)
    before = fused.stats["calls"]
    compiled, _ = merge(tmp_path, text, "compiled", seed=5)
    again, _ = merge(tmp_path, text, "again", seed=5)
    assert fused.stats["calls"] > before  # the compiled path did run (kernels may be cached from earlier)
    a, b = load_file(eager / "model.safetensors"), load_file(compiled / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7 * float(a[name].abs().max()))
    assert (compiled / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_nan_input_is_named_on_the_compiled_path(tmp_path, zoo, monkeypatch):
    fused_everywhere(monkeypatch)
    bad = with_bad_value(tmp_path, zoo["e2"], "nan", "model.layers.1.mlp.up_proj.weight", (3, 3), float("nan"))
    with pytest.raises(NonFiniteError, match=r"up_proj.weight' of model '.*nan' contains NaN or infinity"):
        merge(tmp_path, recipe_for(zoo).replace(str(zoo["e2"]), str(bad)))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", ""), ("linear", ""), ("ties", ", density: 0.5"), ("dare_ties", ", density: 0.5"),
    ("della", ", density: 0.5, epsilon: 0.1"), ("breadcrumbs", ", density: 0.6, gamma: 0.1"),
    ("slerp", ""), ("model_stock", ""), ("karcher", ""), ("tsv", ""), ("consensus", ""),
])
def test_borrowed_sources_are_never_written(tmp_path, zoo, method, params):
    """A search merges straight from views of the mapped source files (borrow=True). Kernels that work in
    place must get copies: the next candidate would otherwise read what the last one wrote."""
    from evomerge.checkpoint.reader import CheckpointCache
    from evomerge.merge import merge_tensor
    from evomerge.recipe.schema import Recipe

    text = f"method: {method}\nbase: {zoo['base']}\nsources:\n" + "".join(
        f"  - {{model: {zoo[m]}, parameters: {{weight: 0.6{params}}}}}\n" for m in ("e1", "e2"))
    if method == "slerp":
        text = f"method: slerp\nsources: [{{model: {zoo['e1']}}}, {{model: {zoo['e2']}}}]\nparameters: {{t: 0.3}}\n"
    if method == "model_stock":  # no parameters
        text = text.replace(", parameters: {weight: 0.6}", "")
    (tmp_path / "r.yaml").write_text(text)
    recipe, root = load_recipe(tmp_path / "r.yaml")
    assert isinstance(recipe, Recipe)
    cache = CheckpointCache()
    try:
        plan = build_plan(recipe, root, checkpoints=cache)
        first = {j.out.name: merge_tensor(plan, j, borrow=True).clone() for j in plan.jobs}
        second = {j.out.name: merge_tensor(plan, j, borrow=True) for j in plan.jobs}
        for ck in plan.checkpoints:
            with Checkpoint(ck.path) as plain:  # the mapped bytes still hold the files' values
                for name in ck.names:
                    assert torch.equal(ck.borrow(name), plain.get(name, dtype=None)), (ck.path.name, name)
        plan.close()
    finally:
        cache.close()
    _, fresh = merge(tmp_path, text, "fresh")
    out = load_file(tmp_path / "fresh" / "model.safetensors")
    for name, value in second.items():
        assert torch.equal(first[name], value), name
        # run_merge computes with one thread fewer: reductions (model stock, TSV's SVD) may round differently
        torch.testing.assert_close(out[name], value.to(out[name].dtype), rtol=1e-5, atol=1e-6, msg=name)
