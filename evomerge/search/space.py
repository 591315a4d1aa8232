"""The parameter space (PS): a genome in [0, 1]^dim <-> a whole-model merge recipe.

Genes are laid out from the merge methods' parameter models (``describe``), never from a side table:
for every searched parameter, per source model (per-model parameters only), per layer group and per
component filter, one gene. A gene u maps linearly onto the parameter's search range [low, high]:
v = low + u * (high - low), rounded to 6 decimals so equal recipes hash equally. Genes outside [0, 1]
are clipped. When several methods are given, one leading categorical gene picks the method ([0, 1] cut
into equal bins) and genes of parameters the picked method does not take are ignored.

Recipe shape: ``sources`` in the order of ``models``, each with its per-model parameters; searched
global parameters and everything in ``fixed`` under the recipe's ``parameters``. A parameter with one
layer group is a scalar, otherwise ``{groups: [...]}`` (layer l of L in group floor(l*G/L)). With
``components`` each value becomes ``[{filter: c1, value: ...}, ..., {value: ...}]``, the last entry
covering every tensor no filter matches (including embedding, final norm and head).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated

import numpy as np
from pydantic import TypeAdapter, ValidationError

from evomerge.errors import RecipeError
from evomerge.kernels.params import ParamInfo, describe
from evomerge.kernels.registry import MergeMethod, get_method
from evomerge.recipe.load import check_parameter_names
from evomerge.recipe.schema import Recipe, Source
from evomerge.recipe.values import Conditional, Groups

DECIMALS = 6


@dataclass(frozen=True)
class GeneParam:
    """One searched parameter: its scope, range, and the methods that take it."""

    name: str
    scope: str  # "model" (one gene set per source model) or "global"
    low: float
    high: float
    methods: frozenset[str]

    def value(self, u: float) -> float:
        return round(self.low + u * (self.high - self.low), DECIMALS)

    def unit(self, v: float) -> float:
        return (v - self.low) / (self.high - self.low)


def identity_recipe(model: str) -> Recipe:
    """A recipe that reproduces ``model`` unchanged (to score a source expert as a candidate)."""
    return Recipe(method="passthrough", sources=[Source(model=model)])


def _fields(method: MergeMethod) -> dict[str, tuple[str, ParamInfo]]:
    out = {p.name: ("global", p) for p in describe(method.global_params)}
    out.update({p.name: ("model", p) for p in describe(method.model_params)})
    return out


class ParameterSpace:
    """Per-model (and optionally global) merge parameters per layer group and component, in [0, 1]^dim."""

    def __init__(self, *, method: str | Sequence[str], models: Sequence[str], num_layers: int,
                 base: str | None = None, layer_groups: int = 1, components: Sequence[str] | None = None,
                 genes: Mapping[str, tuple[float, float]] | None = None,
                 fixed: Mapping[str, float | bool | str] | None = None, dtype: str | None = None,
                 seed: int | None = None, x0: Mapping[str, float | str] | None = None):
        names = [method] if isinstance(method, str) else list(method)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"method: give one method name or a list of distinct names, got {method!r}")
        self.methods = [get_method(n) for n in names]
        self.models = list(models)
        if not self.models or len(set(self.models)) != len(self.models):
            raise ValueError(f"models: give a non-empty list of distinct model paths, got {self.models!r}")
        self.base = base
        for m in self.methods:
            m.check_models(len(self.models), base is not None)
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if not 1 <= layer_groups <= num_layers:
            raise ValueError(f"layer_groups must be in [1, num_layers={num_layers}], got {layer_groups}")
        self.num_layers, self.layer_groups = num_layers, layer_groups
        comps = list(components or [])
        if any(not isinstance(c, str) or not c for c in comps) or len(set(comps)) != len(comps):
            raise ValueError(f"components: give distinct non-empty filter names, got {components!r}")
        self.components = comps
        self.dtype, self.seed = dtype, seed
        self.params = self._gene_params(genes)
        self.fixed = self._check_fixed(dict(fixed or {}))
        self._names = self._layout()
        self._x0 = self._start(dict(x0 or {}))
        self._validate()

    # ------------------------------------------------------------------ construction

    def _gene_params(self, genes) -> list[GeneParam]:
        fields = [_fields(m) for m in self.methods]
        known = {name for f in fields for name in f}
        if genes is None:
            wanted: dict[str, tuple[float, float]] = {}
            for f in fields:
                for name, (scope, info) in f.items():
                    if scope != "model" or info.search is None:
                        continue
                    if name in wanted and wanted[name] != info.search:
                        raise ValueError(f"parameter '{name}' has different search ranges across the methods "
                                         f"({wanted[name]} vs {info.search}); give 'genes' explicitly")
                    wanted[name] = tuple(info.search)
            if not wanted:
                raise ValueError(f"nothing to search: {', '.join(m.name for m in self.methods)} has no per-model "
                                 "parameter with a search range; name the parameters in 'genes'")
        else:
            wanted = dict(genes)
            if not wanted:
                raise ValueError("genes: empty; name at least one parameter to search")
        out = []
        for name, rng in wanted.items():
            if name not in known:
                raise ValueError(f"genes: unknown parameter '{name}' for {', '.join(m.name for m in self.methods)} "
                                 f"(known: {', '.join(sorted(known))})")
            try:
                low, high = (float(rng[0]), float(rng[1]))
            except (TypeError, ValueError, IndexError):
                raise ValueError(f"genes: '{name}' needs a (low, high) range, got {rng!r}") from None
            if not low < high:
                raise ValueError(f"genes: '{name}' range must have low < high, got {[low, high]}")
            scopes, takers = set(), set()
            for m, f in zip(self.methods, fields, strict=True):
                if name not in f:
                    continue
                scope, info = f[name]
                scopes.add(scope)
                takers.add(m.name)
                if info.kind != "float":
                    raise ValueError(f"genes: '{name}' is a {info.kind} parameter of '{m.name}'; only float "
                                     "parameters can be searched (hold it constant with 'fixed')")
                if (info.low is not None and low < info.low) or (info.high is not None and high > info.high):
                    raise ValueError(f"genes: range {[low, high]} of '{name}' leaves its bounds "
                                     f"[{info.low}, {info.high}] in method '{m.name}'")
            if len(scopes) > 1:
                raise ValueError(f"genes: '{name}' is per-model in some methods and global in others")
            out.append(GeneParam(name, scopes.pop(), low, high, frozenset(takers)))
        return out

    def _check_fixed(self, fixed: dict) -> dict:
        searched = {p.name for p in self.params}
        for key, value in fixed.items():
            if key in searched:
                raise ValueError(f"fixed: parameter '{key}' is also searched (in genes); choose one")
            takers = [m for m in self.methods if key in _fields(m)]
            if not takers:
                known = sorted({n for m in self.methods for n in _fields(m)})
                raise ValueError(f"fixed: unknown parameter '{key}' (known: {', '.join(known)})")
            for m in takers:
                field = {**m.global_params.model_fields, **m.model_params.model_fields}[key]
                ann = Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation
                try:
                    TypeAdapter(ann).validate_python(value)
                except ValidationError as e:
                    raise ValueError(f"fixed: {key}={value!r} is not accepted by '{m.name}': "
                                     f"{e.errors()[0]['msg']}") from None
        return fixed

    def _layout(self) -> list[str]:
        names = ["method"] if len(self.methods) > 1 else []
        comps = [*self.components, "rest"] if self.components else [None]
        for p in self.params:
            owners = [f"m{i}" for i in range(len(self.models))] if p.scope == "model" else [None]
            for owner in owners:
                for c in comps:
                    for g in range(self.layer_groups):
                        names.append("/".join(x for x in (p.name, owner, f"g{g}", c) if x is not None))
        return names

    def _start(self, x0: dict) -> np.ndarray:
        start = np.full(self.dim, 0.5)
        by_name = {p.name: p for p in self.params}
        for key, value in x0.items():
            if key == "method":
                if len(self.methods) < 2:
                    raise ValueError("x0: 'method' is only searched when several methods are given")
                start[0] = self._method_unit(str(value))
            elif key in by_name:
                p = by_name[key]
                if not p.low <= float(value) <= p.high:
                    raise ValueError(f"x0: {key}={value} is outside its search range [{p.low}, {p.high}]")
                for i in self._slots(p):
                    start[i] = p.unit(float(value))
            else:
                raise ValueError(f"x0: '{key}' is not searched (searched: {', '.join(by_name)})")
        return start

    def _validate(self) -> None:
        """Decode the corners and the start for every method, then check the recipes' parameters."""
        for k in range(len(self.methods)):
            for fill in (0.0, 1.0, None):
                g = self._x0.copy() if fill is None else np.full(self.dim, fill)
                if len(self.methods) > 1:
                    g[0] = (k + 0.5) / len(self.methods)
                check_parameter_names(self.decode(g), f"ParameterSpace ({self.methods[k].name})")

    # ------------------------------------------------------------------ layout helpers

    def _method_unit(self, name: str) -> float:
        names = [m.name for m in self.methods]
        if name not in names:
            raise RecipeError(f"method '{name}' is not one of this space's methods: {', '.join(names)}")
        return (names.index(name) + 0.5) / len(names)

    def _per_value(self) -> int:
        return self.layer_groups * (len(self.components) + 1 if self.components else 1)

    def _slots(self, p: GeneParam) -> range:
        start = 1 if len(self.methods) > 1 else 0
        for q in self.params:
            n = self._per_value() * (len(self.models) if q.scope == "model" else 1)
            if q is p:
                return range(start, start + n)
            start += n
        raise KeyError(p.name)

    def _value(self, p: GeneParam, units: np.ndarray):
        """One parameter value from its genes (groups fastest within a component set)."""
        G = self.layer_groups
        plains = []
        for c in range(len(units) // G):
            vals = [p.value(float(u)) for u in units[c * G:(c + 1) * G]]
            plains.append(vals[0] if G == 1 else Groups(groups=vals))
        if not self.components:
            return plains[0]
        return [Conditional(filter=f, value=v) for f, v in zip(self.components, plains[:-1], strict=True)] \
            + [Conditional(value=plains[-1])]

    def _units(self, p: GeneParam, value, where: str) -> list[float]:
        """Inverse of ``_value``: the genes of one recipe value (RecipeError if its shape does not fit)."""
        if self.components:
            filters = [c.filter for c in value] if isinstance(value, list) and value \
                and all(isinstance(c, Conditional) for c in value) else None
            if filters != [*self.components, None]:
                raise RecipeError(f"{where}: expected conditionals with filters {self.components} and a last "
                                  f"entry without filter, got {value!r}")
            plains = [c.value for c in value]
        else:
            plains = [value]
        units = []
        for plain in plains:
            if self.layer_groups == 1:
                if isinstance(plain, bool) or not isinstance(plain, (int, float)):
                    raise RecipeError(f"{where}: expected a number, got {plain!r}")
                vals = [float(plain)]
            else:
                if not isinstance(plain, Groups) or len(plain.groups) != self.layer_groups:
                    raise RecipeError(f"{where}: expected {{groups: [...]}} with {self.layer_groups} values, "
                                      f"got {plain!r}")
                vals = list(plain.groups)
            for v in vals:
                if not (p.low - 1e-9 <= v <= p.high + 1e-9) or math.isnan(v):
                    raise RecipeError(f"{where}: {v} is outside the search range [{p.low}, {p.high}]")
                units.append(min(1.0, max(0.0, p.unit(v))))
        return units

    # ------------------------------------------------------------------ SearchSpace

    @property
    def dim(self) -> int:
        return len(self._names)

    def gene_names(self) -> list[str]:
        return list(self._names)

    def x0(self) -> np.ndarray:
        return self._x0.copy()

    def cost(self, genome: Sequence[float]) -> float | None:
        return None

    def decode(self, genome: Sequence[float]) -> Recipe:
        g = np.asarray(genome, dtype=np.float64).reshape(-1)
        if g.shape != (self.dim,):
            raise ValueError(f"genome has {g.size} genes, this space has {self.dim}")
        if np.isnan(g).any():
            raise ValueError("genome contains NaN")
        g = np.clip(g, 0.0, 1.0)
        n = len(self.methods)
        method = self.methods[min(n - 1, int(g[0] * n))] if n > 1 else self.methods[0]
        takes = _fields(method)
        per_model: list[dict] = [{} for _ in self.models]
        top = {k: v for k, v in self.fixed.items() if k in takes}
        for p in self.params:
            if method.name not in p.methods:
                continue
            units = g[self._slots(p)]
            if p.scope == "model":
                k = self._per_value()
                for i in range(len(self.models)):
                    per_model[i][p.name] = self._value(p, units[i * k:(i + 1) * k])
            else:
                top[p.name] = self._value(p, units)
        sources = [Source(model=m, parameters=ps) for m, ps in zip(self.models, per_model, strict=True)]
        return Recipe(method=method.name, base=self.base, sources=sources, parameters=top, dtype=self.dtype,
                      seed=self.seed)

    def encode(self, recipe: Recipe) -> np.ndarray:
        g = self.x0()
        if len(self.methods) > 1:
            g[0] = self._method_unit(recipe.method)
        elif recipe.method != self.methods[0].name:
            raise RecipeError(f"method '{recipe.method}' is not this space's method '{self.methods[0].name}'")
        if recipe.base != self.base:
            raise RecipeError(f"base '{recipe.base}' differs from this space's base '{self.base}'")
        if recipe.sources is None or [s.model for s in recipe.sources] != self.models:
            got = None if recipe.sources is None else [s.model for s in recipe.sources]
            raise RecipeError(f"sources {got} differ from this space's models {self.models} (in order)")
        expected = {"dtype": self.dtype, "seed": self.seed, "depth_scaling": None, "tokenizer_source": None,
                    "semantics": "evomerge"}
        for attr, mine in expected.items():
            if getattr(recipe, attr) != mine:
                raise RecipeError(f"{attr} {getattr(recipe, attr)!r} differs from this space's {mine!r}")
        takes = _fields(get_method(recipe.method))
        taken = [p for p in self.params if recipe.method in p.methods]
        model_keys = {p.name for p in taken if p.scope == "model"}
        top_keys = {p.name for p in taken if p.scope == "global"} | {k for k in self.fixed if k in takes}
        if set(recipe.parameters) != top_keys:
            raise RecipeError(f"parameters {sorted(recipe.parameters)} differ from the space's {sorted(top_keys)}")
        for k in self.fixed:
            if k in takes and recipe.parameters[k] != self.fixed[k]:
                raise RecipeError(f"parameters.{k}: {recipe.parameters[k]!r} differs from the fixed "
                                  f"{self.fixed[k]!r}")
        for i, s in enumerate(recipe.sources):
            if s.layer_range is not None or set(s.parameters) != model_keys:
                raise RecipeError(f"sources[{i}]: expected parameters {sorted(model_keys)} and no layer_range, "
                                  f"got {sorted(s.parameters)}")
        for p in taken:
            slots = list(self._slots(p))
            if p.scope == "model":
                k = self._per_value()
                for i, s in enumerate(recipe.sources):
                    g[slots[i * k:(i + 1) * k]] = self._units(p, s.parameters[p.name],
                                                              f"sources[{i}].parameters.{p.name}")
            else:
                g[slots] = self._units(p, recipe.parameters[p.name], f"parameters.{p.name}")
        if self.decode(g) != recipe:
            raise RecipeError("the recipe has this space's shape but its values do not round to the "
                              "space's 6-decimal grid")
        return g
