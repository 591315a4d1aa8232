"""Tensor naming: each tensor's layer index and component, per architecture family.

Components: embedding, attention, mlp, norm, head, other. Llama, Mistral, Qwen2 (``model.layers.N``)
and GPT-2 (``transformer.h.N``) are known by name; anything else falls back to the first ``.<digits>.``
after a layer-stack segment (layers / h / blocks / layer / decoder.layers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

COMPONENTS = ("embedding", "attention", "mlp", "norm", "head", "other")

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer|block)\.(\d+)\.")
_RULES: tuple[tuple[str, re.Pattern], ...] = (
    ("embedding", re.compile(r"(embed_tokens|\bwte\b|\bwpe\b|embed_positions|word_embeddings|\.embeddings?\.)")),
    ("head", re.compile(r"(^lm_head\.|^output\.|\.lm_head\.|^embed_out\.)")),
    ("norm", re.compile(r"(norm|\bln_\w*|layernorm|\bln\b)")),
    ("attention", re.compile(r"(self_attn|\battn\b|attention|\bq_proj|\bk_proj|\bv_proj|\bo_proj|c_attn)")),
    ("mlp", re.compile(r"(\bmlp\b|feed_forward|\bffn\b|gate_proj|up_proj|down_proj|\bc_fc\b|\bw[123]\b)")),
)
# The last linear map of each residual branch (scaled when folding data-flow scales).
_BRANCH_OUT = re.compile(r"(o_proj|down_proj|attn\.c_proj|mlp\.c_proj|dense_4h_to_h|\bw2\b)\.(weight|bias)$")


@dataclass(frozen=True)
class TensorName:
    """A parsed tensor name."""

    name: str
    layer: int | None
    component: str

    @property
    def is_branch_output(self) -> bool:
        return self.layer is not None and bool(_BRANCH_OUT.search(self.name))


def parse(name: str) -> TensorName:
    """Layer index (None outside the layer stack) and component of a tensor name."""
    m = _LAYER.search(name)
    layer = int(m.group(1)) if m else None
    tail = name[m.end():] if m else name
    component = "other"
    for comp, pattern in _RULES:
        if layer is not None and comp in ("embedding", "head"):
            continue
        if pattern.search(tail if layer is not None else name):
            component = comp
            break
    return TensorName(name, layer, component)


def with_layer(name: str, layer: int) -> str:
    """``name`` with its layer index replaced by ``layer``."""
    m = _LAYER.search(name)
    if not m:
        raise ValueError(f"tensor '{name}' has no layer index")
    return name[: m.start(1)] + str(layer) + name[m.end(1):]


def is_vocab_tensor(name: str) -> bool:
    """Embedding or output head: its first dimension is the vocabulary and may differ between models."""
    info = parse(name)
    return info.layer is None and info.component in ("embedding", "head") and "wpe" not in name \
        and "embed_positions" not in name
