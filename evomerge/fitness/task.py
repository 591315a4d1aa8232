"""A fitness task: its YAML definition (strictly validated) and the loaded items of its splits.

A task file names its data, two disjoint splits (``search`` drives the optimizer, ``heldout`` checks
that gains generalize), a prompt template, and a scorer. ``load_task`` reads the data and checks every
item up front, so a bad task fails at load time, naming the file and the key, not hours into a search.
See fitness/*.yaml for examples.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from evomerge.errors import TaskError
from evomerge.fitness import data as _data
from evomerge.fitness import prompts as _prompts
from evomerge.fitness.data import Item
from evomerge.fitness.explain import explain
from evomerge.fitness.scorers import EXTRACT_MODES, MATCH_MODES, NORMALIZATIONS

SPLITS = ("search", "heldout")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(_Strict):
    """Where items come from: local file(s) read through HF datasets, or a dataset by name (cached only:
    runtime is offline). ``file`` is one path (split 'train') or a mapping split -> path, relative to
    the task file."""

    file: str | dict[str, str] | None = None
    format: Literal["json", "csv", "parquet"] | None = None
    dataset: str | None = None
    config: str | None = None
    revision: str | None = None
    id_field: str | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if (self.file is None) == (self.dataset is None):
            raise ValueError("give exactly one of 'file' (local data) or 'dataset' (a cached HF dataset)")
        if self.file is not None and (self.config or self.revision):
            raise ValueError("'config' and 'revision' only apply to 'dataset'")
        if self.dataset is not None and self.format:
            raise ValueError("'format' only applies to 'file'")
        if isinstance(self.file, dict) and not self.file:
            raise ValueError("'file' mapping is empty")
        return self


class SliceSpec(_Strict):
    """Items ``start .. start+size-1`` of a data split (after shuffling, if the task shuffles).
    A bare split name means the whole split."""

    split: str = Field(min_length=1)
    start: int = Field(0, ge=0)
    size: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, value):
        return {"split": value} if isinstance(value, str) else value


class Splits(_Strict):
    """The two item sets a task is evaluated on; they never share an item."""

    search: SliceSpec
    heldout: SliceSpec


class FewShot(_Strict):
    """k solved examples before each prompt, drawn from ``split`` minus the search and heldout items."""

    k: int = Field(ge=1)
    split: SliceSpec
    separator: str = "\n\n"
    sampling: Literal["fixed", "per_item"] = "fixed"


class Prompt(_Strict):
    """``template`` over item fields; ``target_delimiter`` goes between a prompt and an answer (few-shot
    answers, multiple-choice options); ``chat_template`` wraps the whole prompt in the model's chat format."""

    template: str = Field(min_length=1)
    chat_template: bool = False
    fewshot: FewShot | None = None
    target_delimiter: str = " "

    @field_validator("template")
    @classmethod
    def _parses(cls, value: str) -> str:
        _prompts.placeholders(value)
        return value


class GenerateScorer(_Strict):
    """Greedy generation, then extract -> normalize -> match against the ``target`` field (score 0 or 1)."""

    type: Literal["generate"]
    target: str
    max_new_tokens: int = Field(32, ge=1)
    stop: tuple[str, ...] = ()
    extract: Literal[EXTRACT_MODES] = "full"
    pattern: str | None = None
    group: int | str = 1
    normalize: tuple[Literal[NORMALIZATIONS], ...] = ("strip",)
    match: Literal[MATCH_MODES] = "exact"
    tolerance: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _consistent(self):
        if (self.extract == "regex") != (self.pattern is not None):
            raise ValueError("'pattern' is required with extract: regex, and only then")
        if self.pattern is not None:
            try:
                compiled = re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"pattern {self.pattern!r} is not a valid regex: {e}") from None
            ok = (
                0 <= self.group <= compiled.groups
                if isinstance(self.group, int)
                else self.group in compiled.groupindex
            )
            if not ok:
                raise ValueError(f"group {self.group!r} is not a group of pattern {self.pattern!r}")
        if self.match == "numeric" and "remove_punctuation" in self.normalize:
            raise ValueError(
                "match: numeric cannot use remove_punctuation (it drops signs and decimal points)"
            )
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        return self


class MultipleChoiceScorer(_Strict):
    """Pick the option with the highest log-likelihood; ``choices`` is a field holding a list or the fixed
    list itself; ``gold`` names the field holding the right option's index or text."""

    type: Literal["multiple_choice"]
    choices: str | tuple[str, ...]
    gold: str

    @field_validator("choices")
    @classmethod
    def _options(cls, value):
        if not isinstance(value, str) and (len(value) < 2 or not all(value) or len(set(value)) < len(value)):
            raise ValueError("a fixed list of choices needs at least two distinct non-empty options")
        return value


class LoglikelihoodScorer(_Strict):
    """Log-likelihood of the ``reference`` field after the prompt (or the ``context`` field, or nothing);
    the item score is the mean log-probability per token, the aggregate adds perplexity."""

    type: Literal["loglikelihood"]
    reference: str
    context: str | None = None


Scorer = Annotated[GenerateScorer | MultipleChoiceScorer | LoglikelihoodScorer, Field(discriminator="type")]


class TaskConfig(_Strict):
    """The validated content of a task YAML file. ``name`` and ``version`` are part of every score key:
    bump the version when a change should not be compared with earlier scores."""

    name: str = Field(min_length=1)
    version: StrictInt | Annotated[StrictStr, Field(min_length=1)]
    description: str = ""
    data: DataSpec
    splits: Splits
    seed: int = 0
    shuffle: bool = False
    prompt: Prompt | None = None
    scorer: Scorer


