"""Reproducible easy arithmetic word problems (one and two steps) that a 135M model sometimes solves.

    python -m evoforge.tasks.sets.arithmetic --out data/sets/easy_arithmetic

writes train.jsonl and test.jsonl (fields: question, answer, steps); the same seed gives the same
files byte for byte, and no training question shares an 8-word run with a test question.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from evoforge.data import atomic
from evoforge.data.home import SHIPPED_SETS
from evoforge.tasks.decontam import Decontaminator

NAMES = ["Ana", "Ben", "Carla", "Dev", "Emma", "Farid", "Grace", "Hugo", "Iris", "Jon", "Kemi", "Liam", "Mina", "Noah"]
THINGS = ["apples", "pencils", "stickers", "marbles", "books", "cookies", "stamps", "shells", "cards", "balloons"]
CONTAINERS = ["bags", "boxes", "baskets", "jars", "packs"]


def _one_step(rng: random.Random) -> tuple[str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    kind = rng.choice(["add", "sub", "mul", "div"])
    if kind == "add":
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        return f"{name} has {a} {thing}. {name} gets {b} more {thing}. How many {thing} does {name} have now?", a + b
    if kind == "sub":
        a = rng.randint(10, 60)
        b = rng.randint(1, a - 1)
        return f"{name} has {a} {thing} and gives away {b} of them. How many {thing} does {name} have left?", a - b
    box = rng.choice(CONTAINERS)
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    if kind == "mul":
        return f"There are {a} {box} with {b} {thing} in each. How many {thing} are there in all?", a * b
    return f"{name} shares {a * b} {thing} equally among {a} friends. How many {thing} does each friend get?", b


def _two_step(rng: random.Random) -> tuple[str, int]:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    kind = rng.choice(["add_sub", "mul_add", "sub_sub", "mul_sub"])
    if kind == "add_sub":
        a, b = rng.randint(5, 40), rng.randint(2, 30)
        c = rng.randint(1, a + b - 1)
        return (
            f"{name} has {a} {thing}, buys {b} more, and then gives {c} to a friend. "
            f"How many {thing} does {name} have now?",
            a + b - c,
        )
    if kind == "mul_add":
        box = rng.choice(CONTAINERS)
        a, b, c = rng.randint(2, 6), rng.randint(2, 10), rng.randint(1, 15)
        return (
            f"{name} has {a} {box} with {b} {thing} in each, and {c} loose {thing}. How many {thing} does {name} have?",
            a * b + c,
        )
    if kind == "sub_sub":
        a = rng.randint(20, 80)
        b = rng.randint(1, a // 2)
        c = rng.randint(1, a - b - 1)
        return (
            f"{name} had {a} {thing}. {name} lost {b} on Monday and {c} on Tuesday. How many {thing} are left?",
            a - b - c,
        )
    box = rng.choice(CONTAINERS)
    a, b = rng.randint(2, 6), rng.randint(3, 10)
    c = rng.randint(1, a * b - 1)
    return (
        f"{name} buys {a} {box} of {thing} with {b} in each and eats {c} of them. How many {thing} are left?",
        a * b - c,
    )


def generate(count: int, seed: int, held_out: list[str] = ()) -> list[dict]:
    """`held_out`: questions (the test split) that no generated question may share an 8-word run
    with, so that the decontamination of a training pool against the test split keeps every row."""
    rng = random.Random(seed)
    decontaminator = Decontaminator()
    decontaminator.add_set("held_out", [(str(i), q) for i, q in enumerate(held_out)])
    rows, seen = [], set()
    while len(rows) < count:
        steps = 1 if rng.random() < 0.5 else 2
        question, answer = _one_step(rng) if steps == 1 else _two_step(rng)
        if question in seen or decontaminator.match(question):
            continue
        seen.add(question)
        rows.append({"question": question, "answer": str(answer), "steps": steps})
    return rows


def write_splits(out: Path, train: int = 300, test: int = 100, seed: int = 2508) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    test_rows = generate(test, seed + 1)
    train_rows = generate(train, seed, held_out=[r["question"] for r in test_rows])
    paths = {}
    for split, rows in (("train", train_rows), ("test", test_rows)):
        path = out / f"{split}.jsonl"
        atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        paths[split] = path
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=SHIPPED_SETS / "easy_arithmetic")
    parser.add_argument("--train", type=int, default=300)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=2508)
    args = parser.parse_args()
    for split, path in write_splits(args.out, args.train, args.test, args.seed).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
