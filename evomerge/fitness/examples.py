"""The example tasks' data files in fitness/data/ (deterministic: same output every run).

    python -m evomerge.fitness.examples [DIR]      # DIR defaults to fitness/data of this checkout
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parents[2] / "fitness" / "data"

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Netherlands", "Amsterdam"), ("Belgium", "Brussels"), ("Austria", "Vienna"),
    ("Poland", "Warsaw"), ("Sweden", "Stockholm"), ("Norway", "Oslo"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Ireland", "Dublin"), ("Greece", "Athens"), ("Hungary", "Budapest"),
    ("Czechia", "Prague"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Croatia", "Zagreb"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("South Korea", "Seoul"), ("India", "New Delhi"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"), ("Philippines", "Manila"),
    ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Nigeria", "Abuja"), ("Morocco", "Rabat"),
    ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Australia", "Canberra"), ("New Zealand", "Wellington"),
]

SUBJECTS = ["The cat", "A small dog", "The old farmer", "My neighbour", "The teacher", "A young bird",
            "The river", "Our train", "The baker", "A tall tree"]
VERBS = ["watched", "followed", "passed", "found", "liked", "carried", "painted", "visited"]
OBJECTS = ["the red barn", "a quiet lake", "the busy market", "an open window", "the long road",
           "a warm loaf of bread", "the green hill", "a wooden bridge"]
ENDINGS = ["in the morning.", "before the rain.", "after lunch.", "every summer.", "at dusk.", "once again."]


def write(name: str, rows: list[dict], directory: Path = HERE) -> None:
    with open(directory / name, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def arithmetic(rng: random.Random) -> list[dict]:
    rows = []
    for i in range(60):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        op = rng.choice("+-")
        rows.append({"id": f"arith-{i:03d}", "a": a, "op": op, "b": b, "answer": a + b if op == "+" else a - b})
    return rows


def capitals(rng: random.Random) -> list[dict]:
    cities = [c for _, c in CAPITALS]
    rows = []
    for i, (country, capital) in enumerate(CAPITALS):
        options = [capital, *rng.sample([c for c in cities if c != capital], 3)]
        rng.shuffle(options)
        rows.append({"id": f"cap-{i:03d}", "country": country, "choices": options, "label": options.index(capital)})
    return rows


def sentences(rng: random.Random) -> list[dict]:
    rows = []
    for i in range(40):
        text = " ".join([rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(ENDINGS)])
        rows.append({"id": f"text-{i:03d}", "text": text})
    return rows


def examples() -> dict[str, list[dict]]:
    """Every example data file's rows, by file name."""
    return {
        "arithmetic.jsonl": arithmetic(random.Random(1)),
        "capitals.jsonl": capitals(random.Random(2)),
        "sentences.jsonl": sentences(random.Random(3)),
    }


if __name__ == "__main__":
    import sys

    target = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
    for name, rows in examples().items():
        write(name, rows, target)
