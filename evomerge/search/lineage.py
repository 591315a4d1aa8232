"""Model-space (lineage) candidates: recipes whose sources are earlier candidates, and their materialization.

A lineage recipe names an earlier candidate as ``candidate:<recipe hash>`` anywhere a model goes (sources,
slice sources, base, tokenizer_source). ``LineageResolver`` replaces each reference by the path of that
candidate's checkpoint under ``cache_dir/<hash>/``, merging it first if needed, recursively and in DAG
order, so every archive member stays reproducible from the source checkpoints plus its recipe chain.
"""

from __future__ import annotations

import contextlib
import fcntl
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

from evomerge.errors import RecipeError
from evomerge.merge import run_merge
from evomerge.plan import build_plan
from evomerge.recipe.schema import Recipe, Source
from evomerge.recipe.values import Groups
from evomerge.search.types import CANDIDATE_PREFIX

DECIMALS = 6
_HASH = re.compile(r"^[0-9A-Za-z_-]+$")


def crossover_recipe(parent_a: str, parent_b: str, num_layers: int, split: int, mix: float, *,
                     dtype: str | None = None) -> Recipe:
    """M2N2 crossover ordered over layers: SLERP where A weighs ``mix`` before ``split`` and 1 - mix from it.

    ``parent_a`` / ``parent_b``: model paths or ``candidate:<hash>`` references. Layers 0..split-1 take
    A with weight w = mix (slerp t = 1 - w: t = 0 is the first source, A), layers split..L-1 take A with
    weight 1 - w (t = w); one {groups: [...]} value with one group per layer. Tensors outside the layer
    stack follow values.py's rule for layer None: the embedding takes layer 0's t, the final norm and the
    head take the last layer's t. A is the donor (config, tokenizer). ``split`` in [0, L]: 0 or L is a
    plain SLERP of the whole models.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if not 0 <= split <= num_layers:
        raise ValueError(f"split must be in [0, num_layers={num_layers}], got {split}")
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must be in [0, 1], got {mix}")
    t_before, t_after = round(1.0 - mix, DECIMALS), round(mix, DECIMALS)
    ts = [t_before if layer < split else t_after for layer in range(num_layers)]
    return Recipe(method="slerp", sources=[Source(model=parent_a), Source(model=parent_b)],
                  parameters={"t": Groups(groups=ts)}, dtype=dtype)


def candidate_hash(model: str) -> str | None:
    """The recipe hash a model string refers to, or None for a plain path."""
    if not model.startswith(CANDIDATE_PREFIX):
        return None
    h = model[len(CANDIDATE_PREFIX):]
    if not _HASH.match(h):
        raise RecipeError(f"'{model}' is not a candidate reference (expected candidate:<recipe hash>)")
    return h


class LineageResolver:
    """Materializes candidate references into an on-disk cache and rewrites recipes to plain paths.

    ``store``: recipe hash -> Recipe of every candidate that may be referenced. ``root``: the directory
    relative model paths of those recipes are resolved against. A cache entry is a finished checkpoint
    (run_merge assembles in a temporary sibling and renames), reused by any later resolver on the same
    ``cache_dir``; a per-hash file lock keeps concurrent processes from merging the same entry twice.
    ``merged`` lists the hashes this resolver merged, in order.
    """

    def __init__(self, store: Mapping[str, Recipe], cache_dir: str | Path, root: str | Path):
        self.store = store
        self.cache_dir = Path(cache_dir).expanduser().resolve()
        self.root = Path(root)
        self.merged: list[str] = []

    def resolve(self, recipe: Recipe) -> Recipe:
        """``recipe`` with every candidate reference replaced by its materialized checkpoint's path."""
        return self._resolve(recipe, ())

    def checkpoint(self, recipe_hash: str) -> Path:
        """The materialized checkpoint of one stored candidate (merged now if not cached)."""
        return self._checkpoint(recipe_hash, ())

    def materialize(self, recipe: Recipe, out_dir: str | Path, *, seed: int | None = None,
                    overwrite: bool = False) -> Path:
        """Resolve ``recipe`` and merge it into ``out_dir``."""
        return self._merge(self.resolve(recipe), Path(out_dir), seed=seed, overwrite=overwrite)

    # ------------------------------------------------------------------ internals

    def _resolve(self, recipe: Recipe, stack: tuple[str, ...]) -> Recipe:
        def sub(model: str | None) -> str | None:
            if model is None:
                return None
            h = candidate_hash(model)
            return model if h is None else str(self._checkpoint(h, stack))

        def subs(sources: list[Source]) -> list[Source]:
            return [s.model_copy(update={"model": sub(s.model)}) for s in sources]

        update: dict = {"base": sub(recipe.base)}
        if recipe.tokenizer_source not in (None, "base", "union"):
            update["tokenizer_source"] = sub(recipe.tokenizer_source)
        if recipe.sources is not None:
            update["sources"] = subs(recipe.sources)
        else:
            update["slices"] = [sl.model_copy(update={"sources": subs(sl.sources)}) for sl in recipe.slices]
        return recipe.model_copy(update=update)

    def _checkpoint(self, h: str, stack: tuple[str, ...]) -> Path:
        if h in stack:
            chain = " -> ".join(CANDIDATE_PREFIX + x for x in (*stack[stack.index(h):], h))
            raise RecipeError(f"lineage cycle: {chain}")
        out = self.cache_dir / h
        if _finished(out):
            return out
        recipe = self.store.get(h)
        if recipe is None:
            needed = f" (named by {CANDIDATE_PREFIX}{stack[-1]})" if stack else ""
            raise RecipeError(f"unknown candidate '{CANDIDATE_PREFIX}{h}'{needed}: not in the lineage store "
                              f"of {len(self.store)} recipes")
        resolved = self._resolve(recipe, (*stack, h))  # parents first, no lock held meanwhile
        with self._lock(h):
            if not _finished(out):  # another process may have finished it while we waited
                self._merge(resolved, out, seed=None, overwrite=True)
                self.merged.append(h)
        return out

    def _merge(self, recipe: Recipe, out: Path, *, seed: int | None, overwrite: bool) -> Path:
        plan = build_plan(recipe, self.root, seed=seed)
        try:
            return run_merge(plan, out, progress=False, overwrite=overwrite)
        finally:
            plan.close()

    @contextlib.contextmanager
    def _lock(self, h: str) -> Iterator[None]:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with open(self.cache_dir / f".{h}.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def _finished(path: Path) -> bool:
    return (path / "config.json").is_file()
