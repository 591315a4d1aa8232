"""DataFlowSpace: layer paths, scale folding checked against an unfolded forward pass, round trips."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from evomerge.checkpoint.naming import parse
from evomerge.errors import RecipeError
from evomerge.merge import run_merge
from evomerge.plan import build_plan
from evomerge.recipe.load import check_parameter_names
from evomerge.search.dataflow import DataFlowSpace, unfolded_logits
from evomerge.search.types import SearchSpace

L = 4
IDS = torch.tensor([[1, 5, 9, 13, 7, 22, 30, 4, 11]])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two unrelated random tiny Llamas of one shape (B's layers really differ from A's).

    Folding is exact up to the norm epsilon, which the tiny models' small hidden states (rms ~0.02) make
    visible (~1e-4 in the logits at eps 1e-6); an epsilon of 1e-12 leaves only float32 rounding.
    """
    from transformers import LlamaForCausalLM

    from evomerge.zoo.tiny import build_tokenizer, llama_config, save_model

    tok = build_tokenizer()
    root = tmp_path_factory.mktemp("dfs")
    out = []
    for name, seed in (("a", 8), ("b", 9)):
        cfg = llama_config(len(tok), layers=L)
        cfg.rms_norm_eps = 1e-12
        torch.manual_seed(seed)
        out.append(str(save_model(LlamaForCausalLM(cfg), tok, root / name)))
    return tuple(out)


def genome_for(space, slots_and_scales):
    """A genome including exactly the given (slot index, scale) pairs."""
    T = len(space.slots)
    g = np.full(space.dim, 0.2)
    g[T:] = space._unit(1.0)
    for j, s in slots_and_scales:
        g[j] = 0.9
        g[T + j] = space._unit(s)
    return g


def slot(space, repeat, model, layer):
    return space.slots.index((model, layer), repeat * 2 * L)


def materialize(recipe, out):
    plan = build_plan(recipe, out.parent)
    try:
        return run_merge(plan, out, progress=False)
    finally:
        plan.close()


