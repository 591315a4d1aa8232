"""Read mergekit configs as they are, keeping mergekit's own semantics.

The config becomes an evomerge ``Recipe`` with ``semantics: mergekit`` and every default that differs
from evomerge's written out explicitly. Where mergekit's results differ from evomerge's own kernels:

* dare_* and della* rescale kept entries so each tensor keeps its L1 norm (``rescale: l1``), not by
  1/density (evomerge's default, as in the DARE and DELLA papers); ``rescale: false`` disables it.
* dare_ties and breadcrumbs_ties do not normalize by default; della's epsilon defaults to 0.15.
* A ``base_model`` missing from ``models`` joins the merge for linear, slerp and karcher.
* Gradients evaluate at t = 0 for every tensor outside the layer stack; filters are substrings of the
  tensor name, matched against input names for per-model parameters.
* model_stock does not clamp its interpolation factor; karcher ignores per-model weights.
* evomerge computes in float32 where mergekit computes in the loaded dtype, so results agree to float
  tolerance, not bit for bit. Randomized methods (dare, della) agree in distribution only: mergekit
  draws from one global stream, evomerge seeds per (seed, model, tensor).
* Not reproduced: breadcrumbs zeroing the whole delta when int(gamma * numel) == 0 (a mergekit quirk;
  evomerge keeps the middle band).
"""

from __future__ import annotations

from typing import Any

from evomerge.errors import RecipeError

