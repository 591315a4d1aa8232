"""What the model sees for one item (template, few-shot examples, chat template) and what counts as its
answer (target text, options, gold option, reference text).

Templates use ``str.format`` syntax over the item's fields: ``{question}``, ``{choices[0]}``, ``{{`` for
a literal brace. Positional placeholders (``{}``, ``{0}``) are rejected.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from evomerge.errors import TaskError
from evomerge.fitness.data import Item

if TYPE_CHECKING:
    from evomerge.fitness.task import TaskConfig

ApplyChat = Callable[[str], str]


def placeholders(template: str) -> list[str]:
    """The item fields a template reads (the name before any '.attr' or '[index]'), in order, unique.

    Raises ValueError for a malformed template or a positional placeholder.
    """
    names: list[str] = []
    for _, field, _, _ in string.Formatter().parse(template):
        if field is None:
            continue
        root = re.split(r"[.\[]", field, maxsplit=1)[0]
        if not root or root.isdigit():
            raise ValueError(f"placeholder {{{field}}} is positional; name an item field, e.g. {{question}}")
        if root not in names:
            names.append(root)
    return names


def render(template: str, item: Item, where: str, key: str) -> str:
    """The template filled with the item's fields; a TaskError names the item and its fields if one is missing."""
    try:
        return template.format_map(item.fields)
    except (KeyError, IndexError, AttributeError, ValueError, TypeError) as e:
        available = ", ".join(sorted(item.fields))
        raise TaskError(
            f"{where}: {key}: cannot fill the template for item {item.id!r}: {type(e).__name__} {e} "
            f"(the item's fields: {available})"
        ) from e


def field(item: Item, name: str, where: str, key: str) -> Any:
    """An item's field, or a TaskError naming the key that asked for it and the fields there are."""
    if name not in item.fields:
        available = ", ".join(sorted(item.fields))
        raise TaskError(f"{where}: {key}: item {item.id!r} has no field {name!r} (its fields: {available})")
    return item.fields[name]


def target_text(config: TaskConfig, item: Item, where: str) -> str:
    """The reference answer of a generate task, as text."""
    value = field(item, config.scorer.target, where, "scorer.target")
    if value is None or isinstance(value, list | dict):
        raise TaskError(f"{where}: scorer.target: item {item.id!r} has {value!r}; expected a text or number")
    return str(value)


def choice_texts(config: TaskConfig, item: Item, where: str) -> list[str]:
    """The options of a multiple-choice item: its choices field, or the task's fixed list."""
    choices = config.scorer.choices
    if not isinstance(choices, str):
        return list(choices)
    value = field(item, choices, where, "scorer.choices")
    if not isinstance(value, list) or len(value) < 2 or not all(isinstance(c, str) and c for c in value):
        raise TaskError(
            f"{where}: scorer.choices: item {item.id!r} has {value!r}; expected a list of at least two "
            "non-empty strings"
        )
    return value


def gold_index(config: TaskConfig, item: Item, choices: Sequence[str], where: str) -> int:
    """Index of the right option: the gold field holds an index (int) or the option's text (str)."""
    value = field(item, config.scorer.gold, where, "scorer.gold")
    if isinstance(value, int) and not isinstance(value, bool):
        if 0 <= value < len(choices):
            return value
        raise TaskError(
            f"{where}: scorer.gold: item {item.id!r} has index {value}, but there are {len(choices)} options"
        )
    if isinstance(value, str):
        if value in choices:
            return list(choices).index(value)
        raise TaskError(
            f"{where}: scorer.gold: item {item.id!r} has {value!r}, which is not one of {list(choices)}"
        )
    raise TaskError(f"{where}: scorer.gold: item {item.id!r} has {value!r}; expected an option index or text")


def reference_text(config: TaskConfig, item: Item, where: str) -> str:
    """The text a loglikelihood task scores."""
    value = field(item, config.scorer.reference, where, "scorer.reference")
    if not isinstance(value, str) or not value:
        raise TaskError(f"{where}: scorer.reference: item {item.id!r} has {value!r}; expected non-empty text")
    return value


def answer_text(config: TaskConfig, item: Item, where: str) -> str:
    """What follows the prompt in a few-shot example: the target (generate) or the gold option (multiple choice)."""
    if config.scorer.type == "generate":
        return target_text(config, item, where)
    if config.scorer.type == "multiple_choice":
        choices = choice_texts(config, item, where)
        return choices[gold_index(config, item, choices, where)]
    raise TaskError(f"{where}: prompt.fewshot: not supported for scorer type {config.scorer.type!r}")


def draw_shots(config: TaskConfig, item: Item, pool: Sequence[Item]) -> list[Item]:
    """The few-shot examples for ``item``: one draw for the whole task ('fixed', which lets an engine
    reuse the shared prefix) or one per item seeded by its id ('per_item'). Both depend only on the
    task seed, never on item order."""
    shots = config.prompt.fewshot
    tag = "fixed" if shots.sampling == "fixed" else f"item:{item.id}"
    return random.Random(f"{config.seed}:fewshot:{tag}").sample(list(pool), shots.k)


def build_context(
    config: TaskConfig, item: Item, pool: Sequence[Item], where: str, apply_chat: ApplyChat | None
) -> str:
    """The full prompt for one item: few-shot examples, then the item's rendered template, then the chat
    template when the task asks for it (``apply_chat`` is required then, ignored otherwise)."""
    prompt = config.prompt
    if prompt is None:  # loglikelihood without a template: the context field, or nothing
        name = getattr(config.scorer, "context", None)
        return "" if name is None else str(field(item, name, where, "scorer.context"))
    text = render(prompt.template, item, where, "prompt.template")
    if prompt.fewshot is not None:
        parts = [
            render(prompt.template, shot, where, "prompt.template")
            + prompt.target_delimiter
            + answer_text(config, shot, where)
            for shot in draw_shots(config, item, pool)
        ]
        text = prompt.fewshot.separator.join([*parts, text])
    if prompt.chat_template:
        if apply_chat is None:
            raise TaskError(
                f"{where}: prompt.chat_template: the task asks for the model's chat template, but no "
                "apply_chat function was given (pass the tokenizer's chat formatting)"
            )
        text = apply_chat(text)
    return text


def check_item(config: TaskConfig, item: Item, where: str) -> None:
    """Raise the TaskError that scoring this item would raise, before any model time is spent."""
    if config.prompt is not None:
        render(config.prompt.template, item, where, "prompt.template")
    kind = config.scorer.type
    if kind == "generate":
        target_text(config, item, where)
    elif kind == "multiple_choice":
        gold_index(config, item, choice_texts(config, item, where), where)
    else:
        reference_text(config, item, where)
        build_context(config, item, (), where, apply_chat=lambda s: s)


def field_names(config: TaskConfig) -> list[tuple[str, str]]:
    """(key, field) for every item field the task reads, so missing columns are reported at load time."""
    wanted: list[tuple[str, str]] = []
    if config.prompt is not None:
        wanted += [("prompt.template", name) for name in placeholders(config.prompt.template)]
    scorer = config.scorer
    for key in ("target", "gold", "reference", "context", "choices"):
        value = getattr(scorer, key, None)
        if isinstance(value, str):
            wanted.append((f"scorer.{key}", value))
    if config.data.id_field is not None:
        wanted.append(("data.id_field", config.data.id_field))
    return wanted
