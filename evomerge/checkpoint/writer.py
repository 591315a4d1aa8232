"""Write HF checkpoints: sharded safetensors streamed tensor by tensor, with an index and donor files.

All tensor shapes and dtypes are known before the first byte is written, so every shard's header is
written up front and each tensor goes straight to its offset: nothing waits in memory for a shard to
fill. The checkpoint is assembled in a temporary sibling directory and renamed into place at the end,
so an interrupted write never leaves a half checkpoint at the output path. Each large tensor's pages are
handed to the disk as soon as they are written (Linux), so the final fsync mostly finds them on disk already
instead of writing the whole checkpoint while the merge waits.
"""

from __future__ import annotations

import ctypes
import functools
import json
import mmap
import os
import shutil
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.checkpoint.reader import DTYPE_CODES
from evomerge.errors import CheckpointError

DONOR_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
    "chat_template.json", "spiece.model",
)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for d in self.shape:
            n *= d
        return n


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '2GiB' or a plain byte count."""
    if isinstance(text, int):
        return text
    s = str(text).strip().upper()
    units = {"KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "B": 1}
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                return int(float(s[: -len(unit)]) * mult)
            except ValueError:
                break
    try:
        return int(s)
    except ValueError:
        raise ValueError(f"cannot read size '{text}' (use e.g. 5GB, 500MB, 2GiB)") from None


_SYNC_FILE_RANGE_WRITE = 2  # start write-out of the range's dirty pages, wait for none of it
WRITEBACK_MIN = 1 << 20  # bytes of whole pages below which a tensor's write-out waits for the final fsync


@functools.cache
def _sync_file_range():
    """libc's sync_file_range (Linux), or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start the disk write of the whole pages in ``[offset, offset + nbytes)`` of ``fd`` without waiting.

    Only a hint: durability still comes from fsync, which also reports any error of this write-out. Pages
    shared with neighbouring tensors are left alone, so none is written again while it goes to disk.
    """
    start = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (offset + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end - start >= WRITEBACK_MIN and (fn := _sync_file_range()) is not None:
        fn(fd, start, end - start, _SYNC_FILE_RANGE_WRITE)


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class CheckpointWriter:
    """Streams tensors of a known layout into sharded safetensors files under a temporary directory."""

    def __init__(self, out_dir: str | os.PathLike, specs: list[TensorSpec], *, max_shard_bytes: int = 5 * 10**9,
                 overwrite: bool = False):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not (self.out_dir.is_dir() and not any(self.out_dir.iterdir())) \
                and not overwrite:
            raise CheckpointError(f"output '{self.out_dir}' exists and is not empty; choose another path or overwrite")
        if max_shard_bytes <= 0:
            raise ValueError("shard size must be positive")
        self.tmp = self.out_dir.parent / f".{self.out_dir.name}.partial-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        groups: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in specs:
            if groups[-1] and size + spec.nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(spec)
            size += spec.nbytes
        self.shards = _shard_names(len(groups))
        self._where: dict[str, tuple[int, int, TensorSpec]] = {}
        self._fds: list[int] = []
        self._pending = {s.name for s in specs}
        for shard, group in zip(self.shards, groups, strict=True):
            header: dict = {"__metadata__": {"format": "pt"}}
            offset = 0
            for spec in group:
                header[spec.name] = {"dtype": DTYPE_CODES[spec.dtype], "shape": list(spec.shape),
                                     "data_offsets": [offset, offset + spec.nbytes]}
                offset += spec.nbytes
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)
            fd = os.open(self.tmp / shard, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.pwrite(fd, struct.pack("<Q", len(blob)) + blob, 0)
            os.ftruncate(fd, 8 + len(blob) + offset)
            base = 8 + len(blob)
            for spec in group:
                self._where[spec.name] = (len(self._fds), base + header[spec.name]["data_offsets"][0], spec)
            self._fds.append(fd)
        self.total_bytes = sum(s.nbytes for s in specs)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor (any device; cast to the planned dtype) at its place."""
        fd_index, offset, spec = self._where[name]
        if tuple(tensor.shape) != spec.shape:
            raise CheckpointError(f"tensor '{name}' has shape {tuple(tensor.shape)}, planned {spec.shape}")
        data = tensor.detach().to(device="cpu", dtype=spec.dtype).contiguous().reshape(-1)
        view = memoryview(data.view(torch.uint8).numpy()) if data.numel() else memoryview(b"")
        fd = self._fds[fd_index]
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
        _start_writeback(fd, offset, len(view))
        self._pending.discard(name)

    def finish(self, config: dict, donor: Path | None = None) -> Path:
        """Write index, config and donor files; fsync; move the checkpoint into place."""
        if self._pending:
            missing = sorted(self._pending)[:5]
            raise CheckpointError(f"{len(self._pending)} planned tensors were never written, e.g. {missing}")
        for fd in self._fds:
            os.fsync(fd)
            os.close(fd)
        self._fds = []
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {n: self.shards[i] for n, (i, _, _) in self._where.items()}}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        if donor is not None:
            for fname in DONOR_FILES:
                if (donor / fname).is_file():
                    shutil.copy2(donor / fname, self.tmp / fname)
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2))
        if self.out_dir.exists():
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{os.getpid()}"
            os.replace(self.out_dir, old)
            os.replace(self.tmp, self.out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        """Drop everything written so far."""
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        shutil.rmtree(self.tmp, ignore_errors=True)


def output_config(donor_config: dict, *, dtype: torch.dtype, layer_origin: list[int] | None) -> dict:
    """The donor's config with the output dtype and, for layer recipes, the new layer count.

    ``layer_origin[j]`` is the donor-layer index output layer j was modelled on; per-layer lists in the
    config (e.g. ``layer_types``) are rearranged to follow it.
    """
    cfg = json.loads(json.dumps(donor_config))
    dtype_name = str(dtype).removeprefix("torch.")
    cfg["torch_dtype" if "torch_dtype" in cfg or "dtype" not in cfg else "dtype"] = dtype_name
    if layer_origin is not None:
        key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers") if k in cfg), "num_hidden_layers")
        old = int(cfg.get(key, 0))
        for k, v in list(cfg.items()):
            if isinstance(v, list) and old and len(v) == old and k != "architectures":
                cfg[k] = [v[i] for i in layer_origin]
        cfg[key] = len(layer_origin)
    return cfg
