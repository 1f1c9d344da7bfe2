"""evoforge's grading against math-verify's own test cases, and the answer forms it reads beyond the
last box: one box per part of a multi-part answer, and numbers written in digit groups.

The cases (tests/data/math_verify_cases.jsonl) were extracted once, by hand, from math-verify's
`tests/` folder at commit 5d148cfaaf99214c2e4ffb4bc497ab042c592a7a of huggingface/Math-Verify
(2025-07-02): the literal `(gold, pred, expected)` rows of every `pytest.mark.parametrize` in
test_all.py, test_boxed.py, test_numina_cases.py, test_open_thoughts.py, test_yujianll.py and
test_strict.py, read with `ast.literal_eval` (no script is kept). Kept: the rows graded with verify's
defaults (precision 6, strict, no set-relation comparison) and compare_strings' default extraction
targets (latex + expr, which are evoforge's own), plus test_number_extraction's rows (expr targets;
their predictions are numbers, e.g. thousands separators). Left out: the rows with another precision,
strict=False or allow_set_relation_comp=True, and the latex-only tests (test_latex_notation,
test_latex_notation_math, test_relations_math, test_matrix_extraction, test_set_rel_assymetry), whose
expectations are about reading answers out of prose (`Answer $ 9 $`), which evoforge never does.
168 rows. Each row keeps the original `gold`, `pred`, `expected`, the file and test name and the row's
position in the test's list, and adds what evoforge is given:
- `answer`: the gold as a dataset stores it: one math span around the whole gold (`$...$`, `$$...$$`,
  `\\(...\\)`, `\\[...\\]`) removed;
- `response`: the prediction itself if it has a `\\boxed{}`; otherwise the prediction, its delimiters
  removed the same way, put inside `\\boxed{}`.

Agreement is the share of rows whose verdict (correct or not) is the expected one. evoforge: the
verify stage's own path (`grade_pairs`, the grader pool, `grade(answer, response)`). Plain math-verify
for comparison: `verify(parse(gold), parse(response))` with the same extraction targets, the gold in
its original form. Before the multi-box and digit-group changes of tasks/grading/answers.py evoforge agreed on
0.887 of these rows (149/168), plain math-verify on 0.982 (165/168).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from math_verify import parse, verify

from evoforge.tasks.grading.answers import _EXTRACTION
from evoforge.tasks.verify import VerifyConfig, grade_pairs

CASES = Path(__file__).parent / "data" / "math_verify_cases.jsonl"
REQUIRED_AGREEMENT = 0.97


def verdicts(pairs: list[tuple[str, str]]) -> list[str]:
    # a generous deadline: a slow test machine must not turn a verdict into a timeout
    return [r[0] for r in grade_pairs(pairs, VerifyConfig(workers=2, deadline_seconds=60))]


def plain_math_verify(gold: str, response: str) -> bool:
    return bool(verify(parse(gold, _EXTRACTION), parse(response, _EXTRACTION)))


@pytest.mark.slow
def test_agreement_with_math_verifys_own_cases_is_at_least_097():
    cases = [json.loads(line) for line in CASES.read_text().splitlines()]
    assert len(cases) == 168
    evoforge = verdicts([(c["answer"], c["response"]) for c in cases])
    evoforge_ok = [(v == "correct") == c["expected"] for v, c in zip(evoforge, cases)]
    plain_ok = [plain_math_verify(c["gold"], c["response"]) == c["expected"] for c in cases]
    evoforge_share, plain_share = sum(evoforge_ok) / len(cases), sum(plain_ok) / len(cases)
    missed = [f"{c['source']}::{c['test']}[{c['index']}] expected {c['expected']}, got {v}"
              for v, c, ok in zip(evoforge, cases, evoforge_ok) if not ok]
    report = (f"agreement over {len(cases)} math-verify cases: evoforge {evoforge_share:.3f} "
              f"({sum(evoforge_ok)}), plain math-verify {plain_share:.3f} ({sum(plain_ok)}); "
              f"evoforge missed: {missed}")
    print(report)
    assert evoforge_share >= REQUIRED_AGREEMENT, report


@pytest.mark.unit
def test_a_multi_part_answer_boxed_part_by_part_is_graded_as_a_whole():
    pairs = [
        ("\\{1,2,3\\}", "\\boxed{1}, \\boxed{2}, \\boxed{3}"),
        ("1, 2, 3", "so \\boxed{1} and \\boxed{2} and \\boxed{3}"),
        ("k = 45, n = 2", "$\\boxed{k = 45} \\quad \\text{and} \\quad \\boxed{n = 2}$"),
        ("(2, 2), (6, 2)", "\\boxed{(2, 2)} \\text{ and } \\boxed{(6, 2)}"),
        ("(3, 2, 7)", "p = \\boxed{3}, q = \\boxed{2}, r = \\boxed{7}"),
        ("1, 2, 3", "\\boxed{1}, \\boxed{2}, \\boxed{4}"),  # wrong: one part is wrong
        ("1, 2, 3", "\\boxed{1}, \\boxed{2}"),              # wrong: a part is missing
    ]
    assert verdicts(pairs) == ["correct"] * 5 + ["wrong"] * 2


@pytest.mark.unit
def test_intermediate_boxes_do_not_count_the_last_box_is_the_answer():
    pairs = [
        ("5", "first \\boxed{3}, finally \\boxed{5}"),            # correct
        ("3", "first \\boxed{3}, finally \\boxed{5}"),            # wrong: 3 was an intermediate result
        ("35", "\\boxed{3}\\boxed{5}"),                           # wrong: boxes are not concatenated
        ("1, 2", "\\boxed{7} was wrong; the roots are \\boxed{1, 2}"),  # correct: the last box has both
        ("1, 2", "\\boxed{1} \\boxed{7} \\boxed{2}"),             # wrong: the last two boxes are 7 and 2
    ]
    assert verdicts(pairs) == ["correct", "wrong", "wrong", "correct", "wrong"]


@pytest.mark.unit
def test_every_box_is_read_as_the_brace_walk_reads_it_flat_nested_open_or_spaced():
    import random

    from evoforge.tasks.grading.answers import all_boxes, last_boxes

    pieces = ["\\boxed{", "\\fbox {", "\\boxed  {", "{", "}", "}", " 42 ", "x", "\\frac{1}{2}", "\\boxed", " ", "\n"]
    rng = random.Random(7)
    texts = ["", "no box", "\\boxed{1} and \\boxed{ 2 }", "\\boxed{\\frac{1}{2}}", "\\boxed{3", "\\boxed{\\boxed{4}}"]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 14))) for _ in range(3000)]
    assert [all_boxes(t) for t in texts] == [tuple(last_boxes(t, len(t))) for t in texts]
    assert all_boxes("\\boxed{\\boxed{4}}") == ("4",) and all_boxes("\\boxed{1} \\fbox { 2 }") == ("1", "2")


@pytest.mark.unit
def test_a_column_of_texts_has_the_boxes_python_reads_in_each_whatever_its_spaces_and_braces():
    """`all_boxes_of_column` reads the common text (one flat box, or none) with Arrow's regex engine (RE2), whose
    `\\s` is ASCII only and whose trim is not `str.strip`: its whitespace is Python's 29 characters spelled out,
    and every text's boxes, counted, last and earlier, are `all_boxes`' for it."""
    import random
    import sys

    import pyarrow as pa

    from evoforge.tasks.grading.answer_columns import all_boxes_of_column
    from evoforge.tasks.grading.answers import WHITESPACE, all_boxes

    assert WHITESPACE == "".join(c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace())
    pieces = ["\\boxed{", "\\fbox {", "{", "}", "}", " 42 ", "x", "\\frac{1}{2}", "\\boxed", "\\", "é", "日本", ":",
              "\x00", "\n"] + [f"\\boxed{space}{{" for space in WHITESPACE] + list(WHITESPACE)
    rng = random.Random(5)
    texts = [None, "", "no box", "\\boxed{ 7 }", "\\boxed\u3000{\u2028 5\x85}", "\\boxed{\\boxed{4}}", "\\boxed{3",
             "\\boxed{1} \\fbox{2}", "\\boxed{}", "\\boxed{\n1\n2}"]
    texts += ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(20000)]
    column = all_boxes_of_column(pa.chunked_array([texts[:7000], texts[7000:]], pa.string()))
    assert [column.boxes(i) for i in range(len(texts))] == [all_boxes(text or "") for text in texts]
    assert list(column.count) == [len(all_boxes(text or "")) for text in texts]
    single = int((column.count == 1).sum())
    assert single > 1000 and len(column.earlier) > 50  # one box (Arrow's way) and several (Python's), many times


@pytest.mark.unit
def test_what_the_graders_preload_brings_no_arrow_into_their_limited_address_space():
    """A grader's `memory_mb` limits its address space; its forkserver preloads math-verify, sympy and the answers'
    rules (tasks/grading/preload.py). Arrow and NumPy (~300 MB of address space, the verify stage's column code in
    tasks/grading/answer_columns.py) must stay out of it."""
    import subprocess
    import sys

    from evoforge.data import home

    code = ("import sys, evoforge.tasks.grading.preload; "
            "print(sorted(name for name in ('pyarrow', 'numpy') if name in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=home.PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.unit
def test_thousands_separators_when_the_gold_is_one_number():
    pairs = [
        ("1000", "\\boxed{1 000}"),
        ("1000", "\\boxed{1,000}"),
        ("1000", "\\boxed{1\\,000}"),
        ("1000", "\\boxed{1{,}000}"),
        ("10000", "\\boxed{10,\\!000}"),
        ("-1234567", "\\boxed{-1 234 567}"),
        ("1000.99", "\\boxed{1\\,000.99}"),
        ("1000.99", "\\boxed{1000,99}"),  # a decimal comma
        ("1000", "\\boxed{1\\,00}"),      # wrong: a group after the first has three digits
        ("32349", "\\boxed{32, 349}"),    # wrong: a comma and a space separate list items
        ("1 000", "\\boxed{1000}"),       # a gold written with a gap is that number too
    ]
    assert verdicts(pairs) == ["correct"] * 8 + ["wrong"] * 2 + ["correct"]


@pytest.mark.unit
def test_a_gold_list_is_never_read_as_one_number():
    pairs = [
        ("1, 2", "\\boxed{12}"),              # wrong: {1, 2} is not 12
        ("1, 2", "\\boxed{1, 2}"),            # correct
        ("1, 2", "\\boxed{1}, \\boxed{2}"),   # correct
        ("12", "\\boxed{1}, \\boxed{2}"),     # wrong: a one-part gold takes the last box only
        ("1, 234", "\\boxed{1 234}"),         # wrong: a gap joins digits only for a one-number gold
    ]
    assert verdicts(pairs) == ["wrong", "correct", "correct", "wrong", "wrong"]


@pytest.mark.unit
def test_exact_numbers_are_graded_as_math_verify_grades_them_without_it():
    """The verify stage decides a gold and a box that are both whole numbers or fractions of two by their values
    (`exact_gold_verdict`), in its own process: each verdict must be math-verify's on the same pair, for numbers
    a factor of 10 or 100 apart (math-verify's percent leniency), one apart, equal in other forms, past 64 bits,
    and near each other (1/3 against 333333/1000000: math-verify rounds floats, never two rationals)."""
    import random

    from evoforge.tasks.grading.answers import _grade_answer, exact_gold_verdict, grade, parse_gold

    rng = random.Random(11)

    def written(top: int, bottom: int) -> str:
        if bottom == 1 and rng.random() < 0.5:
            return str(top)
        command = rng.choice(["frac", "dfrac", "tfrac"])
        return f"-\\{command}{{{-top}}}{{{bottom}}}" if top < 0 and rng.random() < 0.5 else f"\\{command}{{{top}}}{{{bottom}}}"

    values = [(1, 3), (333333, 1000000), (2, 3), (666667, 1000000), (0, 1), (5, 1), (50, 1), (500, 1),
              (99999999999999999999, 1), (10**20, 1)]
    for _ in range(60):
        top = rng.choice([rng.randint(-30, 30), rng.randint(0, 10**7), rng.randint(0, 10**22), -rng.randint(1, 10**4)])
        bottom, scale = rng.choice([1, 1, 2, 3, 7, 12, 10**6]), rng.choice([1, 2, 10])
        values += [(top, bottom), (top * scale, bottom * scale), (top * 10, bottom), (top * 100, bottom), (top + 1, bottom)]
    numbers = [written(*value) for value in values]
    pairs = [(gold, box) for gold in numbers[:40] for box in numbers[:40]]
    pairs += [(rng.choice(numbers), rng.choice(numbers)) for _ in range(800)]
    assert sum(exact_gold_verdict(gold, (box,))[0] == "correct" for gold, box in pairs) > 50  # equal values are there
    for gold, box in pairs:
        decided = exact_gold_verdict(gold, (box,))
        assert decided is not None, (gold, box)
        assert (decided[0] == "correct") == _grade_answer(parse_gold(gold), box), (gold, box)
        assert grade(gold, f"so \\boxed{{{box}}}") == decided
    # anything else is math-verify's: a sign, a leading zero, a decimal, digit groups, an expression, `\frac12`
    for gold, box in [("5", "+5"), ("5", "05"), ("5", "5.0"), ("0", "-0"), ("1000", "1,000"), ("4", "2+2"), ("5.0", "5"),
                      ("\\frac{1}{2}", "\\frac12"), ("\\frac{1}{2}", "0.5"), ("\\frac{1}{2}", "1/2")]:
        assert exact_gold_verdict(gold, (box,)) is None
        assert grade(gold, f"\\boxed{{{box}}}")[0] == "correct"
    assert exact_gold_verdict("\\frac{1}{0}", ("1",)) is None and exact_gold_verdict("2\\sqrt{3}", ()) is None
    # no answer to an exact gold needs no math-verify either: grade's own verdict, detail included
    for response, boxes in [("I am not sure.", ()), ("so \\boxed{ }", ("",)), ("\\boxed{4} then \\boxed{}", ("4", ""))]:
        decided = exact_gold_verdict("5", boxes)
        assert decided[0] == "no_answer" and decided == grade("5", response)
        assert grade("2\\sqrt{3}", response) == decided  # what the path through math-verify's gold parse gives
    assert exact_gold_verdict(" 7 ", ("3", "7")) == ("correct", "7", None)
    assert exact_gold_verdict("-\\frac{-3}{4}", ("\\frac{6}{8}",)) == ("correct", "\\frac{6}{8}", None)


@pytest.mark.unit
def test_constants_whose_values_differ_are_wrong_as_math_verify_finds_them(monkeypatch):
    """`_constants_that_differ` spares math-verify's `simplify` on two constants of different values: every
    verdict must be math-verify's own (radicals, pi, logs, trig, powers, complex numbers; and what it must leave
    alone: floats, percents, variables, sets, intervals, equations), and it must have spared some."""
    import math
    import random

    from evoforge.tasks.grading import answers

    rng = random.Random(2)
    groups = []
    for _ in range(12):
        a, c = rng.randint(1, 60), rng.choice((2, 3, 5, 6, 7, 10))
        groups.append([f"{a}\\sqrt{{{c}}}", f"\\sqrt{{{a * a * c}}}", f"{a + 1}\\sqrt{{{c}}}", f"{a}\\pi",
                       f"\\frac{{{a}\\pi}}{{3}}", f"\\sqrt{{{c}}}+{a}", f"2^{{{a % 9}}}", f"{2 ** (a % 9)}", f"{a}.5",
                       f"{a}\\%", f"x+{a}", f"\\log_2 {2 ** (a % 7)}", f"{a % 7}", f"\\cos(\\pi/{c})", f"({a}, {c})",
                       f"[{a}, {a + c}]", f"x = {a}", f"{a}+{c}i", f"\\frac{{1}}{{\\sqrt{{{c}}}}}",
                       f"\\frac{{\\sqrt{{{c}}}}}{{{c}}}", f"\\sqrt{{{c}}}-\\sqrt{{{c}}}+{a}", f"0.{a}",
                       f"{a * math.sqrt(c):.6f}", f"{a * math.pi:.6f}"])  # floats that round to a radical, to a pi
    pairs = [(gold, rng.choice(group)) for group in groups for gold in group]
    spared = []
    real = answers._constants_that_differ
    monkeypatch.setattr(answers, "_constants_that_differ", lambda g, p: spared.append(real(g, p)) or spared[-1])
    fast = [answers._grade_answer(answers.parse_gold(gold), pred) for gold, pred in pairs]
    monkeypatch.setattr(answers, "_constants_that_differ", lambda g, p: False)
    assert fast == [answers._grade_answer(answers.parse_gold(gold), pred) for gold, pred in pairs]
    assert sum(spared) >= 40 and fast.count(True) >= 15