def logits_of(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(IDS).logits


def test_layout_and_start_path():
    space = DataFlowSpace("A", "B", L)
    assert isinstance(space, SearchSpace)
    assert space.dim == 2 * 2 * L * 3
    names = space.gene_names()
    assert names[:2] == ["in/r0/a0", "in/r0/a1"] and names[L] == "in/r0/b0" and names[2 * L] == "in/r1/a0"
    assert names[space.dim // 2] == "scale/r0/a0"
    x0 = space.x0()
    assert x0[:L].tolist() == [0.75] * L and set(x0[L:space.dim // 2]) == {0.25}
    assert set(x0[space.dim // 2:]) == {0.5}  # scale 1 under the log map of [0.5, 2]
    r = space.decode(x0)
    assert r.method == "passthrough" and r.base == "A" and len(r.slices) == 1
    src = r.slices[0].sources[0]
    assert (src.model, src.layer_range, src.parameters) == ("A", (0, L), {})
    assert space.cost(x0) == L
    assert space.encode(r).tolist() == x0.tolist()


def test_scale_map_and_empty_path():
    space = DataFlowSpace("A", "B", L, repeats=2)
    assert space._scale(0.0) == 0.5 and space._scale(1.0) == 2.0 and space._scale(0.5) == pytest.approx(1.0)
    g = np.full(space.dim, 0.1)
    g[7] = 0.4  # all excluded: the largest inclusion gene alone
    assert [(m, layer) for m, layer, _ in space.path(g)] == [space.slots[7]] == [("b", 3)]
    assert space.cost(g) == 1


def test_runs_of_consecutive_layers_share_a_slice_with_per_layer_factors():
    space = DataFlowSpace("A", "B", L)
    g = genome_for(space, [(slot(space, 0, "a", 0), 1.0), (slot(space, 0, "a", 1), 0.8),
                           (slot(space, 0, "a", 2), 1.25), (slot(space, 1, "a", 3), 1.0)])
    r = space.decode(g)
    assert len(r.slices) == 1  # A0, A1, A2 (repeat 0) and A3 (repeat 1) are consecutive layers of A
    src = r.slices[0].sources[0]
    assert src.layer_range == (0, 4)
    value = src.parameters["scale"]
    assert [c.filter for c in value] == ["o_proj", "down_proj", None] and value[-1].value == 1.0
    assert value[0].value.groups == pytest.approx([1.0, 1.25, 1.0, 1.0])  # 1 / C_k: C = 1, 0.8, 1, 1


def test_round_trip_of_decoded_recipes():
    space = DataFlowSpace("A", "candidate:abc123", L)
    rng = np.random.default_rng(0)
    for _ in range(30):
        g = rng.random(space.dim)
        r = space.decode(g)
        check_parameter_names(r, "dfs")
        assert space.decode(space.encode(r)) == r
        assert r.content_hash() == space.decode(g + 1e-10).content_hash()


def test_encode_rejects_what_decode_cannot_write():
    space = DataFlowSpace("A", "B", L, repeats=1)
    r = space.decode(genome_for(space, [(slot(space, 0, "b", 2), 1.0), (slot(space, 0, "b", 3), 1.0)]))
    with pytest.raises(RecipeError, match="does not fit in 1 repeats"):
        space.encode(r.model_copy(update={"slices": list(reversed(r.slices)) + r.slices}))
    with pytest.raises(RecipeError, match="base 'A'"):
        space.encode(r.model_copy(update={"base": "B"}))
    wrong = r.slices[0].sources[0].model_copy(update={"parameters": {"scale": 0.5}})
    with pytest.raises(RecipeError, match="expected scale conditionals"):
        space.encode(r.model_copy(update={"slices": [r.slices[0].model_copy(update={"sources": [wrong]})]}))


def test_cumulative_scale_is_kept_in_range():
    space = DataFlowSpace("A", "B", L)
    g = np.zeros(space.dim)
    g[: len(space.slots)] = 1.0  # every slot, every scale at 0.5
    path = space.path(g)
    c = np.cumprod([s for _, _, s in path])
    assert c.min() >= 1 / 8 - 1e-6 and c[2] == pytest.approx(0.125)
    check_parameter_names(space.decode(g), "dfs")  # fold factors within the passthrough scale bounds


@pytest.mark.parametrize("bad, match", [
    ({"scale": (1.2, 2.0)}, "scale range"), ({"repeats": 0}, "repeats"), ({"max_cumulative": 50.0}, "max_cumulative"),
    ({"model_b": "A"}, "two different models"), ({"dtype": "int8"}, "dtype"),
])
def test_bad_spaces(bad, match):
    kw = {"model_a": "A", "model_b": "B", "num_layers": L, **bad}
    with pytest.raises(ValueError, match=match):
        DataFlowSpace(**kw)


def test_branch_filters_pick_exactly_the_branch_outputs(models):
    names = load_file(f"{models[0]}/model.safetensors").keys()
    by_filter = {n for n in names if any(f in n for f in DataFlowSpace("A", "B", L).branch_outputs)}
    assert by_filter == {n for n in names if parse(n).is_branch_output} and len(by_filter) == 2 * L


def test_start_path_is_model_a(tmp_path, models):
    a, b = models
    space = DataFlowSpace(a, b, L)
    out = materialize(space.decode(space.x0()), tmp_path / "x0")
    torch.testing.assert_close(logits_of(out), logits_of(a), atol=0, rtol=0)


def test_folded_checkpoint_matches_the_unfolded_forward_pass(tmp_path, models):
    """A path that starts and ends with B's layers, repeats layers, scales away from 1."""
    a, b = models
    space = DataFlowSpace(a, b, L)
    chosen = [(0, "b", 0, 1.3), (0, "b", 1, 0.7), (1, "a", 1, 1.6), (1, "a", 2, 0.6), (1, "b", 3, 1.9),
              (2, "a", 2, 0.8), (2, "a", 3, 1.4), (2, "b", 2, 0.55)]
    g = genome_for(space, [(slot(space, r, m, layer), s) for r, m, layer, s in chosen])
    path = space.path(g)
    assert [(m, layer) for m, layer, _ in path] == [(m, layer) for _, m, layer, _ in chosen]
    assert [s for *_, s in path] == pytest.approx([s for *_, s in chosen], abs=1e-6)
    recipe = space.decode(g)
    out = materialize(recipe, tmp_path / "dfs")
    got = logits_of(out)
    steps = [(m, layer) for m, layer, _ in path]
    want = unfolded_logits(a, b, steps, [s for *_, s in path], IDS)
    assert (got - want).abs().max() < 1e-5
    unscaled = unfolded_logits(a, b, steps, [1.0] * len(path), IDS)
    assert (unscaled - want).abs().max() > 1e-2  # the scales matter, so the comparison above means something
    # tensors outside the layer stack are A's even though the path starts and ends with B's layers
    sd, sa = load_file(out / "model.safetensors"), load_file(f"{a}/model.safetensors")
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(sd[name], sa[name])
    assert (out / "config.json").read_text().count('"num_hidden_layers": 8') == 1
