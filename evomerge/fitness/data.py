"""Read a task's rows through HF ``datasets`` and pick the items of each split, deterministically.

Local files are the normal case. A dataset named on the Hub is loaded through ``datasets`` too, but
evaluation machines here run offline (HF_HUB_OFFLINE=1): such a dataset must already sit in the HF
cache, otherwise loading fails with a TaskError that says so.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.errors import TaskError

if TYPE_CHECKING:
    from evomerge.fitness.task import DataSpec, SliceSpec

FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class Item:
    """One row of the data: a stable id, where it came from (split, row index), and its fields."""

    id: str
    split: str
    index: int
    fields: Mapping[str, Any]


def load_rows(spec: DataSpec, base: Path, where: str) -> dict[str, Any]:
    """The data's splits as HF ``Dataset`` objects, keyed by split name ('train' for a single file).

    datasets' progress bars are switched off while loading (and restored after): loading is not progress.
    """
    import datasets

    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        return _load(datasets.load_dataset, spec, base, where)
    finally:
        if not quiet:
            datasets.enable_progress_bars()


def _load(load_dataset, spec: DataSpec, base: Path, where: str) -> dict[str, Any]:
    if spec.file is not None:
        files = {"train": spec.file} if isinstance(spec.file, str) else dict(spec.file)
        paths = {split: _local(base, f, where) for split, f in files.items()}
        fmt = spec.format or _format_of(paths, where)
        try:
            loaded = load_dataset(fmt, data_files={s: str(p) for s, p in paths.items()})
        except Exception as e:  # datasets raises many types for unreadable files
            names = ", ".join(str(p) for p in paths.values())
            raise TaskError(f"{where}: data.file: could not read {names} as {fmt}: {e}") from e
    else:
        try:
            loaded = load_dataset(spec.dataset, spec.config, revision=spec.revision)
        except Exception as e:  # offline, not cached, unknown name or config
            raise TaskError(
                f"{where}: data.dataset: could not load {spec.dataset!r} (config {spec.config!r}): {e}. "
                "Evaluation runs offline (HF_HUB_OFFLINE=1): put the dataset in the HF cache beforehand, "
                "or export it to a local jsonl/csv/parquet file and name it under data.file"
            ) from e
    return dict(loaded)


def _local(base: Path, name: str, where: str) -> Path:
    path = Path(name) if Path(name).is_absolute() else base / name
    if not path.is_file():
        raise TaskError(f"{where}: data.file: {path} does not exist (paths are relative to the task file)")
    return path


def _format_of(paths: Mapping[str, Path], where: str) -> str:
    formats = set()
    for p in paths.values():
        fmt = FORMATS.get(p.suffix.lower())
        if fmt is None:
            raise TaskError(
                f"{where}: data.file: cannot tell the format of {p.name} from its extension "
                f"(known: {', '.join(FORMATS)}); set data.format"
            )
        formats.add(fmt)
    if len(formats) > 1:
        raise TaskError(f"{where}: data.file: files mix formats {sorted(formats)}; use one format")
    return formats.pop()


def row_order(n: int, split: str, seed: int, shuffle: bool) -> list[int]:
    """Row indices of a split in drawing order: as stored, or a permutation fixed by (seed, split name)."""
    order = list(range(n))
    if shuffle:
        random.Random(f"{seed}:shuffle:{split}").shuffle(order)
    return order


def select(
    spec: SliceSpec, rows: Mapping[str, Any], key: str, where: str, seed: int, shuffle: bool
) -> list[int]:
    """Row indices (within ``spec.split``) that a slice spec picks, in drawing order; never empty."""
    if spec.split not in rows:
        raise TaskError(
            f"{where}: {key}.split: the data has no split {spec.split!r} (available: {', '.join(rows)})"
        )
    n = len(rows[spec.split])
    end = n if spec.size is None else spec.start + spec.size
    if end > n:
        raise TaskError(
            f"{where}: {key}: asks for items {spec.start}..{end - 1} of split {spec.split!r}, which has {n}"
        )
    picked = row_order(n, spec.split, seed, shuffle)[spec.start : end]
    if not picked:
        raise TaskError(f"{where}: {key}: selects no items (split {spec.split!r} has {n})")
    return picked


def check_disjoint(a: tuple[str, str, Sequence[int]], b: tuple[str, str, Sequence[int]], where: str) -> None:
    """Two selections (key, split, indices) of the same split must share no row."""
    key_a, split_a, idx_a = a
    key_b, split_b, idx_b = b
    if split_a != split_b:
        return
    shared = sorted(set(idx_a) & set(idx_b))
    if shared:
        shown = ", ".join(str(i) for i in shared[:5]) + (", ..." if len(shared) > 5 else "")
        raise TaskError(
            f"{where}: {key_b}: overlaps {key_a} on {len(shared)} item(s) of split {split_a!r} "
            f"(rows {shown}); give them disjoint start/size ranges"
        )


def make_items(
    rows: Mapping[str, Any], split: str, indices: Sequence[int], id_field: str | None, where: str
) -> tuple[Item, ...]:
    """Materialize rows as Items; the id is the id_field's value, else '<split>/<row index>'."""
    records = rows[split].select(list(indices)).to_list()
    items = []
    for index, fields in zip(indices, records, strict=True):
        if id_field is not None:
            if fields.get(id_field) is None:
                raise TaskError(f"{where}: data.id_field: row {index} of split {split!r} has no {id_field!r}")
            item_id = str(fields[id_field])
        else:
            item_id = f"{split}/{index}"
        items.append(Item(id=item_id, split=split, index=index, fields=fields))
    return tuple(items)


def check_unique_ids(groups: Mapping[str, Sequence[Item]], where: str) -> None:
    """Item ids key the per-item scores: they must be unique within and across the given groups."""
    seen: dict[str, str] = {}
    for key, items in groups.items():
        for item in items:
            if item.id in seen:
                other = seen[item.id]
                where_else = "appears twice" if other == key else f"is also in {other}"
                raise TaskError(f"{where}: {key}: item id {item.id!r} {where_else}; ids must be unique")
            seen[item.id] = key
