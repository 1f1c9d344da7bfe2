"""Prompts, in one place: what the policy is asked, in each of its roles (solver, problem writer,
step-by-step searcher, critic). Answers are asked for as `\\boxed{...}`; reading them is grading's
job (tasks/grading/answers.py)."""
from __future__ import annotations

import re

from evoforge.models.engine import Messages

SYSTEM = (
    "You are a careful math tutor. Solve the problem step by step in a few short sentences, "
    "then write the final answer as \\boxed{ANSWER} and stop."
)

# Worked examples in the chat, written for this project (not taken from any evaluation set):
# with them SmolLM2-135M boxes ~78% of its answers instead of ~17% (NOTES.md).
FEW_SHOT: list[tuple[str, str]] = [
    (
        "Maria has 7 pencils. She buys 5 more pencils. How many pencils does Maria have now?",
        "Maria starts with 7 pencils and buys 5 more, so she has 7 + 5 = 12 pencils.\n\\boxed{12}",
    ),
    (
        "A box holds 6 eggs. How many eggs are in 4 boxes?",
        "Each box holds 6 eggs, so 4 boxes hold 4 * 6 = 24 eggs.\n\\boxed{24}",
    ),
    (
        "Sam had 30 dollars. He spent 12 dollars on a book and then earned 5 dollars. How many dollars does Sam have?",
        "After the book Sam has 30 - 12 = 18 dollars. After earning 5 he has 18 + 5 = 23 dollars.\n\\boxed{23}",
    ),
]


def solve_messages(question: str, few_shot: bool = True) -> Messages:
    messages: Messages = [{"role": "system", "content": SYSTEM}]
    if few_shot:
        for q, a in FEW_SHOT:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": question})
    return messages


# -- SvS: variational problem synthesis -----------------------------------------------------------
SYNTHESIS_SYSTEM = (
    "You write math word problems. You are given a problem and a correct solution. Write ONE new problem "
    "that the same reasoning and the same final answer would solve, with different wording, names and "
    "structure. Do not state the answer or the solution in the new problem. Put the new problem, and "
    "nothing else, between ```problem and ```."
)


# one worked example, written for this project: small models follow the ```problem format far
# more often with it than from the instruction alone
SYNTHESIS_EXAMPLE = (
    "Tom has 4 boxes with 6 cards in each. How many cards does Tom have?",
    "Tom has 4 boxes of 6 cards, so 4 * 6 = 24 cards.\n\\boxed{24}",
    "```problem\nA baker fills 3 trays with 8 rolls each. How many rolls are on the trays?\n```",
)


def _synthesis_request(question: str, solution: str) -> str:
    return f"Problem:\n{question}\n\nCorrect solution:\n{solution}\n\nNew problem:"


def synthesis_messages(question: str, solution: str) -> Messages:
    example_q, example_s, example_out = SYNTHESIS_EXAMPLE
    return [
        {"role": "system", "content": SYNTHESIS_SYSTEM},
        {"role": "user", "content": _synthesis_request(example_q, example_s)},
        {"role": "assistant", "content": example_out},
        {"role": "user", "content": _synthesis_request(question, solution)},
    ]


_FENCED = re.compile(r"```[ \t]*(problem)?[ \t]*\n(.*?)(?:```|$)", re.S | re.I)
_LABELLED = re.compile(r"(?:^|\n)\s*(?:\*\*)?(?:new problem|problem)(?:\*\*)?\s*:\s*(.+?)(?:\n\s*\n|\n\s*(?:solution|answer)\b|$)",
                       re.S | re.I)


def extract_problem(output: str) -> str | None:
    """The variant problem in a synthesis output: a ```problem block first, then any fenced block
    (an unclosed one runs to the end), then a 'New problem:' / 'Problem:' paragraph."""
    blocks = [(label, body.strip()) for label, body in _FENCED.findall(output or "")]
    for wanted in (True, False):
        for label, body in blocks:
            if bool(label) == wanted and body:
                return body
    match = _LABELLED.search(output or "")
    if match and match.group(1).strip():
        return match.group(1).strip()
    return None


