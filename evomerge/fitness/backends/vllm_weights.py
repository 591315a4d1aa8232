"""The driver's side of ``VLLMBackend.load_weights``: the checkpoint's tensors in one shared-memory file.

The driver writes new weights into their slots; the engine's workers map the same file
(``vllm_worker.WeightUpdater.evomerge_reload_shared``) and read them from there, so no tensor is
serialized or written to a new file. Imports torch and safetensors where they are used.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

# safetensors header dtype -> torch dtype name.
_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def checkpoint_tensors(model_path: Path) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """Checkpoint tensor name -> (safetensors file, torch dtype name, shape), from the files' headers
    (empty when there is no safetensors file)."""
    from safetensors import safe_open

    index = model_path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({model_path / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(model_path.glob("*.safetensors"))
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                part = f.get_slice(name)
                dtype = _SAFETENSORS_DTYPES.get(part.get_dtype())
                if dtype is None:
                    raise ValueError(
                        f"tensor {name!r} in {file} has dtype {part.get_dtype()}, not one of "
                        f"{sorted(_SAFETENSORS_DTYPES)}"
                    )
                tensors[name] = (str(file), dtype, tuple(part.get_shape()))
    return tensors


class SharedWeights:
    """Slots for every checkpoint tensor in one file (under /dev/shm by default), mapped ``MAP_SHARED``.

    Slots are 64-byte aligned, in name order; floating-point tensors are stored in ``dtype`` (the
    engine's; None keeps every tensor's checkpoint dtype), others in their checkpoint dtype. The file
    is created sparse (tmpfs allocates a page when it is first written): a slot holds a value once it
    is written or filled from the checkpoint, so an update that gives every tensor never reads the
    checkpoint, and one that gives a few reads only the rest of their blocks, once.
    """

    ALIGN = 64

    def __init__(self, path: Path, checkpoint: Mapping[str, tuple[str, str, tuple[int, ...]]], dtype=None):
        import torch

        self.path = str(path)
        self.checkpoint = checkpoint
        self.slots: dict[str, tuple[int, str, tuple[int, ...]]] = {}
        self.filled: set[str] = set()
        offset = 0
        for name in sorted(checkpoint):
            _, stored, shape = checkpoint[name]
            kind = getattr(torch, stored)
            kind = dtype if dtype is not None and kind.is_floating_point else kind
            self.slots[name] = (offset, str(kind).removeprefix("torch."), shape)
            nbytes = kind.itemsize * math.prod(shape)
            offset += -(-nbytes // self.ALIGN) * self.ALIGN
        self.size = max(offset, self.ALIGN)
        with open(self.path, "wb") as f:
            f.truncate(self.size)
        self.data = torch.from_file(self.path, shared=True, size=self.size, dtype=torch.uint8)

    def view(self, name: str):
        """The slot of ``name`` as a tensor of its shape and stored dtype (writes go to the file)."""
        import torch

        offset, dtype, shape = self.slots[name]
        kind = getattr(torch, dtype)
        return self.data[offset : offset + kind.itemsize * math.prod(shape)].view(kind).view(shape)

    def write(self, name: str, value) -> None:
        """Copy ``value`` into the slot of ``name``, cast to the slot's dtype (and moved to the CPU)."""
        self.view(name).copy_(value)
        self.filled.add(name)

    def fill(self, names) -> None:
        """Fill the slots of ``names`` that hold no value yet from the checkpoint."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.filled:
                by_file.setdefault(self.checkpoint[name][0], []).append(name)
        for file, todo in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in todo:
                    self.write(name, f.get_tensor(name))
