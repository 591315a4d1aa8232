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


@pytest.mark.parametrize("chunk", [1 << 30, 64])
def test_merge_overflowing_float16_is_refused(tmp_path, zoo, monkeypatch, chunk):
    """A finite float32 merge above float16's 65504 is refused naming the tensor, on the whole-tensor and the
    eager chunked path; the same recipe written as bfloat16 keeps the value."""
    import evomerge.merge as m

    monkeypatch.setenv("EVOMERGE_COMPILE", "0")
    monkeypatch.setattr(m, "CHUNK", chunk)
    name = "model.layers.1.mlp.up_proj.weight"
    big = with_bad_value(tmp_path, zoo["e1"], "big", name, (2, 3), 50000.0)
    text = (f"method: task_arithmetic\nbase: {zoo['base']}\ndtype: DTYPE\n"
            f"sources: [{{model: {big}, parameters: {{weight: 2.0}}}}]\n")
    with pytest.raises(NonFiniteError, match=rf"merged tensor '{name}' \(method task_arithmetic\) overflows float16"):
        merge(tmp_path, text.replace("DTYPE", "float16"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial*"))
    out, _ = merge(tmp_path, text.replace("DTYPE", "bfloat16"), "wide")
    assert float(load_file(out / "model.safetensors")[name][2, 3]) > 65504


def test_passthrough_overflowing_float16_is_refused(tmp_path, zoo):
    """A layer slice passed through into a float16 output is refused if one of its values exceeds 65504."""
    name = "model.layers.0.self_attn.q_proj.weight"
    big = with_bad_value(tmp_path, zoo["e1"], "big", name, (0, 1), -70000.0)
    text = f"method: passthrough\ndtype: float16\nslices:\n  - sources: [{{model: {big}, layer_range: [0, 2]}}]\n"
    with pytest.raises(NonFiniteError, match=rf"merged tensor '{name}' \(method passthrough\) overflows float16"):
        merge(tmp_path, text)
    assert not (tmp_path / "out").exists()


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown when CUDA is missing")
def test_cli_cuda_without_cuda_is_a_clear_error(tmp_path, zoo, capsys):
    r = tmp_path / "r.yaml"
    r.write_text(recipe_for(zoo))
    assert main(["merge", str(r), "-o", str(tmp_path / "o"), "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
