"""A small demonstrations set from GSM8K train, for the RARO track (verifier-free training).

    python -m evoforge.tasks.sets.demonstrations --out data/sets/gsm8k_demonstrations

writes train.jsonl with `question`, `answer` (the expert's worked solution, in the policy's format:
no calculator annotations, final answer as \\boxed{}) and `reference` (GSM8K's final number). Ingest
it with `--preset demonstrations --reference-field reference`: the critic judges against `answer`,
and `reference` lets the same problems be graded by the verifier, so the two tracks can be compared.
Picks the problems with the shortest worked solutions (two or three steps), the only GSM8K problems
a 135M policy ever solves; the same command rewrites the same bytes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from evoforge.data import atomic
from evoforge.data.home import SHIPPED_SETS
from evoforge.tasks.grading.answers import normalize_answer
from evoforge.tasks.ingest import gsm8k_worked_solution

GSM8K_TRAIN = SHIPPED_SETS / "gsm8k" / "train.jsonl"


def build(rows: int = 200, source: Path = GSM8K_TRAIN) -> list[dict]:
    problems = []
    for number, line in enumerate(source.read_text().splitlines(), start=1):
        value = json.loads(line)
        solution = value["answer"]
        steps = solution.rsplit("####", 1)[0].strip().count("\n") + 1
        problems.append((steps, len(value["question"]), number, value["question"], solution))
    problems.sort()
    return [{"question": q, "answer": gsm8k_worked_solution(s), "reference": normalize_answer(s.rsplit("####", 1)[1]),
             "gsm8k_train_line": number}
            for _, _, number, q, s in problems[:rows]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(SHIPPED_SETS / "gsm8k_demonstrations"))
    parser.add_argument("--rows", type=int, default=200)
    args = parser.parse_args()
    out = Path(args.out)
    atomic.write_text(out / "train.jsonl", "".join(json.dumps(row) + "\n" for row in build(args.rows)))
    print(f"wrote {args.rows} demonstrations to {out / 'train.jsonl'}")


if __name__ == "__main__":
    main()
