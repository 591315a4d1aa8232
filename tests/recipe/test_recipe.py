import pytest
import yaml

from evomerge.errors import RecipeError
from evomerge.recipe import load_recipe, parse_recipe
from evomerge.recipe.values import Conditional, Groups, Where, resolve


def W(t=0.0, layer=None, n=4, name="model.layers.0.self_attn.q_proj.weight", component="attention"):
    return Where(name, component, t, layer, n)


def test_values_scalar_gradient_groups_filters():
    assert resolve(0.3, W()) == 0.3
    assert resolve(True, W()) is True
    assert resolve([0.0, 1.0], W(t=0.25)) == pytest.approx(0.25)
    assert resolve([0.0, 1.0, 0.0], W(t=0.75)) == pytest.approx(0.5)
    g = Groups(groups=[1.0, 2.0])
    assert [resolve(g, W(layer=i, n=4)) for i in range(4)] == [1.0, 1.0, 2.0, 2.0]
    conds = [Conditional(filter="mlp", value=0.1), Conditional(filter="q_proj", value=[0.0, 1.0]),
             Conditional(value=0.9)]
    assert resolve(conds, W(t=0.5)) == pytest.approx(0.5)  # substring
    assert resolve(conds, W(name="model.layers.0.mlp.up_proj.weight", component="mlp")) == 0.1
    assert resolve(conds, W(name="model.norm.weight", component="norm")) == 0.9
    assert resolve([Conditional(filter="attention", value=1.0)], W()) == 1.0  # component name
    assert resolve([Conditional(filter="attention", value=1.0)], W(), substring_only=True) is None


BASE = """
method: ties
base: base
sources:
  - model: e1
    parameters: {weight: 0.5, density: [0.2, 0.8]}
  - model: e2
parameters: {lam: 0.9, density: 0.5}
"""


def test_recipe_validates_and_hash_is_stable():
    r = parse_recipe(yaml.safe_load(BASE))
    assert r.models() == ["base", "e1", "e2"]
    reordered = parse_recipe(yaml.safe_load("""
parameters: {density: 0.5, lam: 0.9}
sources:
  - {model: e1, parameters: {density: [0.2, 0.8], weight: 0.5}}
  - {model: e2}
base: base
method: ties
"""))
    assert r.content_hash() == reordered.content_hash()
    changed = parse_recipe(yaml.safe_load(BASE.replace("lam: 0.9", "lam: 0.8")))
    assert changed.content_hash() != r.content_hash()


@pytest.mark.parametrize("text,match", [
    (BASE.replace("method: ties", "method: tees"), "unknown merge method 'tees'.*known methods"),
    (BASE + "colour: red\n", r"colour: unknown key \(allowed: method, base"),
    (BASE.replace("lam: 0.9", "lamda: 0.9"), r"unknown parameter 'lamda' for method 'ties' \(allowed:"),
    (BASE.replace("weight: 0.5,", "weight: 0.5, lam: 1,"), r"sources\[0\].parameters: unknown parameter 'lam'"),
    ("method: ties\nbase: b\n", "exactly one of 'sources'"),
    ("method: ties\nsources: []\n", "empty"),
    ("- a\n- b\n", "must be a mapping"),
    ("method: passthrough\nslices:\n  - sources: [{model: a}]\n", "layer_range"),
    ("method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [3, 1]}]\n", "start < end"),
    (BASE.replace("density: 0.5", "density: fast"), "density"),
])
def test_bad_recipes_name_the_key(text, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(yaml.safe_load(text))


def test_load_recipe_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_mergekit_config_is_translated():
    cfg = yaml.safe_load("""
models:
  - model: e1
    parameters: {weight: 0.6, density: 0.5}
  - model: e2
    parameters: {weight: 0.4, density: 0.5}
merge_method: dare_ties
base_model: base
parameters: {lambda: 0.8, int8_mask: true}
dtype: bfloat16
""")
    r = parse_recipe(cfg)
    assert r.semantics == "mergekit" and r.base == "base" and [s.model for s in r.sources] == ["e1", "e2"]
    assert r.parameters["lam"] == 0.8 and r.parameters["rescale"] == "l1" and r.parameters["normalize"] is False
    assert r.dtype == "bfloat16"
    slerp = parse_recipe(yaml.safe_load("""
slices:
  - sources:
      - {model: b, layer_range: [0, 4]}
      - {model: a, layer_range: [0, 4]}
merge_method: slerp
base_model: a
parameters: {t: [0, 0.5, 1]}
"""))
    assert [s.model for s in slerp.slices[0].sources] == ["a", "b"]  # base first: t = 0 is the base


@pytest.mark.parametrize("text,match", [
    ("merge_method: nuslerp\nmodels: [{model: a}]\n", "not supported; supported"),
    ("merge_method: ties\nmodels: [{model: 'a+lora'}]\nbase_model: b\n", "LoRA"),
    ("merge_method: ties\nmodules: {}\n", "unknown mergekit key"),
    ("merge_method: linear\nmodels: [{model: a, weight: 1}]\n", "unknown key"),
])
def test_bad_mergekit_configs(text, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(yaml.safe_load(text))


@pytest.mark.parametrize("params,match", [
    ("{density: 1.5}", r"density: 1.5 is not accepted: .*less than or equal to 1"),
    ("{density: [0.2, -0.1]}", r"density: -0.1 is not accepted"),
    ("{weight: [{filter: mlp, value: 99}, {value: 1}]}", r"weight: 99.0 is not accepted"),
])
def test_out_of_range_parameters_are_refused_at_load(params, match):
    text = f"method: ties\nbase: b\nsources:\n  - model: a\n    parameters: {params}\n"
    with pytest.raises(RecipeError, match=match):
        parse_recipe(yaml.safe_load(text))
