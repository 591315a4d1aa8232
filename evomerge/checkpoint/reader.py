"""Read HF checkpoints one tensor at a time from safetensors files (single or sharded).

``get`` reads one tensor's bytes with pread straight into a new tensor: no whole-file load and no
mapped pages counted against the process, so a merge never holds whole models in memory. Pickle ``.bin`` weights are refused unless
``allow_pickle=True`` (then ``weights_only=True``).

A process that merges from the same sources again and again (an evaluator) opens them through a
``CheckpointCache``: headers are parsed once, weight files are memory-mapped once (``mapped=True``: ``get``
copies out of the page cache without a system call per tensor), and a checkpoint whose files changed on
disk is opened afresh on its next use.
"""

from __future__ import annotations

import itertools
import json
import mmap
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.errors import CheckpointError

_OPENINGS = itertools.count()  # tells apart every Checkpoint made in this process

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorMeta:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_safetensors_header(path: Path) -> dict[str, TensorMeta]:
    """Parse a safetensors header without reading tensor data."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            size = os.fstat(f.fileno()).st_size
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{path}: corrupt safetensors header (length {n}, file {size} bytes)")
            header = json.loads(f.read(n))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors header: {e}") from e
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {info.get('dtype')}")
        s, e = info["data_offsets"]
        if 8 + n + e > size:
            raise CheckpointError(f"{path}: tensor '{name}' extends past the end of the file (truncated?)")
        out[name] = TensorMeta(path, SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + s, 8 + n + e)
    return out


class Checkpoint:
    """An HF checkpoint directory: config, tokenizer files and lazily read tensors."""

    def __init__(self, path: str | os.PathLike, *, allow_pickle: bool = False, mapped: bool = False):
        self.path = Path(path)
        self.mapped = mapped
        # (size, mtime, inode) of the directory and of every file read, taken before reading it: a change
        # from then on makes ``unchanged`` false
        self._stamps: dict[Path, tuple[int, int, int] | None] = {self.path: _stamp(self.path)}
        if not self.path.exists():
            raise CheckpointError(f"checkpoint '{self.path}' does not exist")
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint '{self.path}' is not a directory")
        cfg = self.path / "config.json"
        if not cfg.is_file():
            raise CheckpointError(f"checkpoint '{self.path}' has no config.json")
        self._stamps[cfg] = _stamp(cfg)
        try:
            self.config: dict = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg}: invalid JSON: {e}") from e
        self._fds: dict[Path, int] = {}
        self._maps: dict[Path, torch.Tensor] = {}  # weight file -> its bytes, memory-mapped (mapped=True)
        self._views: dict[str, torch.Tensor | None] = {}  # name -> its bytes in _maps; None: pread it
        # Names whose values a merge has found finite in this opening of the files (a checkpoint that
        # changes on disk is opened afresh by CheckpointCache, with an empty set).
        self.finite: set[str] = set()
        # What merges derived from these files and may reuse while they are unchanged (e.g. the magnitude
        # histograms of task vectors against a base, keyed with that base's ``opening``).
        self.derived: dict[tuple, object] = {}
        self.opening = next(_OPENINGS)
        self._pickled: dict[Path, dict] = {}
        self._meta = self._index(allow_pickle)

    # ------------------------------------------------------------------ discovery
    def _header(self, file: Path) -> dict[str, TensorMeta]:
        self._stamps[file] = _stamp(file)
        return read_safetensors_header(file)

    def _index(self, allow_pickle: bool) -> dict[str, TensorMeta]:
        p = self.path
        index = p / "model.safetensors.index.json"
        if index.is_file():
            self._stamps[index] = _stamp(index)
            files = sorted(set(self._weight_map(index).values()))
            meta: dict[str, TensorMeta] = {}
            for fname in files:
                shard = p / fname
                if not shard.is_file():
                    raise CheckpointError(f"{index} names shard '{fname}', which is missing")
                meta.update(self._header(shard))
            return meta
        single = p / "model.safetensors"
        if single.is_file():
            return self._header(single)
        others = sorted(p.glob("*.safetensors"))
        if others:
            meta = {}
            for shard in others:
                meta.update(self._header(shard))
            return meta
        bins = sorted(p.glob("pytorch_model*.bin"))
        if bins:
            if not allow_pickle:
                raise CheckpointError(
                    f"checkpoint '{p}' has only pickle weights ({bins[0].name}); pickle can run code, so it is "
                    "refused. Convert it to safetensors, or pass --allow-pickle to load it with weights_only=True")
            meta = {}
            for b in bins:
                self._stamps[b] = _stamp(b)
                try:
                    sd = torch.load(b, map_location="cpu", weights_only=True, mmap=True)
                except Exception as e:  # noqa: BLE001 - torch raises many types here
                    raise CheckpointError(f"{b}: cannot load with weights_only=True: {e}") from e
                self._pickled[b] = sd
                for k, v in sd.items():
                    meta[k] = TensorMeta(b, v.dtype, tuple(v.shape), 0, 0)
            return meta
        raise CheckpointError(f"checkpoint '{p}' has no weights (*.safetensors or pytorch_model*.bin)")

    @staticmethod
    def _weight_map(index: Path) -> dict[str, str]:
        try:
            return json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e

    # ------------------------------------------------------------------ queries
    @property
    def names(self) -> list[str]:
        return list(self._meta)

    def __contains__(self, name: str) -> bool:
        return name in self._meta

    def meta(self, name: str) -> TensorMeta:
        try:
            return self._meta[name]
        except KeyError:
            raise CheckpointError(f"checkpoint '{self.path}' has no tensor '{name}'") from None

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "unknown")]
        return str(archs[0])

    @property
    def num_layers(self) -> int:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in self.config:
                return int(self.config[key])
        raise CheckpointError(f"{self.path}/config.json has no num_hidden_layers")

    @property
    def nbytes(self) -> int:
        return sum((m.end - m.start) for m in self._meta.values())

    def unchanged(self) -> bool:
        """Whether the directory, config and every file read at opening still look as they did then
        (size, modification time, inode; the directory's own entry catches files added, removed or
        renamed into place)."""
        return all(_stamp(f) == st for f, st in self._stamps.items())

    # ------------------------------------------------------------------ data
    def get(self, name: str, dtype: torch.dtype | None = torch.float32,
            device: torch.device | str = "cpu") -> torch.Tensor:
        """An owned copy of tensor ``name``, cast to ``dtype`` (None keeps the stored dtype).

        Safetensors data is read with pread straight into the tensor's memory: no page of the file is
        mapped into this process, so resident memory holds only the tensors asked for.
        """
        m = self.meta(name)
        if m.file in self._pickled:
            src = self._pickled[m.file][name]
            return src.to(device=device, dtype=dtype or src.dtype, copy=True)
        view = None
        if self.mapped:
            view = self._views[name] if name in self._views else self._mapped_view(name, m)
        if view is not None:
            return view.to(device=device, dtype=dtype or m.dtype, copy=True)
        raw = torch.empty(m.shape, dtype=m.dtype)
        nbytes = m.end - m.start
        if nbytes:
            buf = memoryview(raw.reshape(-1).view(torch.uint8).numpy())
            fd = self._fd(m.file)
            done = 0
            while done < nbytes:
                n = os.preadv(fd, [buf[done:]], m.start + done)
                if n <= 0:
                    raise CheckpointError(f"{m.file}: short read for tensor '{name}'")
                done += n
        if (dtype is None or dtype == m.dtype) and torch.device(device).type == "cpu":
            return raw
        return raw.to(device=device, dtype=dtype or m.dtype)

    def borrow(self, name: str) -> torch.Tensor:
        """Tensor ``name`` in its stored dtype, without a copy where the file is mapped (``mapped=True``).

        The result may view the file's private mapping, which later calls share: read it, never write
        into it. Unmapped, pickled or unaligned tensors come as owned copies (``get``).
        """
        if self.mapped and self.meta(name).file not in self._pickled:
            view = self._views[name] if name in self._views else self._mapped_view(name, self._meta[name])
            if view is not None:
                return view
        return self.get(name, dtype=None)

    def _mapped_view(self, name: str, m: TensorMeta) -> torch.Tensor | None:
        """The tensor ``name`` in its file's private mapping (never written, remembered), or None where the
        offset is not aligned to the dtype (then ``get`` reads with pread)."""
        data = self._maps.get(m.file)
        if data is None:
            with open(m.file, "rb") as f:
                if os.fstat(f.fileno()).st_size == 0:
                    return None
                # ACCESS_COPY: a private mapping, writable for torch, whose writes could never reach the file
                data = torch.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=torch.uint8)
            self._maps[m.file] = data
        if m.end > data.numel():
            raise CheckpointError(f"{m.file}: tensor extends past the end of the file (changed on disk?)")
        view = None if m.start % m.dtype.itemsize else data[m.start:m.end].view(m.dtype).view(m.shape)
        self._views[name] = view
        return view

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = os.open(file, os.O_RDONLY)
            self._fds[file] = fd
        return fd

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._views.clear()
        self.finite.clear()
        self.derived.clear()
        self._maps.clear()  # unmapped once no tensor views them (what borrow handed out keeps its pages)
        self._pickled.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint('{self.path}', {len(self._meta)} tensors)"


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


class CheckpointCache:
    """Checkpoints kept open across uses, keyed by resolved path; one whose files changed is reopened.

    ``open`` checks the files of a cached checkpoint (see ``Checkpoint.unchanged``) on every call, so a model
    rewritten or replaced on disk is read afresh by the next plan. The cache owns what it opened: callers
    must not close those checkpoints; ``close`` closes them all. At most ``size`` stay open (the least
    recently used is closed first; a closed Checkpoint still reads, it only lets go of its files). Used by
    one thread at a time. With ``mapped``, as with any memory-mapped reader, a weight file truncated in
    place while a merge reads it can end the process (SIGBUS); a file replaced by a rename (as
    CheckpointWriter writes) cannot.
    """

    def __init__(self, *, mapped: bool = True, size: int = 32):
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self.mapped = mapped
        self.size = size
        self._open: OrderedDict[tuple[Path, bool], Checkpoint] = OrderedDict()
        self._resolved: dict[str, Path] = {}  # see _resolve
        self.opened = 0  # checkpoints opened (first use, reopened after a change, or after eviction)

    def _resolve(self, path: str | os.PathLike) -> Path:
        """``path`` resolved (symbolic links, ``..``), remembered for a path that resolves to itself.

        Such a path (absolute, normalized, no symbolic link on it when first seen) is its own key for good:
        the checkpoint is read and its files' stamps are taken through that very path, so whatever it
        names later (a link put on the way, a directory replaced) shows as changed files in ``unchanged``.
        Any other path is resolved on every use, so that a link pointed elsewhere opens what it now names.
        """
        text = os.fspath(path)
        hit = self._resolved.get(text)
        if hit is not None:
            return hit
        resolved = Path(text).expanduser().resolve()
        if str(resolved) == text:
            if len(self._resolved) >= 1024:
                self._resolved.clear()
            self._resolved[text] = resolved
        return resolved

    def open(self, path: str | os.PathLike, *, allow_pickle: bool = False) -> Checkpoint:
        key = (self._resolve(path), allow_pickle)
        ck = self._open.get(key)
        if ck is not None:
            if ck.unchanged():
                self._open.move_to_end(key)
                return ck
            del self._open[key]
            ck.close()
        ck = Checkpoint(key[0], allow_pickle=allow_pickle, mapped=self.mapped)
        self._open[key] = ck
        self.opened += 1
        while len(self._open) > self.size:
            self._open.popitem(last=False)[1].close()
        return ck

    def close(self) -> None:
        for ck in self._open.values():
            ck.close()
        self._open.clear()