@dataclass(frozen=True)
class Task:
    """A loaded task: its config, the items of each split, the few-shot pool, and a fingerprint of both.

    The fingerprint hashes the config (description and data location excluded) and the content of every
    item it can show the model, so editing the YAML or the data changes score keys even if the version
    is not bumped.
    """

    config: TaskConfig
    path: Path
    splits: dict[str, tuple[Item, ...]]
    fewshot_pool: tuple[Item, ...]
    fingerprint: str

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def version(self) -> int | str:
        return self.config.version

    def items(self, split: str) -> tuple[Item, ...]:
        """The items of 'search' or 'heldout', in drawing order."""
        if split not in self.splits:
            raise TaskError(f"{self.path}: unknown split {split!r} (allowed: {', '.join(SPLITS)})")
        return self.splits[split]


def parse_task(raw: object, where: str) -> TaskConfig:
    """Validate parsed YAML as a task config; every problem is reported as 'where: key: message'."""
    if not isinstance(raw, dict):
        raise TaskError(f"{where}: (top level): a task must be a mapping of keys, got {type(raw).__name__}")
    try:
        config = TaskConfig.model_validate(raw)
    except ValidationError as e:
        raise explain(e, TaskConfig, where) from None
    _check_combination(config, where)
    return config


def load_task(path: str | Path) -> Task:
    """Read a task YAML file and its data; check splits, template fields and every item."""
    path = Path(path)
    where = str(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise TaskError(f"{where}: cannot read the task file: {e}") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise TaskError(f"{where}: (top level): not valid YAML{at}: {getattr(e, 'problem', e)}") from e
    config = parse_task(raw, where)
    rows = _data.load_rows(config.data, path.parent, where)

    picks = {}
    for key in SPLITS:
        spec = getattr(config.splits, key)
        idx = _data.select(spec, rows, f"splits.{key}", where, config.seed, config.shuffle)
        picks[f"splits.{key}"] = (spec.split, idx)
    (key_a, pick_a), (key_b, pick_b) = picks.items()
    _data.check_disjoint((key_a, *pick_a), (key_b, *pick_b), where)

    fewshot = config.prompt.fewshot if config.prompt else None
    if fewshot is not None:
        spec = fewshot.split
        used = {i for split, idx in picks.values() if split == spec.split for i in idx}
        drawn = _data.select(spec, rows, "prompt.fewshot.split", where, config.seed, config.shuffle)
        picks["prompt.fewshot"] = (spec.split, [i for i in drawn if i not in used])

    _check_columns(config, rows, {split for split, _ in picks.values()}, where)
    items = {
        key: _data.make_items(rows, split, idx, config.data.id_field, where)
        for key, (split, idx) in picks.items()
    }
    _data.check_unique_ids({f"splits.{k}": items[f"splits.{k}"] for k in SPLITS}, where)

    pool = items.pop("prompt.fewshot", ())
    if fewshot is not None:
        evaluated = {item.id for key in SPLITS for item in items[f"splits.{key}"]}
        pool = tuple(item for item in pool if item.id not in evaluated)
        if len(pool) < fewshot.k:
            raise TaskError(
                f"{where}: prompt.fewshot: needs k={fewshot.k} examples, but only {len(pool)} items of split "
                f"{fewshot.split.split!r} are left once search and heldout items are removed"
            )
    for group in (*items.values(), pool):
        for item in group:
            _prompts.check_item(config, item, where)

    splits = {key: items[f"splits.{key}"] for key in SPLITS}
    return Task(config, path, splits, pool, _fingerprint(config, splits, pool))


def _check_combination(config: TaskConfig, where: str) -> None:
    """Rules that span several keys, reported under the key to change."""
    scorer = config.scorer
    if scorer.type != "loglikelihood" and config.prompt is None:
        raise TaskError(f"{where}: prompt: required for scorer type {scorer.type!r}")
    if scorer.type == "loglikelihood" and config.prompt is not None:
        if scorer.context is not None:
            raise TaskError(
                f"{where}: scorer.context: give either prompt.template or scorer.context, not both"
            )
        if config.prompt.fewshot is not None:
            raise TaskError(f"{where}: prompt.fewshot: not supported for scorer type 'loglikelihood'")


def _check_columns(config: TaskConfig, rows: dict, splits: set[str], where: str) -> None:
    for split in sorted(splits):
        columns = rows[split].column_names
        for key, name in _prompts.field_names(config):
            if name not in columns:
                raise TaskError(
                    f"{where}: {key}: field {name!r} is not in split {split!r} of the data "
                    f"(available fields: {', '.join(columns)})"
                )


def _fingerprint(config: TaskConfig, splits: dict[str, tuple[Item, ...]], pool: tuple[Item, ...]) -> str:
    def dump(items):
        return [[item.id, dict(item.fields)] for item in items]

    payload = {
        "config": config.model_dump(mode="json", exclude={"description", "data"}),
        "id_field": config.data.id_field,
        "items": {key: dump(items) for key, items in splits.items()},
        "fewshot_pool": dump(pool),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


__all__ = [
    "DataSpec",
    "FewShot",
    "GenerateScorer",
    "Item",
    "LoglikelihoodScorer",
    "MultipleChoiceScorer",
    "Prompt",
    "SliceSpec",
    "Splits",
    "Task",
    "TaskConfig",
    "load_task",
    "parse_task",
]
