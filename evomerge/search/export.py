"""Export a candidate of a run as a standard HF checkpoint, with its recipes and a model card.

``OUT/`` gets the merged model (sharded safetensors + index, config, tokenizer, generation config: what
``evomerge merge`` writes), ``evomerge_recipe.yaml`` (the candidate's recipe; ``lineage`` lists the
recipes of every earlier candidate it names, so it is reproducible from the source checkpoints),
``mergekit_config.yml`` when mergekit can express the recipe with the same result, and ``README.md``, a
model card with the scores, the sources and the search that found it.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import EvomergeError
from evomerge.recipe.schema import Recipe
from evomerge.recipe.values import Conditional, Groups
from evomerge.search.store import CACHE, CONFIG, RunView, read_run, split_means
from evomerge.search.types import CANDIDATE_PREFIX

log = logging.getLogger(__name__)
_MK_METHODS = {"linear", "task_arithmetic", "ties", "slerp", "passthrough"}
_MK_FILTERS = {"attention": "self_attn", "mlp": "mlp"}  # component -> substring of Llama-style names


def find_candidate(view: RunView, which: str) -> tuple[int | None, str, dict]:
    """(candidate id or None for a baseline, recipe hash, recipe JSON) of a candidate id, a recipe hash
    prefix, or a baseline name."""
    if which.isdigit() and int(which) in view.candidates:
        c = view.candidates[int(which)]
        return c.id, c.recipe_hash, c.recipe
    if which in view.baselines:
        return None, view.baselines[which].recipe_hash, view.baseline_recipes[which]
    hits = {c.recipe_hash: c for c in view.candidates.values() if c.recipe_hash.startswith(which)}
    if len(hits) == 1:
        c = next(iter(hits.values()))
        return c.id, c.recipe_hash, c.recipe
    known = f"candidate ids 0..{max(view.candidates, default=-1)}, baselines {sorted(view.baselines)}"
    raise EvomergeError(f"no single candidate matches '{which}' ({known})")


def lineage(recipe: Recipe, store: dict[str, Recipe]) -> dict[str, Recipe]:
    """Every earlier candidate ``recipe`` names, transitively (hash -> recipe)."""
    from evomerge.recipe.load import parse_recipe
    from evomerge.search.ray_pool import lineage_closure

    return {h: parse_recipe(r, f"candidate {h[:12]}") for h, r in lineage_closure(recipe, store).items()}


def to_mergekit(recipe: Recipe) -> dict[str, Any] | None:
    """A mergekit config giving the same tensors, or None when mergekit cannot express ``recipe``.

    Expressible: linear, task_arithmetic, ties, slerp and passthrough with scalar or conditional
    (attention / mlp / substring) parameters, no lineage references, evomerge semantics translated by
    writing every global parameter explicitly. Not expressible: layer groups and gradients (mergekit
    evaluates depth differently outside the layer stack), other methods, and layer paths whose first or
    last slice is not the donor's (mergekit takes embeddings from the first slice, the head from the last).
    """
    if recipe.method not in _MK_METHODS:
        return None
    names = recipe.models()
    if any(m.startswith(CANDIDATE_PREFIX) for m in names) or recipe.depth_scaling is not None:
        return None

    def value(v):
        if isinstance(v, (Groups,)) or (isinstance(v, list) and v and not isinstance(v[0], Conditional)):
            raise _NotExpressible
        if isinstance(v, list):
            out = []
            for c in v:
                if isinstance(c.value, (Groups, list)):
                    raise _NotExpressible
                f = c.filter
                if f in ("embedding", "norm", "head", "other"):
                    raise _NotExpressible
                out.append({"value": c.value} if f is None else {"filter": _MK_FILTERS.get(f, f), "value": c.value})
            return out
        return v

    def params(p: dict) -> dict:
        return {("lambda" if k == "lam" else k): value(v) for k, v in p.items()}

    from evomerge.kernels.registry import get_method

    method = get_method(recipe.method)
    glob = {name: getattr(method.global_params(), name) for name in method.global_params.model_fields}
    glob.update(recipe.parameters)
    try:
        cfg: dict[str, Any] = {"merge_method": recipe.method, "parameters": params(glob)}
        if recipe.dtype:
            cfg["dtype"] = recipe.dtype
        if recipe.sources is not None:
            if recipe.method == "slerp" or recipe.method == "linear" and recipe.base:
                return None  # mergekit would add the base as a source / order slerp by base
            cfg["models"] = [{"model": s.model, "parameters": params(s.parameters)} for s in recipe.sources]
            if recipe.base:
                cfg["base_model"] = recipe.base
        else:
            if recipe.method != "passthrough":
                return None
            donor = recipe.base or recipe.slices[0].sources[0].model
            if recipe.slices[0].sources[0].model != donor or recipe.slices[-1].sources[0].model != donor:
                return None
            cfg["slices"] = [{"sources": [{"model": s.model, "layer_range": list(s.layer_range),
                                           "parameters": params(s.parameters)} for s in sl.sources]}
                             for sl in recipe.slices]
    except _NotExpressible:
        return None
    return cfg


class _NotExpressible(Exception):
    pass


def export_candidate(run_dir: str | Path, which: str, out: str | Path, *, overwrite: bool = False,
                     progress: bool = True) -> Path:
    """Write candidate ``which`` (id, hash prefix or baseline name) of the run as a checkpoint in ``out``."""
    from evomerge.recipe.load import parse_recipe
    from evomerge.search.config import load_search_config
    from evomerge.search.lineage import LineageResolver

    run_dir, out = Path(run_dir), Path(out)
    view = read_run(run_dir)
    config = load_search_config(run_dir / CONFIG, check_paths=False)
    cid, h, data = find_candidate(view, which)
    recipe = parse_recipe(data, f"candidate {which}")
    store = {c.recipe_hash: parse_recipe(c.recipe, f"candidate {c.id}") for c in view.candidates.values()}
    from evomerge.search.setup import config_recipes

    store.update(config_recipes(config))
    ancestors = lineage(recipe, store)
    resolver = LineageResolver(store, run_dir / CACHE, Path("/"))
    path = resolver.materialize(recipe, out, seed=recipe.seed, overwrite=overwrite)
    doc: dict[str, Any] = {"recipe": recipe.model_dump(mode="json", exclude_defaults=True)}
    if ancestors:
        doc["lineage"] = {k: r.model_dump(mode="json", exclude_defaults=True) for k, r in ancestors.items()}
    (path / "evomerge_recipe.yaml").write_text(
        "# The recipe of this model (evomerge YAML). Earlier candidates it names are under 'lineage',\n"
        "# by recipe hash: `candidate:<hash>` models are merges of those recipes.\n"
        + yaml.safe_dump(doc, sort_keys=False))
    mk = to_mergekit(recipe)
    if mk is not None:
        (path / "mergekit_config.yml").write_text(yaml.safe_dump(mk, sort_keys=False))
    result = view.results.get(h) or next((b for b in view.baselines.values() if b.recipe_hash == h), None)
    (path / "README.md").write_text(model_card(view, config, cid, h, recipe, result, ancestors, mk is not None))
    log.info("exported candidate %s to %s", which, path)
    return path


def _means(result, split: str) -> dict[str, float]:
    return split_means(result.results, split) if result else {}


def model_card(view: RunView, config, cid, h, recipe: Recipe, result, ancestors, has_mergekit: bool) -> str:
    """A markdown model card: scores (search and held-out) against the baselines, sources, the search."""
    tasks = sorted(_means(result, "search")) if result else []
    rows = [("**this model**", _means(result, "search"), _means(result, "heldout"))]
    for name, b in sorted(view.baselines.items()):
        if not b.failed:
            rows.append((name, _means(b, "search"), _means(b, "heldout")))
    lines = [
        f"# {config.name}: candidate {cid if cid is not None else h[:12]}",
        "",
        f"A merge found by evomerge's `{config.optimizer.name}` search (seed {config.seed}) over "
        f"{config.space.kind} space. Recipe hash `{h}`.",
        "",
        "## Scores",
        "",
        "Mean per-item score per task (1.0 = every item right); held-out items were never used to choose.",
        "",
        "| model | " + " | ".join(f"{t} (search)" for t in tasks) + " | " + " | ".join(f"{t} (held-out)" for t in tasks)
        + " |",
        "|---|" + "---|" * (2 * len(tasks)),
    ]
    for name, s, ho in rows:
        lines.append(f"| {name} | " + " | ".join(f"{s.get(t, math.nan):.3f}" for t in tasks) + " | "
                     + " | ".join(f"{ho.get(t, math.nan):.3f}" for t in tasks) + " |")
    info = view.candidates[cid].info if cid is not None else {"baseline": True}
    lines += [
        "",
        "## Sources",
        "",
        *[f"- `{m}`" for m in recipe.models() if not m.startswith(CANDIDATE_PREFIX)],
        *[f"- earlier candidate `{k[:12]}` (recipe in evomerge_recipe.yaml, 'lineage')" for k in ancestors],
        "",
        "## The search",
        "",
        f"- run directory: `{view.run_dir}`; optimizer `{config.optimizer.name}` "
        f"{json.dumps(config.optimizer.settings)}; budget {config.budget.model_dump(exclude_none=True)}",
        f"- found as: {json.dumps(info)}; {view.evaluated} candidates evaluated in the run",
        f"- method `{recipe.method}`; recipe in `evomerge_recipe.yaml`"
        + ("; the same merge as a mergekit config in `mergekit_config.yml`" if has_mergekit
           else "; not expressible as a mergekit config"),
    ]
    return "\n".join(lines) + "\n"
