"""The embedded demo: build tiny models locally, merge them by a recipe, load the result and generate."""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

RECIPE = """\
# Written by `evomerge demo`: TIES over two experts of a tiny base, density rising with depth.
method: ties
base: zoo/base
sources:
  - model: zoo/expert-a
    parameters: {{weight: 0.6, density: [0.3, 0.8]}}
  - model: zoo/expert-b
    parameters: {{weight: 0.4, density: 0.5}}
parameters: {{lam: 1.0}}
dtype: bfloat16
seed: {seed}
"""


def run_demo(out: Path, seed: int = 0) -> Path:
    """Build the tiny zoo under ``out`` (cached), merge it, and show the merged model generating."""
    from transformers.utils import logging as hf_logging

    from evomerge.merge import run_merge
    from evomerge.plan import build_plan
    from evomerge.recipe import load_recipe
    from evomerge.zoo.tiny import expert_of, tiny_llama

    hf_logging.disable_progress_bar()
    start = time.perf_counter()
    zoo = out / "zoo"
    if not (zoo / "base" / "config.json").exists():
        log.info("building a tiny base model and two experts in %s", zoo)
        tiny_llama(zoo / "base", seed=seed)
        expert_of(zoo / "base", zoo / "expert-a", seed=seed + 1)
        expert_of(zoo / "base", zoo / "expert-b", seed=seed + 2)
    recipe_path = out / "recipe.yaml"
    recipe_path.write_text(RECIPE.format(seed=seed))
    recipe, root = load_recipe(recipe_path)
    plan = build_plan(recipe, root)
    try:
        merged = run_merge(plan, out / "merged", overwrite=True)
    finally:
        plan.close()

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(merged)
    tok = AutoTokenizer.from_pretrained(merged)
    ids = tok("the cat sat on", return_tensors="pt")
    text = tok.decode(model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)[0])
    print(f"recipe   {recipe_path} (hash {recipe.content_hash()[:12]})")
    print(f"merged   {merged} ({len(plan.jobs)} tensors, {model.num_parameters():,} parameters, {model.dtype})")
    print(f"generate 'the cat sat on' -> '{text}'")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return merged
