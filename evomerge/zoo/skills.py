"""The zoo's synthetic skills: item generators, the fitness task files that evaluate them, and training
streams that never contain an evaluated item.

Three skills that a tiny char-level model learns in minutes on a CPU and that share tokens, so their
task vectors interfere when merged. Each has an easy slice that the base is pretrained on (PRETRAIN: it
knows the formats and the basic circuits) and a hard slice that an expert learns and that is scored:

- ``add``: ``"47+5="`` -> ``"52"``; the base knows sums without a carry, the expert learns the carry
  (an algorithm, graded numerically);
- ``reverse``: ``"rev kqzt="`` -> ``"tzqk"``; the base reverses 2..3 letters, the expert 4..5 (an
  algorithm: length generalization, exact match);
- ``lexicon``: ``"tr zork blip="`` -> ``"red owl"``: 64 invented words mapped to English words by a
  fixed random table; the base knows half of them, the expert memorizes the other half (memorization,
  exact match). Scored pairs never occur in training, but every word does.

The evaluated items (search and heldout splits) come from ``DATA_SEED``, a constant, not from the zoo's
build seed: every zoo is scored on the same items, and ``fitness/zoo/`` (written by ``python -m
evomerge.zoo.skills fitness/zoo``) is valid for any zoo. Training streams skip every prompt in those
files, so no evaluated item is ever trained on.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DATA_SEED = 0
SEARCH_SIZE = 50
HELDOUT_SIZE = 50
TASK_VERSION = 1

Fields = dict[str, Any]


@dataclass(frozen=True)
class Skill:
    """One skill: how to draw a random item, its prompt template and how a reply is graded.

    ``sample`` returns an item's fields, always with ``answer``; the prompt is ``template`` filled with
    those fields and the expected reply is ``str(answer)`` (no delimiter: the model answers right after
    the ``=``).
    """

    name: str
    description: str
    template: str
    sample: Callable[[random.Random], Fields]
    match: str  # "numeric" or "exact"
    max_new_tokens: int

    def prompt(self, fields: Fields) -> str:
        return self.template.format_map(fields)

    def example(self, fields: Fields) -> tuple[str, str]:
        """(prompt, answer) text of one item."""
        return self.prompt(fields), str(fields["answer"])


def _letters(rng: random.Random, low: int, high: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(low, high)))


def _add_carry(rng: random.Random) -> Fields:
    """A two-digit number plus a digit whose units carry into the tens (45% of all such sums)."""
    while True:
        a, b = rng.randrange(100), rng.randrange(1, 10)
        if a % 10 + b >= 10:
            return {"a": a, "b": b, "answer": a + b}


def _add_no_carry(rng: random.Random) -> Fields:
    while True:
        a, b = rng.randrange(100), rng.randrange(10)
        if a % 10 + b < 10:
            return {"a": a, "b": b, "answer": a + b}


def _reverse_long(rng: random.Random) -> Fields:
    word = _letters(rng, 4, 5)
    return {"word": word, "answer": word[::-1]}


def _reverse_short(rng: random.Random) -> Fields:
    word = _letters(rng, 2, 3)
    return {"word": word, "answer": word[::-1]}


_ONSETS = ["b", "bl", "d", "dr", "f", "g", "gl", "k", "kr", "m", "n", "p", "pr", "s", "t", "v", "z", "zw"]
_VOWELS = ["a", "e", "i", "o", "u"]
_CODAS = ["b", "ck", "g", "k", "m", "n", "p", "rk", "sh", "t", "x", "z"]
MEANINGS = [
    "red", "blue", "green", "gold", "pink", "gray", "black", "white",
    "cat", "dog", "owl", "fox", "bee", "cow", "pig", "hen",
    "sun", "moon", "star", "tree", "rock", "rain", "snow", "wind",
    "milk", "salt", "rice", "corn", "soup", "cake", "egg", "tea",
    "ship", "door", "lamp", "bell", "boat", "car", "bus", "road",
    "hat", "shoe", "coat", "ring", "key", "cup", "pen", "book",
    "hill", "lake", "sea", "sand", "fire", "ice", "leaf", "rose",
    "king", "queen", "girl", "boy", "baby", "wolf", "bear", "fish",
]  # fmt: skip


def _lexicon_table(seed: int = DATA_SEED) -> dict[str, str]:
    """64 distinct invented one-syllable words (none of them in MEANINGS) -> MEANINGS, shuffled."""
    rng = random.Random(f"{seed}:lexicon")
    words: list[str] = []
    while len(words) < len(MEANINGS):
        word = rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
        if word not in words and word not in MEANINGS:
            words.append(word)
    meanings = list(MEANINGS)
    rng.shuffle(meanings)
    return dict(zip(words, meanings, strict=True))


LEXICON = _lexicon_table()
_KNOWN_WORDS = sorted(LEXICON)[::2]  # the base's half of the lexicon
_NEW_WORDS = sorted(LEXICON)[1::2]  # the expert's half


def _translate(words: list[str]) -> Fields:
    return {"words": " ".join(words), "answer": " ".join(LEXICON[w] for w in words)}


def _lexicon_new(rng: random.Random) -> Fields:
    return _translate(rng.sample(_NEW_WORDS, 2))


def _lexicon_known(rng: random.Random) -> Fields:
    return _translate(rng.sample(_KNOWN_WORDS, 2))


ADD_TEMPLATE, REVERSE_TEMPLATE, LEXICON_TEMPLATE = "{a:02d}+{b}=", "rev {word}=", "tr {words}="

SKILLS: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill(
            "add", "A two-digit number plus a digit, with a carry.", ADD_TEMPLATE, _add_carry, "numeric", 5
        ),
        Skill("reverse", "Reverse 4..5 lowercase letters.", REVERSE_TEMPLATE, _reverse_long, "exact", 8),
        Skill(
            "lexicon",
            "Translate two invented words (a memorized table).",
            LEXICON_TEMPLATE,
            _lexicon_new,
            "exact",
            12,
        ),
    )
}

# The base's corpus: each skill's prompt format on its easy slice (no carry, short words, the other
# half of the lexicon), so the base knows every format and the basic circuits but none of the items the
# skills are scored on. Never evaluated.
PRETRAIN: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill("add-no-carry", "Sums without a carry.", ADD_TEMPLATE, _add_no_carry, "numeric", 5),
        Skill("reverse-short", "Reverse 2..3 letters.", REVERSE_TEMPLATE, _reverse_short, "exact", 8),
        Skill(
            "lexicon-known", "The base's half of the lexicon.", LEXICON_TEMPLATE, _lexicon_known, "exact", 12
        ),
    )
}


def eval_rows(skill: Skill, seed: int = DATA_SEED) -> list[Fields]:
    """The evaluated items of a skill: SEARCH_SIZE search items, then HELDOUT_SIZE heldout items,
    all with distinct prompts, each with an ``id``."""
    rng = random.Random(f"{seed}:eval:{skill.name}")
    rows: list[Fields] = []
    seen: set[str] = set()
    while len(rows) < SEARCH_SIZE + HELDOUT_SIZE:
        fields = skill.sample(rng)
        prompt = skill.prompt(fields)
        if prompt not in seen:
            seen.add(prompt)
            rows.append({"id": f"{skill.name}-{len(rows):03d}", **fields})
    return rows


def task_config(skill: Skill) -> dict[str, Any]:
    """The task YAML content for a skill (the project's fitness task format, see fitness/README.md)."""
    scorer: dict[str, Any] = {
        "type": "generate",
        "target": "answer",
        "max_new_tokens": skill.max_new_tokens,
        "stop": ["\n"],
        "extract": "last_number" if skill.match == "numeric" else "full",
        "normalize": ["strip"],
        "match": skill.match,
    }
    return {
        "name": f"zoo_{skill.name}",
        "version": TASK_VERSION,
        "description": skill.description,
        "data": {"file": f"data/{skill.name}.jsonl", "id_field": "id"},
        "shuffle": False,
        "splits": {
            "search": {"split": "train", "start": 0, "size": SEARCH_SIZE},
            "heldout": {"split": "train", "start": SEARCH_SIZE, "size": HELDOUT_SIZE},
        },
        "prompt": {"template": skill.template, "target_delimiter": ""},
        "scorer": scorer,
    }


def task_yaml(skill: Skill) -> str:
    """``task_config(skill)`` as YAML text, laid out for reading (a test checks that it parses back)."""
    c = task_config(skill)
    q = json.dumps  # a JSON string is a valid double-quoted YAML string
    search, heldout = c["splits"]["search"], c["splits"]["heldout"]
    s = c["scorer"]
    lines = [
        f"# Zoo skill {skill.name!r}: written by `python -m evomerge.zoo.skills` (do not edit). The zoo",
        "# trains on neither split: its training streams skip every prompt in the data file.",
        f"name: {c['name']}",
        f"version: {c['version']}",
        f"description: {q(c['description'])}",
        f"data: {{file: {c['data']['file']}, id_field: {c['data']['id_field']}}}",
        f"shuffle: {str(c['shuffle']).lower()}",
        "splits:",
        f"  search: {{split: {search['split']}, start: {search['start']}, size: {search['size']}}}",
        f"  heldout: {{split: {heldout['split']}, start: {heldout['start']}, size: {heldout['size']}}}",
        "prompt:",
        f"  template: {q(c['prompt']['template'])}",
        f"  target_delimiter: {q(c['prompt']['target_delimiter'])}",
        "scorer:",
        f"  type: {s['type']}",
        f"  target: {s['target']}",
        f"  max_new_tokens: {s['max_new_tokens']}",
        f"  stop: [{', '.join(map(q, s['stop']))}]",
        f"  extract: {s['extract']}",
        f"  normalize: [{', '.join(s['normalize'])}]",
        f"  match: {s['match']}",
    ]
    return "\n".join(lines) + "\n"


def task_files(seed: int = DATA_SEED) -> dict[str, bytes]:
    """Every task file's bytes by path relative to the task folder: ``<skill>.yaml`` and
    ``data/<skill>.jsonl``. Same seed, same bytes."""
    files: dict[str, bytes] = {}
    for skill in SKILLS.values():
        files[f"{skill.name}.yaml"] = task_yaml(skill).encode()
        rows = eval_rows(skill, seed)
        files[f"data/{skill.name}.jsonl"] = "".join(json.dumps(row) + "\n" for row in rows).encode()
    return files


def write_task_files(out_dir: str | Path, seed: int = DATA_SEED) -> dict[str, Path]:
    """Write the task files under ``out_dir``; returns the YAML path of each skill."""
    out_dir = Path(out_dir)
    for rel, content in task_files(seed).items():
        path = out_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_bytes() != content:
            path.write_bytes(content)
    return {name: out_dir / f"{name}.yaml" for name in SKILLS}


def evaluated_prompts(seed: int = DATA_SEED) -> set[str]:
    """Every prompt of every skill's task files: what training must never show."""
    return {skill.prompt(row) for skill in SKILLS.values() for row in eval_rows(skill, seed)}


def training_stream(
    mixture: Mapping[str, float], seed: int, stage: str, *, exclude: set[str] | None = None
) -> Iterator[tuple[str, str]]:
    """Endless (prompt, answer) pairs; each draws its task from ``mixture`` (names in SKILLS or PRETRAIN
    -> weight), skipping every prompt in ``exclude`` (default: all evaluated prompts). The order depends
    only on (seed, stage, mixture)."""
    tasks = {**SKILLS, **PRETRAIN}
    unknown = [name for name in mixture if name not in tasks]
    if unknown or not mixture or min(mixture.values()) <= 0:
        raise ValueError(
            f"mixture {dict(mixture)}: give positive weights for tasks among {', '.join(tasks)}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else "")
        )
    exclude = evaluated_prompts() if exclude is None else exclude
    names = list(mixture)
    chosen = [tasks[name] for name in names]
    weights = [float(mixture[name]) for name in names]
    tag = ",".join(f"{name}={w!r}" for name, w in zip(names, weights, strict=True))
    rng = random.Random(f"{seed}:train:{stage}:{tag}")
    while True:
        task = rng.choices(chosen, weights)[0]
        prompt, answer = task.example(task.sample(rng))
        if prompt not in exclude:
            yield prompt, answer


def main(argv: Sequence[str] | None = None) -> int:
    """Write the zoo's task files (``python -m evomerge.zoo.skills fitness/zoo``)."""
    parser = argparse.ArgumentParser(prog="python -m evomerge.zoo.skills", description=main.__doc__)
    parser.add_argument("out_dir", nargs="?", default="fitness/zoo", help="task folder (default fitness/zoo)")
    args = parser.parse_args(argv)
    for name, path in write_task_files(args.out_dir).items():
        log.info("wrote %s task %s", name, path)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main())
