"""ParameterSpace: genome layout from the kernels' parameter models, decode/encode, validation."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from evomerge.errors import RecipeError
from evomerge.merge import run_merge
from evomerge.plan import build_plan
from evomerge.recipe.load import parse_recipe
from evomerge.recipe.schema import Recipe, Source
from evomerge.recipe.values import Conditional, Groups
from evomerge.search.space import ParameterSpace, identity_recipe
from evomerge.search.types import SearchSpace


def ties_space(**kw):
    args = dict(
        method="ties",
        base="base",
        models=["e1", "e2"],
        num_layers=4,
        layer_groups=2,
        components=["attention", "mlp"],
        fixed={"lam": 1.2},
    )
    return ParameterSpace(**{**args, **kw})


def test_layout_comes_from_the_parameter_models():
    space = ties_space()
    assert isinstance(space, SearchSpace)
    # ties: weight (search 0..1) and density (search 0.1..1) per model, 2 groups, 3 component sets
    assert space.dim == 2 * 2 * 2 * 3
    names = space.gene_names()
    assert names[:4] == [
        "weight/m0/g0/attention",
        "weight/m0/g1/attention",
        "weight/m0/g0/mlp",
        "weight/m0/g1/mlp",
    ]
    assert names[-1] == "density/m1/g1/rest" and len(set(names)) == space.dim
    assert np.all(space.x0() == 0.5) and space.cost(space.x0()) is None
    linear = ParameterSpace(method="linear", models=["a", "b", "c"], num_layers=2)
    assert linear.gene_names() == ["weight/m0/g0", "weight/m1/g0", "weight/m2/g0"]


def values_by_name(recipe):
    """Walk a decoded recipe the documented way: source i, parameter, filter entry, layer group."""
    out = {}
    for i, src in enumerate(recipe.sources):
        for param, value in src.parameters.items():
            for entry in value:
                for g, v in enumerate(entry.value.groups):
                    out[f"{param}/m{i}/g{g}/{entry.filter or 'rest'}"] = v
    return out


def test_each_gene_lands_where_its_name_says():
    space = ties_space()
    low = {"weight": 0.0, "density": 0.1}
    for i, name in enumerate(space.gene_names()):
        g = np.zeros(space.dim)
        g[i] = 1.0
        got = values_by_name(space.decode(g))
        assert got == {n: 1.0 if n == name else low[n.split("/")[0]] for n in space.gene_names()}


def test_decoded_recipe_shape_and_validity():
    space = ties_space()
    r = space.decode(np.linspace(0, 1, space.dim))
    assert r.method == "ties" and r.base == "base" and r.parameters == {"lam": 1.2}
    w = r.sources[0].parameters["weight"]
    assert [c.filter for c in w] == ["attention", "mlp", None]
    assert all(isinstance(c.value, Groups) and len(c.value.groups) == 2 for c in w)
    parse_recipe(r.model_dump(mode="json"))  # a valid recipe file
    flat = ParameterSpace(method="ties", base="base", models=["e1"], num_layers=4)
    assert flat.decode([0.25, 2.0]).sources[0].parameters == {"weight": 0.25, "density": 1.0}  # clipped


def test_values_are_rounded_so_hashes_are_stable():
    space = ties_space()
    g = np.random.default_rng(0).random(space.dim)
    assert space.decode(g).content_hash() == space.decode(g + 1e-9).content_hash()
    value = space.decode(g).sources[0].parameters["weight"][0].value.groups[0]
    assert value == round(value, 6)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"layer_groups": 1, "components": None},
        {"genes": {"weight": (-0.5, 1.5), "lam": (0.5, 1.0)}, "fixed": {}},
    ],
)
def test_encode_inverts_decode(kw):
    space = ties_space(**kw)
    rng = np.random.default_rng(1)
    for _ in range(20):
        g = rng.uniform(0.02, 0.98, space.dim)
        r = space.decode(g)
        np.testing.assert_allclose(space.encode(r), g, atol=1e-5, rtol=0)
        assert space.decode(space.encode(r)) == r


def test_method_choice_is_one_categorical_gene():
    space = ParameterSpace(
        method=["ties", "linear", "slerp"],
        base="base",
        models=["e1", "e2"],
        num_layers=4,
        genes={"weight": (0.0, 1.0), "density": (0.1, 1.0), "t": (0.0, 1.0)},
        fixed={"lam": 0.8},
    )
    assert space.gene_names() == [
        "method",
        "weight/m0/g0",
        "weight/m1/g0",
        "density/m0/g0",
        "density/m1/g0",
        "t/g0",
    ]
    g = np.full(space.dim, 0.3)
    seen = {}
    for u in (0.0, 0.2, 0.34, 0.5, 0.67, 0.8, 1.0):
        g[0] = u
        r = space.decode(g)
        seen[u] = r.method
        assert space.decode(space.encode(r)) == r
    assert seen == {
        0.0: "ties",
        0.2: "ties",
        0.34: "linear",
        0.5: "linear",
        0.67: "slerp",
        0.8: "slerp",
        1.0: "slerp",
    }
    g[0] = 0.5  # linear: no density, no lam, no t
    r = space.decode(g)
    assert r.parameters == {} and r.sources[0].parameters == {"weight": 0.3}
    g[0] = 0.9
    assert space.decode(g).parameters == {"t": 0.3} and space.decode(g).sources[0].parameters == {}
    assert ParameterSpace(
        method=["ties", "linear"],
        base="b",
        models=["x"],
        num_layers=2,
        x0={"method": "linear", "weight": 0.2},
    ).x0().tolist() == [0.75, 0.2, 0.5]


def test_x0_mapping():
    space = ties_space(x0={"density": 0.55})
    x0 = space.x0()
    names = space.gene_names()
    assert all(x0[i] == pytest.approx(0.5) for i, n in enumerate(names) if n.startswith("density"))
    space = ties_space(x0={"weight": 0.2})
    assert space.decode(space.x0()).sources[1].parameters["weight"][2].value.groups == [0.2, 0.2]
    with pytest.raises(ValueError, match="outside its search range"):
        ties_space(x0={"weight": 2.0})
    with pytest.raises(ValueError, match="'lam' is not searched"):
        ties_space(x0={"lam": 1.0})


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"genes": {"weight": (-20.0, 1.0)}}, "'weight' leaves its bounds"),
        ({"genes": {"density": (0.5, 0.5)}}, "'density' range must have low < high"),
        ({"genes": {"nope": (0, 1)}}, "unknown parameter 'nope'"),
        ({"genes": {"normalize": (0, 1)}}, "'normalize' is a bool parameter"),
        ({"genes": {}}, "genes: empty"),
        ({"fixed": {"lam": 20.0}}, "lam=20.0 is not accepted"),
        ({"fixed": {"weight": 1.0}}, "'weight' is also searched"),
        ({"fixed": {"alpha": 1.0}}, "unknown parameter 'alpha'"),
        ({"base": None}, "needs a base model"),
        ({"layer_groups": 5}, "layer_groups must be in"),
        ({"components": ["mlp", "mlp"]}, "components"),
        ({"models": ["e1", "e1"]}, "distinct"),
        ({"method": "nope"}, "unknown merge method 'nope'"),
    ],
)
def test_bad_spaces_fail_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        ties_space(**kw)


def test_fixed_per_model_parameters_apply_to_every_source():
    space = ParameterSpace(method="ties", base="b", models=["x", "y"], num_layers=4, genes={"weight": (0.0, 2.0)},
                           fixed={"density": 0.4, "normalize": True})
    r = space.decode([0.5, 1.0])
    assert r.parameters == {"density": 0.4, "normalize": True}
    assert [s.parameters for s in r.sources] == [{"weight": 1.0}, {"weight": 2.0}]
    assert space.encode(r).tolist() == [0.5, 1.0]


def test_method_without_per_model_search_needs_genes():
    with pytest.raises(ValueError, match="nothing to search"):
        ParameterSpace(method="slerp", models=["a", "b"], num_layers=4)
    space = ParameterSpace(
        method="slerp", models=["a", "b"], num_layers=4, layer_groups=4, genes={"t": (0.0, 1.0)}
    )
    assert space.decode([0.0, 0.25, 0.5, 1.0]).parameters == {"t": Groups(groups=[0.0, 0.25, 0.5, 1.0])}


def test_encode_names_what_does_not_fit():
    space = ties_space()
    r = space.decode(space.x0())
    cases = [
        (r.model_copy(update={"method": "dare_ties"}), "method 'dare_ties'"),
        (r.model_copy(update={"base": "other"}), "base 'other'"),
        (r.model_copy(update={"sources": list(reversed(r.sources))}), "differ from this space's models"),
        (r.model_copy(update={"parameters": {"lam": 1.0}}), "parameters.lam"),
        (r.model_copy(update={"dtype": "bfloat16"}), "dtype"),
    ]
    bad_value = r.sources[0].model_copy(update={"parameters": {**r.sources[0].parameters, "density": 0.5}})
    cases.append(
        (r.model_copy(update={"sources": [bad_value, r.sources[1]]}), r"sources\[0\].parameters.density")
    )
    w = r.sources[1].parameters["weight"]
    out_of_range = [*w[:2], Conditional(value=Groups(groups=[0.5, 3.0]))]
    s1 = r.sources[1].model_copy(update={"parameters": {**r.sources[1].parameters, "weight": out_of_range}})
    cases.append((r.model_copy(update={"sources": [r.sources[0], s1]}), "3.0 is outside the search range"))
    off_grid = [*w[:2], Conditional(value=Groups(groups=[0.5, 0.1234567]))]
    s1 = r.sources[1].model_copy(update={"parameters": {**r.sources[1].parameters, "weight": off_grid}})
    cases.append((r.model_copy(update={"sources": [r.sources[0], s1]}), "6-decimal grid"))
    for recipe, match in cases:
        with pytest.raises(RecipeError, match=match):
            space.encode(recipe)


def test_decoded_parameters_reach_the_plan(zoo):
    """The resolved per-tensor parameters of a real plan follow the gene names (groups and components)."""
    space = ParameterSpace(
        method="ties",
        base=str(zoo["base"]),
        models=[str(zoo["e1"]), str(zoo["e2"])],
        num_layers=4,
        layer_groups=2,
        components=["attention"],
        fixed={"lam": 1.0},
    )
    g = np.arange(space.dim) / space.dim
    recipe = space.decode(g)
    plan = build_plan(recipe, zoo["base"].parent)
    try:
        names = space.gene_names()

        def expected(param, model, layer, comp):
            gene = names.index(f"{param}/m{model}/g{layer * 2 // 4}/{comp}")
            lo = 0.0 if param == "weight" else 0.1
            return round(lo + g[gene] * (1.0 - lo), 6)

        jobs = {j.out.name: j for j in plan.jobs}
        for layer in range(4):
            for tensor, comp in (("self_attn.q_proj.weight", "attention"), ("mlp.up_proj.weight", "rest")):
                job = jobs[f"model.layers.{layer}.{tensor}"]
                for m in (0, 1):
                    assert job.model_params[m].weight == expected("weight", m, layer, comp)
                    assert job.model_params[m].density == expected("density", m, layer, comp)
        assert jobs["model.embed_tokens.weight"].model_params[0].weight == expected("weight", 0, 0, "rest")
        assert jobs["lm_head.weight"].model_params[1].density == expected("density", 1, 3, "rest")
    finally:
        plan.close()


def test_identity_recipe_reproduces_the_model(tmp_path, zoo):
    recipe = identity_recipe(str(zoo["e1"]))
    assert recipe == Recipe(method="passthrough", sources=[Source(model=str(zoo["e1"]))])
    plan = build_plan(recipe, tmp_path)
    try:
        out = run_merge(plan, tmp_path / "out", progress=False)
    finally:
        plan.close()
    got, want = load_file(out / "model.safetensors"), load_file(zoo["e1"] / "model.safetensors")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
