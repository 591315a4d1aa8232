"""The evomerge recipe: what to merge, how, and with which parameters (YAML, strictly validated)."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from evomerge.kernels.modifiers import DepthScaling
from evomerge.recipe.values import ParamValue

DTYPES = ("float32", "float16", "bfloat16")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Strict):
    """One model contributing to a merge (or to a slice of one)."""

    model: str = Field(min_length=1, description="checkpoint directory, relative to the recipe file")
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    layer_range: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _range(self):
        if self.layer_range is not None:
            a, b = self.layer_range
            if not 0 <= a < b:
                raise ValueError(f"layer_range must satisfy 0 <= start < end, got {list(self.layer_range)}")
        return self


class Slice(_Strict):
    """A run of output layers built from the same layer offsets of its sources."""

    sources: list[Source] = Field(min_length=1)
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _ranges(self):
        lengths = set()
        for s in self.sources:
            if s.layer_range is None:
                raise ValueError(f"every source in a slice needs a layer_range (missing for '{s.model}')")
            lengths.add(s.layer_range[1] - s.layer_range[0])
        if len(lengths) > 1:
            raise ValueError(f"all sources of a slice must span the same number of layers, got {sorted(lengths)}")
        return self


class Recipe(_Strict):
    """A merge recipe. Exactly one of ``sources`` (whole models) or ``slices`` (layer recipes)."""

    method: str
    base: str | None = None
    sources: list[Source] | None = None
    slices: list[Slice] | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    depth_scaling: DepthScaling | None = None
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    tokenizer_source: str | None = None
    seed: int | None = None
    semantics: Literal["evomerge", "mergekit"] = "evomerge"

    @model_validator(mode="after")
    def _shape(self):
        if (self.sources is None) == (self.slices is None):
            raise ValueError("give exactly one of 'sources' (whole models) or 'slices' (layer ranges)")
        if self.sources is not None and not self.sources:
            raise ValueError("'sources' is empty")
        if self.slices is not None and not self.slices:
            raise ValueError("'slices' is empty")
        return self

    def content_hash(self) -> str:
        """Stable SHA-256 of the recipe's content (key order and YAML formatting do not matter)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def models(self) -> list[str]:
        """Every model the recipe names, base first, without repeats."""
        names: list[str] = [self.base] if self.base else []
        groups = [self.sources] if self.sources is not None else [s.sources for s in self.slices or []]
        for group in groups:
            for s in group:
                if s.model not in names:
                    names.append(s.model)
        return names