# -- code-augmented steps (rStar-Math): each step is Python whose comments carry the reasoning ----------
STEP_END = "<end_of_step>"
ANSWER_END = "<end_of_answer>"
STEP_SYSTEM = (
    "You solve math problems with Python, one short step at a time. A step is a comment saying what it "
    f"does, then a few lines of code that print what they compute, then the line {STEP_END}. After each "
    "step you see its printed output between <output> and </output>; variables of earlier steps are still "
    "defined. When you know the answer, write the final step as a sentence ending with \\boxed{ANSWER} and "
    f"then {ANSWER_END}."
)
STEP_EXAMPLE = (
    "Tom has 3 boxes with 4 pens in each and gives away 5 pens. How many pens does he have left?",
    "# Tom has 3 boxes of 4 pens: count the pens\npens = 3 * 4\nprint(pens)\n" + STEP_END + "\n<output>12</output>\n"
    "# He gives away 5 pens\nleft = pens - 5\nprint(left)\n" + STEP_END + "\n<output>7</output>\n"
    "Tom has 7 pens left. The answer is \\boxed{7} " + ANSWER_END,
)


def step_messages(question: str) -> Messages:
    q, a = STEP_EXAMPLE
    return [{"role": "system", "content": STEP_SYSTEM}, {"role": "user", "content": q},
            {"role": "assistant", "content": a}, {"role": "user", "content": question}]


def step_prefix(steps: list[tuple[str, str]]) -> str:
    """The reply so far for (step text, printed output) pairs, in the format of STEP_EXAMPLE."""
    return "".join(f"{text.strip()}\n{STEP_END}\n<output>{output.strip()}</output>\n" for text, output in steps)


# -- RARO: the relativistic critic, played by the policy model under its own system prompt -----------
CRITIC_SYSTEM = (
    "You judge answers to math problems. You see a question and two answers, Answer 1 and Answer 2. "
    "Check the reasoning and the final result of each in a few short sentences, then end with one line: "
    "'Verdict: Answer 1', 'Verdict: Answer 2' or 'Verdict: Tie'."
)

# two worked judgments, written for this project, one for each position: with a single example a
# small critic learns to repeat its label instead of reading the answers
CRITIC_EXAMPLES = [
    ("A pack has 5 pens. How many pens are in 3 packs?",
     "There are 3 packs of 5 pens, so 3 * 5 = 15 pens.\nThe answer is \\boxed{15}.",
     "3 + 5 = 8 pens.\nThe answer is \\boxed{8}.",
     "Answer 1 multiplies the packs by the pens in each pack, which is right. Answer 2 adds them, which is "
     "wrong.\nVerdict: Answer 1"),
    ("Lea had 20 dollars and spent 8 dollars. How many dollars does she have left?",
     "She spent 8 dollars, so she has 20 + 8 = 28 dollars.\nThe answer is \\boxed{28}.",
     "She has 20 - 8 = 12 dollars left.\nThe answer is \\boxed{12}.",
     "Answer 1 adds the money she spent, which is wrong. Answer 2 subtracts it, which is right.\nVerdict: Answer 2"),
]


def _critic_request(question: str, answer_1: str, answer_2: str) -> str:
    return f"Question:\n{question}\n\nAnswer 1:\n{answer_1}\n\nAnswer 2:\n{answer_2}\n\nWhich answer is better?"


def critic_messages(question: str, answer_1: str, answer_2: str) -> Messages:
    messages: Messages = [{"role": "system", "content": CRITIC_SYSTEM}]
    for q, a1, a2, judgment in CRITIC_EXAMPLES:
        messages += [{"role": "user", "content": _critic_request(q, a1, a2)}, {"role": "assistant", "content": judgment}]
    messages.append({"role": "user", "content": _critic_request(question, answer_1, answer_2)})
    return messages