SUPPORTED = {
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "slerp", "model_stock", "sce", "karcher", "passthrough",
}
_TOP_KEYS = {"merge_method", "models", "slices", "parameters", "base_model", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template", "name"}
_GTA = {"task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
        "della_linear"}
# mergekit defaults that differ from evomerge's, made explicit on import
_DEFAULTS: dict[str, dict[str, Any]] = {
    "ties": {"normalize": True},
    "dare_ties": {"normalize": False, "rescale": "l1"},
    "dare_linear": {"normalize": False, "rescale": "l1"},
    "della": {"normalize": True, "rescale": "l1"},
    "della_linear": {"normalize": False, "rescale": "l1"},
    "breadcrumbs_ties": {"normalize": False},
    "breadcrumbs": {"normalize": False},
    "task_arithmetic": {"normalize": False},
    "model_stock": {"clamp": False},
}
_MODEL_DEFAULTS = {"della": {"epsilon": 0.15}, "della_linear": {"epsilon": 0.15}}
_INCLUDES_BASE = {"linear", "slerp", "karcher"}


def _model_ref(ref: Any, where: str) -> str:
    if isinstance(ref, dict):  # mergekit also accepts {model: {path: ...}}
        ref = ref.get("model", ref).get("path") if isinstance(ref.get("model", ref), dict) else ref.get("model")
    if not isinstance(ref, str) or not ref:
        raise RecipeError(f"{where}: a model reference must be a path string, got {ref!r}")
    if "+" in ref:
        raise RecipeError(f"{where}: LoRA references ('{ref}') are not supported; merge the adapter first")
    if "@" in ref:
        raise RecipeError(f"{where}: revision references ('{ref}') need the hub; give a local path")
    return ref


def _params(raw: Any, method: str, where: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: 'parameters' must be a mapping, got {type(raw).__name__}")
    out = {}
    for k, v in raw.items():
        if k == "int8_mask":
            continue  # changes mask dtype only; results are identical
        if k == "lambda":
            k = "lam"
        if k == "rescale" and method in ("dare_ties", "dare_linear", "della", "della_linear"):
            v = "l1" if v else "none"
        if method == "karcher" and k == "weight":
            continue  # mergekit's karcher ignores weights
        out[k] = v
    return out


def from_mergekit(cfg: dict, where: str) -> dict:
    """Translate a mergekit config mapping into evomerge recipe fields (validated afterwards)."""
    unknown = set(cfg) - _TOP_KEYS
    if unknown:
        raise RecipeError(f"{where}: unknown mergekit key(s) {sorted(unknown)} (allowed: {sorted(_TOP_KEYS)})")
    method = cfg["merge_method"]
    if method not in SUPPORTED:
        raise RecipeError(f"{where}: mergekit method '{method}' is not supported; supported: {sorted(SUPPORTED)}")
    if cfg.get("tokenizer") is not None:
        raise RecipeError(f"{where}: the 'tokenizer' block is not supported; use tokenizer_source: base or a model")
    if cfg.get("chat_template") not in (None, "auto"):
        raise RecipeError(f"{where}: chat_template overrides are not supported")
    if ("models" in cfg) == ("slices" in cfg):
        raise RecipeError(f"{where}: a mergekit config needs exactly one of 'models' or 'slices'")
    base = _model_ref(cfg["base_model"], f"{where}: base_model") if cfg.get("base_model") else None
    glob = {**_DEFAULTS.get(method, {}), **_params(cfg.get("parameters"), method, f"{where}: parameters")}
    for k, v in _MODEL_DEFAULTS.get(method, {}).items():
        glob.setdefault(k, v)
    out: dict[str, Any] = {"method": method, "semantics": "mergekit", "parameters": glob}
    dtype = cfg.get("out_dtype") or cfg.get("dtype")
    if dtype:
        out["dtype"] = str(dtype).removeprefix("torch.")
    tok = cfg.get("tokenizer_source")
    if tok is not None:
        out["tokenizer_source"] = tok if tok in ("base", "union") else _model_ref(tok, f"{where}: tokenizer_source")
    if base and method in _INCLUDES_BASE and out.get("tokenizer_source") in (None, "base"):
        # The base joins these merges as a source; mergekit still takes config and tokenizer from it.
        out["tokenizer_source"] = base

    def convert_sources(entries, at, with_range):
        if not isinstance(entries, list) or not entries:
            raise RecipeError(f"{at}: expected a non-empty list of models")
        conv = []
        for i, e in enumerate(entries):
            if not isinstance(e, dict):
                raise RecipeError(f"{at}[{i}]: expected a mapping with 'model'")
            extra = set(e) - {"model", "parameters", "layer_range"}
            if extra:
                raise RecipeError(f"{at}[{i}]: unknown key(s) {sorted(extra)} (allowed: model, parameters, layer_range)")
            src = {"model": _model_ref(e.get("model"), f"{at}[{i}]"),
                   "parameters": _params(e.get("parameters"), method, f"{at}[{i}].parameters")}
            if with_range and "layer_range" in e:
                src["layer_range"] = e["layer_range"]
            conv.append(src)
        return conv

    def place_base(sources, layer_range=None):
        names = [s["model"] for s in sources]
        if base is None:
            return sources
        if method in _INCLUDES_BASE:
            if base not in names:
                entry = {"model": base, "parameters": {}}
                if layer_range is not None:
                    entry["layer_range"] = layer_range
                sources = sources + [entry]
            if method == "slerp":  # t = 0 is the base
                sources = sorted(sources, key=lambda s: s["model"] != base)
            return sources
        return sources if layer_range is not None else [s for s in sources if s["model"] != base]

    if "models" in cfg:
        out["sources"] = place_base(convert_sources(cfg["models"], f"{where}: models", False))
        if base and method not in _INCLUDES_BASE:
            out["base"] = base
    else:
        slices = []
        for j, sl in enumerate(cfg["slices"] or []):
            if not isinstance(sl, dict) or "sources" not in sl:
                raise RecipeError(f"{where}: slices[{j}] needs 'sources'")
            extra = set(sl) - {"sources", "parameters", "base_model", "residual_weight"}
            if extra:
                raise RecipeError(f"{where}: slices[{j}]: unknown key(s) {sorted(extra)}")
            srcs = convert_sources(sl["sources"], f"{where}: slices[{j}].sources", True)
            rng = next((s.get("layer_range") for s in srcs if s["model"] == base), srcs[0].get("layer_range"))
            slices.append({"sources": place_base(srcs, rng),
                           "parameters": _params(sl.get("parameters"), method, f"{where}: slices[{j}].parameters")})
        out["slices"] = slices
        if base and method not in _INCLUDES_BASE:
            out["base"] = base
    return out
