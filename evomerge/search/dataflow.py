"""The data-flow space (DFS): which layers of models A and B run, in which order, at which input scale.

Slots: the layer stacks of A and B side by side, [A0..A(L-1), B0..B(L-1)], repeated ``repeats`` times
(T = 2 L r slots). The genome holds T inclusion genes (slot j is on the path if its gene > 0.5; when none
is, the slot with the largest gene alone) followed by T scale genes. The path runs A's embedding, the
included slots in slot order, then A's final norm and head (A is the recipe's base, hence its donor:
config, tokenizer and every tensor outside the layer stack). A scale gene u maps log-uniformly onto
[lo, hi] (default [0.5, 2]): s = lo * (hi / lo)^u. Scales compose multiplicatively along the path, so
halving and doubling sit equally far from x0 (u = 0.5 is s = 1 when lo * hi = 1).

Folding the scales into plain weights (no custom model class). Path layer k takes input s_k * r_{k-1}
(r_0 = embedding). In a pre-norm block, h = x + f(norm(x)) with the norm scale invariant (RMSNorm /
LayerNorm, positive factors, exact up to its epsilon), so by induction r_k = C_k u_k, C_k = s_1...s_k,
where u follows the ordinary recurrence with every residual branch output divided by C_k:

    r_k = C_k u_{k-1} + f_k(norm(C_k u_{k-1})) = C_k (u_{k-1} + f_k(norm(u_{k-1})) / C_k).

The last linear map of each branch (``o_proj``, ``down_proj``, weights and biases) carries the 1 / C_k,
and the final norm removes C_T: norm(C_T u_T) = norm(u_T). Each fold factor becomes the passthrough
``scale`` of those tensors, per layer ({groups: [...]} over a run of consecutive layers of one model).

Safeguard: C_k is kept inside [1 / max_cumulative, max_cumulative] by shrinking the scale that would
leave it, so fold factors stay within the passthrough scale bounds and weights within a few octaves of
the originals in half precision; ``path()`` returns the effective scales.

Combined PS + DFS: ``model_a`` may be a lineage reference (``candidate:<hash>`` of the PS result); decode
only writes the string, and materialization resolves it (evomerge.search.lineage).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from evomerge.errors import RecipeError
from evomerge.kernels.params import describe
from evomerge.kernels.registry import get_method
from evomerge.recipe.schema import Recipe, Slice, Source
from evomerge.recipe.values import Conditional, Groups

DECIMALS = 6
ON, OFF = 0.75, 0.25  # inclusion genes of the start path / other slots: 1.5 sigma0 (1/6) off the 0.5 cut
BRANCH_OUTPUTS = ("o_proj", "down_proj")  # Llama / Mistral / Qwen2; GPT-2: ("attn.c_proj", "mlp.c_proj")


class DataFlowSpace:
    """Layer paths through models A and B with per-layer input scales, decoded to passthrough recipes."""

    def __init__(self, model_a: str, model_b: str, num_layers: int, repeats: int = 3,
                 scale: tuple[float, float] = (0.5, 2.0), dtype: str | None = None, *, max_cumulative: float = 8.0,
                 branch_outputs: Sequence[str] = BRANCH_OUTPUTS):
        if not model_a or not model_b or model_a == model_b:
            raise ValueError(f"model_a and model_b must be two different models, got {model_a!r}, {model_b!r}")
        if num_layers < 1 or repeats < 1:
            raise ValueError(f"num_layers and repeats must be >= 1, got {num_layers}, {repeats}")
        lo, hi = (float(scale[0]), float(scale[1]))
        if not 0 < lo <= 1 <= hi or lo == hi:
            raise ValueError(f"scale range must satisfy 0 < low <= 1 <= high, low < high; got {[lo, hi]}")
        bound = next(p.high for p in describe(get_method("passthrough").model_params) if p.name == "scale")
        if not 1 < max_cumulative <= bound:
            raise ValueError(f"max_cumulative must be in (1, {bound}] (the passthrough scale bound), "
                             f"got {max_cumulative}")
        if not branch_outputs or any(not isinstance(b, str) or not b for b in branch_outputs):
            raise ValueError(f"branch_outputs: give the tensor-name filters of branch outputs, got {branch_outputs!r}")
        self.model_a, self.model_b = model_a, model_b
        self.num_layers, self.repeats = num_layers, repeats
        self.lo, self.hi, self.max_cumulative = lo, hi, float(max_cumulative)
        self.dtype = dtype
        self.branch_outputs = tuple(branch_outputs)
        self.slots = [(m, layer) for _ in range(repeats) for m in ("a", "b") for layer in range(num_layers)]
        Recipe(method="passthrough", base=model_a, slices=[Slice(sources=[Source(model=model_a, layer_range=(0, 1))])],
               dtype=dtype)  # fails here on a bad dtype rather than at the first decode

    # ------------------------------------------------------------------ genes

    @property
    def dim(self) -> int:
        return 2 * len(self.slots)

    def gene_names(self) -> list[str]:
        tags = [f"r{j // (2 * self.num_layers)}/{m}{layer}" for j, (m, layer) in enumerate(self.slots)]
        return [f"in/{t}" for t in tags] + [f"scale/{t}" for t in tags]

    def _scale(self, u: float) -> float:
        return self.lo * (self.hi / self.lo) ** u

    def _unit(self, s: float) -> float:
        return math.log(s / self.lo) / math.log(self.hi / self.lo)

    def x0(self) -> np.ndarray:
        T = len(self.slots)
        g = np.full(self.dim, OFF)
        g[: self.num_layers] = ON  # A's own layers, first repeat: the start path is A itself
        g[T:] = self._unit(1.0)
        return g

    def _genome(self, genome: Sequence[float]) -> np.ndarray:
        g = np.asarray(genome, dtype=np.float64).reshape(-1)
        if g.shape != (self.dim,):
            raise ValueError(f"genome has {g.size} genes, this space has {self.dim}")
        if np.isnan(g).any():
            raise ValueError("genome contains NaN")
        return np.clip(g, 0.0, 1.0)

    def _included(self, g: np.ndarray) -> list[int]:
        T = len(self.slots)
        on = [j for j in range(T) if g[j] > 0.5]
        return on or [int(np.argmax(g[:T]))]

    def path(self, genome: Sequence[float]) -> list[tuple[str, int, float]]:
        """(model 'a' | 'b', layer, effective input scale s_k) for every layer of the path, in order."""
        g = self._genome(genome)
        T = len(self.slots)
        lo_c, hi_c = 1.0 / self.max_cumulative, self.max_cumulative
        out, c = [], 1.0
        for j in self._included(g):
            proposed = c * self._scale(float(g[T + j]))
            s = round(min(hi_c, max(lo_c, proposed)) / c, DECIMALS)
            c *= s
            out.append((*self.slots[j], s))
        return out

    def cost(self, genome: Sequence[float]) -> float:
        """Layers in the path (a size objective, minimised)."""
        return float(len(self._included(self._genome(genome))))

    # ------------------------------------------------------------------ recipes

    def _name(self, m: str) -> str:
        return self.model_a if m == "a" else self.model_b

    def decode(self, genome: Sequence[float]) -> Recipe:
        path = self.path(genome)
        factors, c = [], 1.0
        for _, _, s in path:
            c *= s
            factors.append(1.0 / c)
        slices, k = [], 0
        while k < len(path):
            end = k + 1  # grow a run of consecutive layers of one model
            while end < len(path) and path[end][0] == path[k][0] and path[end][1] == path[end - 1][1] + 1:
                end += 1
            fs = factors[k:end]
            params = {}
            if any(f != 1.0 for f in fs):
                value = fs[0] if len(fs) == 1 else Groups(groups=fs)
                params["scale"] = [Conditional(filter=b, value=value) for b in self.branch_outputs] \
                    + [Conditional(value=1.0)]
            layer = path[k][1]
            src = Source(model=self._name(path[k][0]), layer_range=(layer, layer + end - k), parameters=params)
            slices.append(Slice(sources=[src]))
            k = end
        return Recipe(method="passthrough", base=self.model_a, slices=slices, dtype=self.dtype)

    def encode(self, recipe: Recipe) -> np.ndarray:
        """The genome of a recipe this space decodes to: path slots greedily, scales from fold factors."""
        if recipe.method != "passthrough" or recipe.slices is None or recipe.base != self.model_a:
            raise RecipeError(f"expected a passthrough recipe with slices and base '{self.model_a}'")
        if recipe.dtype != self.dtype or recipe.parameters or recipe.tokenizer_source is not None:
            raise RecipeError("dtype, parameters or tokenizer_source differ from what this space writes")
        models = {self.model_a: "a", self.model_b: "b"}
        path: list[tuple[str, int]] = []
        factors: list[float] = []
        for i, sl in enumerate(recipe.slices):
            if len(sl.sources) != 1 or sl.parameters or sl.sources[0].model not in models:
                raise RecipeError(f"slices[{i}]: expected one source, model A or B, and no slice parameters")
            src = sl.sources[0]
            a, b = src.layer_range
            if b > self.num_layers:
                raise RecipeError(f"slices[{i}]: layer_range {[a, b]} exceeds {self.num_layers} layers")
            path += [(models[src.model], layer) for layer in range(a, b)]
            factors += self._factors(src.parameters, b - a, f"slices[{i}]")
        T = len(self.slots)
        g = self.x0()
        g[:T] = OFF
        j = 0
        prev_c = 1.0
        for (m, layer), f in zip(path, factors, strict=True):
            while j < T and self.slots[j] != (m, layer):
                j += 1
            if j == T:
                raise RecipeError(f"the path {path} does not fit in {self.repeats} repeats of [A, B]")
            c = 1.0 / f
            s = round(c / prev_c, DECIMALS)
            if not self.lo - 1e-9 <= s <= self.hi + 1e-9:
                raise RecipeError(f"layer {layer} of model {m.upper()}: scale {s} is outside [{self.lo}, {self.hi}]")
            g[j], g[T + j] = ON, min(1.0, max(0.0, self._unit(s)))
            prev_c = c
            j += 1
        if self.decode(g) != recipe:
            raise RecipeError("the recipe has this space's shape but not its fold factors (not a decoded recipe)")
        return g

    def _factors(self, params: dict, n: int, where: str) -> list[float]:
        if not params:
            return [1.0] * n
        value = params.get("scale")
        filters = [c.filter for c in value] if isinstance(value, list) and value \
            and all(isinstance(c, Conditional) for c in value) else None
        if set(params) != {"scale"} or filters != [*self.branch_outputs, None]:
            raise RecipeError(f"{where}: expected scale conditionals on {list(self.branch_outputs)}, got {params!r}")
        vals = {repr(c.value) for c in value[:-1]}
        v = value[0].value
        if len(vals) != 1 or value[-1].value != 1.0:
            raise RecipeError(f"{where}: branch outputs must share one fold factor, other tensors 1.0")
        if isinstance(v, Groups) and len(v.groups) == n:
            return [float(x) for x in v.groups]
        if n == 1 and isinstance(v, (int, float)) and not isinstance(v, bool):
            return [float(v)]
        raise RecipeError(f"{where}: fold factor {v!r} does not give one value per layer ({n})")


def unfolded_logits(model_a_dir: str | Path, model_b_dir: str | Path, path: Sequence[tuple[str, int]],
                    scales: Sequence[float], input_ids):
    """Reference forward pass of a data-flow path with explicit input scales (no folding).

    A's embedding; for each path entry the HF decoder layer of that model on ``hidden * s_k`` with A's
    rotary embeddings and an explicit causal mask; A's final norm and head. Llama-style models (float32,
    eager attention). ``input_ids``: LongTensor [batch, seq]. Returns logits [batch, seq, vocab].
    """
    import torch
    from transformers import AutoModelForCausalLM

    if len(path) != len(scales) or not path:
        raise ValueError(f"path and scales must be non-empty and of equal length, got {len(path)}, {len(scales)}")
    load = {"dtype": torch.float32, "attn_implementation": "eager"}
    a = AutoModelForCausalLM.from_pretrained(model_a_dir, **load).eval()
    b = AutoModelForCausalLM.from_pretrained(model_b_dir, **load).eval() if any(m == "b" for m, _ in path) else None
    with torch.no_grad():
        ids = torch.as_tensor(input_ids)
        seq = ids.shape[-1]
        hidden = a.model.embed_tokens(ids)
        positions = torch.arange(seq).unsqueeze(0)
        rotary = a.model.rotary_emb(hidden, position_ids=positions)
        mask = torch.full((seq, seq), torch.finfo(hidden.dtype).min).triu(1)[None, None]
        for (m, layer), s in zip(path, scales, strict=True):
            block = (a if m == "a" else b).model.layers[layer]
            out = block(hidden * float(s), attention_mask=mask, position_ids=positions, position_embeddings=rotary)
            hidden = out[0] if isinstance(out, tuple) else out
        return a.lm_head(a.model.norm(hidden))
