"""The run's truth: an append-only journal of events (JSON lines), plus atomic snapshots.

Every record is one line written with a single ``write`` and fsynced before ``append`` returns, so a
record is either wholly on disk or (after a crash mid-write) a torn last line. Reading skips a torn last
line; opening for append cuts it off first, so the next record starts on a fresh line. A torn line
anywhere but the end is corruption and raises. Snapshots (optimizer state) are written to a temp file,
fsynced and renamed over the old one: a reader sees the old or the new snapshot, never half of one.
Snapshots are an optimization: the journal alone determines the run.

Record kinds written by the run loop (``kind`` field): ``start`` (config hash, seed, format),
``ask`` (candidate id, recipe hash, recipe, genome, parents, info), ``result`` (recipe hash, per task and
split the TaskResult, timings, worker), ``failure`` (recipe hash, attempt, error), ``failed`` (recipe hash,
final error), ``resume``, ``end``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError

FORMAT = 1


class JournalError(EvomergeError):
    """The journal is unreadable, corrupt, or belongs to another run."""


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class Journal:
    """Append and read JSON records in ``path``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    # -- reading -----------------------------------------------------------------------------------

    def read(self) -> list[dict[str, Any]]:
        """Every complete record, in order (a torn last line is skipped)."""
        return list(self._records())

    def _records(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:  # the last line has no newline: a write cut short
                    return
                raise JournalError(f"{self.path}: line {i + 1} is not a JSON record (the journal is corrupt)") from None
            if not isinstance(record, dict) or "kind" not in record:
                raise JournalError(f"{self.path}: line {i + 1} is not a journal record")
            yield record

    # -- appending ---------------------------------------------------------------------------------

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            size = os.fstat(fd).st_size
            if size:
                # Cut a torn last line (no trailing newline) so the next record starts cleanly.
                data = self.path.read_bytes()
                keep = data.rfind(b"\n") + 1
                if keep != size:
                    os.ftruncate(fd, keep)
                    os.fsync(fd)
            if created:
                _fsync_dir(self.path.parent)
            self._fd = fd
        return self._fd

    def append(self, record: dict[str, Any]) -> None:
        """Write one record durably (flushed and fsynced before returning)."""
        if "kind" not in record:
            raise ValueError("a journal record needs a 'kind'")
        line = json.dumps(record, separators=(",", ":"), allow_nan=True) + "\n"
        fd = self._open()
        data = line.encode()
        written = os.write(fd, data)
        while written < len(data):  # os.write may write less than asked (rare, e.g. signals)
            written += os.write(fd, data[written:])
        os.fsync(fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_snapshot(path: str | Path, state: dict[str, Any]) -> None:
    """Replace ``path`` with ``state`` (JSON) atomically and durably."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps(state, separators=(",", ":"), allow_nan=True).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_snapshot(path: str | Path) -> dict[str, Any] | None:
    """The snapshot in ``path``, or None if there is none (a leftover temp file is ignored)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JournalError(f"{path}: snapshot is not valid JSON ({e}); delete it to resume from the journal") from None
