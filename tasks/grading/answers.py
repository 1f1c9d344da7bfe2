"""Reading answers and grading them: the final answer of a response (its last `\\boxed{}`), gold
answers in one normal form, and math-verify's verdict on the two. `grade` runs inside grader worker
processes (tasks/grading/pool.py).

The final answer is the content of the LAST box: math-verify's own extraction concatenates repeated
boxes, so extraction happens here, before math-verify sees text. One exception: when the gold has k
parts (a set, a tuple, a list of equations such as `k = 45, n = 2`), an answer may box each part, so
the last k boxes are also graded together, joined as one list. A one-part gold is graded by the last
box alone, so an intermediate result boxed earlier never counts.

A boxed number written in digit groups (`1 000`, `1\\,000`) is read as one number only when the gold
is one number: for a gold list `1, 2` the box `1, 2` stays two numbers, never 12.

math-verify's own timeouts use `signal.alarm` (main thread only) and do not stop a C-level big-integer
power; here they are switched off and the pool's hard deadline, which kills the worker, is the only
clock. A memory blow-up (e.g. `2^{10^{10}}`) hits the worker's address-space limit instead.
"""
from __future__ import annotations

import logging
import math
import re
import time
from fractions import Fraction
from functools import lru_cache

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from sympy import Abs, Expr, FiniteSet, Float, Interval, Symbol, Tuple, UnevaluatedExpr, nan, oo, zoo
from sympy.core.relational import Relational

# it warns on every call that its own timeouts are off; that is deliberate here (see above)
logging.getLogger("math_verify").setLevel(logging.ERROR)

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxes(text: str, count: int) -> list[str]:
    """Contents of the last `count` `\\boxed{...}` (or `\\fbox{...}`) whose braces close, in reading
    order. A box nested inside a later-found one is the one kept (the inner box is the answer)."""
    found: list[tuple[int, str]] = []  # (start, content), last box first
    for match in reversed(list(_BOX.finditer(text))):
        if len(found) == count:
            break
        end = _closing_brace(text, match.end() - 1)
        if end is None or (found and end > found[-1][0]):  # unclosed, or encloses a box already taken
            continue
        found.append((match.start(), text[match.end() : end].strip()))
    return [content for _, content in reversed(found)]


def _closing_brace(text: str, opening: int) -> int | None:
    depth = 0
    for j in range(opening, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return j
    return None


# a box whose content has no brace: it closes at its first `}` and no other box can be inside it
_FLAT_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{([^{}]*)\}")

# Python's whitespace, what `\s` and `str.strip()` take (tests/test_grading_cases.py checks the list against
# `str.isspace` over every code point), spelled out for Arrow's regex engine (RE2: answer_columns.py), whose own
# `\s` is ASCII only
WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
              "\u2009\u200a\u2028\u2029\u202f\u205f\u3000")


def all_boxes(text: str) -> tuple[str, ...]:
    """Every box `last_boxes` could take, in reading order. `grade(gold, response)` depends on the
    response only through these (`last_boxes(text, k)` is their last k), so two responses with the
    same boxes get the same verdict: the verify stage grades such a pair once. When every box is flat
    (the common `\\boxed{42}`) none nests or stays open, and two regex scans give them: the verify
    stage reads every rollout's boxes, so this is its per-row cost."""
    flat = _FLAT_BOX.findall(text)
    if len(flat) == len(_BOX.findall(text)):
        return tuple(map(str.strip, flat))  # a generator here was a fifth of the function's time
    return tuple(last_boxes(text, len(text)))


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) whose braces close, or None."""
    boxes = last_boxes(text, 1)
    return boxes[0] if boxes else None


_NUMBER = re.compile(r"^[-+]?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?$")


def normalize_answer(answer: str) -> str:
    """'1,000' -> '1000', '27.0' -> '27', '$5' -> '5'; anything that is not a plain number is kept."""
    text = answer.strip().strip("$").strip()
    if _NUMBER.match(text):
        text = text.replace(",", "").lstrip("+")
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        return text or "0"
    return answer.strip()


_EXTRACTION = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]


# a number in E notation, the whole answer: math-verify reads `2e3` as 2 * e * 3 (Euler's e)
_E_NOTATION = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+))[eE]([-+]?\d+)\s*$")


def _e_notation_as_latex(content: str) -> str:
    """`6.02e23` -> `6.02\\times10^{23}`, the number it is; anything else unchanged."""
    match = _E_NOTATION.match(content)
    return f"{match.group(1)}\\times10^{{{int(match.group(2))}}}" if match else content


# A number written in groups of three digits after a first group of one to three: `1 000`, `1\,000`,
# `1,000`, `1{,}000`, `10,\!000`; math-verify reads `1 000` and `1\,000` as the product 1*0. A gap
# (space) never separates list items; a comma may, hence two patterns. A comma and a space (`32, 349`)
# is a list, as math-verify's own tests have it.
_GROUP_GAP = r"(?:\\,|\\ |~| )"
_GROUP_COMMA = r"(?:\{,\}|,\\!|,)"
_GAP_GROUPED = re.compile(rf"[-+]?\d{{1,3}}(?:{_GROUP_GAP}\d{{3}})+(?:\.\d+)?")
_ANY_GROUPED = re.compile(rf"[-+]?\d{{1,3}}(?:(?:{_GROUP_GAP}|{_GROUP_COMMA})\d{{3}})+(?:\.\d+)?")
# `1000,99`: a decimal comma (math-verify reads it as the set {1000, 99})
_DECIMAL_COMMA = re.compile(r"[-+]?\d+,\d+")


def _ungrouped(content: str, grouped: re.Pattern) -> str:
    """`1 000` -> `1000` when the whole content is one number written in digit groups; else unchanged."""
    text = content.strip()
    return re.sub(r"[^-+\d.]", "", text) if grouped.fullmatch(text) else content


def _as_one_number(content: str) -> str:
    """The content read as the one number a one-number gold asks for: digit groups joined (`1 000` ->
    `1000`; they win over a decimal comma, as in math-verify: `1,000` is 1000), else a decimal comma
    (`1000,99` -> `1000.99`). Never applied for a gold list, where `1, 2` must stay two numbers."""
    text = content.strip()
    if _ANY_GROUPED.fullmatch(text):
        return _ungrouped(text, _ANY_GROUPED)
    if _DECIMAL_COMMA.fullmatch(text):
        return text.replace(",", ".")
    return content


def _parse_boxed(content: str) -> list:
    return parse("\\boxed{" + _e_notation_as_latex(content) + "}", extraction_config=_EXTRACTION, parsing_timeout=None)


@lru_cache(maxsize=4096)
def parse_gold(gold: str) -> tuple:
    """The parsed gold, or () when math-verify finds no mathematical object in it. math-verify
    returns [expression, source string]; a lone string (e.g. for '\\frac{') means it parsed nothing.
    A gold written with digit groups (`1 000`, `1\\,000`) is that number; commas are left to
    math-verify, since a gold `1, 234` may well be a list."""
    if not gold or not gold.strip():
        return ()
    parsed = tuple(_parse_boxed(_ungrouped(gold.strip(), _GAP_GROUPED)))
    return parsed if any(not isinstance(p, str) for p in parsed) else ()


def _gold_parts(gold_parsed: tuple) -> int:
    """How many separate answers the gold holds: the members of a set or list (`1, 2, 3`, `k = 45,
    n = 2`, `(1,2),(3,4)`), the entries of a tuple (math-verify reads a pair `(a, b)` as an open
    interval); 1 for anything else."""
    expr = gold_parsed[0]
    if isinstance(expr, (FiniteSet, Tuple)):
        return max(1, len(expr.args))
    if isinstance(expr, Interval) and expr.left_open and expr.right_open:
        return 2
    return 1


def _is_one_number(gold_parsed: tuple) -> bool:
    return bool(getattr(gold_parsed[0], "is_Number", False))


def _grade_answer(gold_parsed: tuple, answer: str) -> bool | None:
    """math-verify's verdict on one answer text, gold first; None when it cannot parse the answer."""
    if _is_one_number(gold_parsed):
        answer = _as_one_number(answer)
    pred_parsed = _parse_boxed(answer)
    if not pred_parsed:
        return None
    if _constants_that_differ(gold_parsed, pred_parsed):
        return False
    return bool(verify(list(gold_parsed), pred_parsed, timeout_seconds=None))


def _constants_that_differ(gold_parsed, pred_parsed) -> bool:
    """True where math-verify's `verify` is sure to say False and would take its slowest way there: two
    constant expressions (no variable, no float, no percent; not a set, relation or matrix), such as `5\\sqrt{3}`
    against `6\\sqrt{3}`, whose values differ by more than rounding. math-verify then finds them unequal as
    text, as structures and by `evalf` (its float rounding applies only where a float is), and last tries
    `simplify(gold - pred) == 0`, ~5 ms of sympy, which a difference of non-zero value never passes. Any
    other pair, and every equal one, goes to `verify` (tests/test_grading_cases.py compares the two)."""
    if len(gold_parsed) != 2 or len(pred_parsed) != 2:
        return False
    (gold, gold_text), (pred, pred_text) = gold_parsed, pred_parsed
    if not isinstance(gold_text, str) or not isinstance(pred_text, str) or gold_text.strip() == pred_text.strip():
        return False
    for expr in (gold, pred):
        if (not isinstance(expr, Expr) or isinstance(expr, (Symbol, Relational)) or expr.free_symbols
                or expr.has(Float, UnevaluatedExpr, nan, zoo, oo, -oo)):
            return False
    try:
        difference, scale = (complex(e.evalf(30)) for e in (gold - pred, Abs(gold) + Abs(pred) + 1))
    except (TypeError, ValueError, ArithmeticError):  # not a number after all
        return False
    return math.isfinite(abs(difference)) and math.isfinite(abs(scale)) and abs(difference) > 1e-12 * abs(scale)


# A number as one writes it exactly: a whole number (no leading zero, no sign but a minus, not `-0`) or a fraction
# of two, `\\frac{a}{b}` (`\\dfrac`, `\\tfrac`; a minus before it or on a). math-verify compares two such as
# rationals, exactly (no float is involved, so none of its rounding applies): `Fraction` gives the same verdict
# without sympy (tests/test_grading_cases.py checks it against math-verify, near values included). The answers
# of GSM8K, AIME or DAPO-Math, and many of MATH's, are graded so.
_WHOLE = r"-?[1-9][0-9]{0,99}|0"  # 100 digits at most: Python's int() refuses past 4,300
_EXACT_NUMBER = re.compile(rf"(?P<whole>{_WHOLE})|(?P<minus>-)?\\[dt]?frac\{{(?P<top>{_WHOLE})\}}\{{(?P<bottom>[1-9][0-9]{{0,99}})\}}")
WHOLE_NUMBER = rf"^(?:{_WHOLE})$"  # a whole number, the whole text (RE2, for Arrow's regex kernels)


def _exact_number(text: str) -> Fraction | None:
    match = _EXACT_NUMBER.fullmatch(text)
    if match is None:
        return None
    if match["whole"] is not None:
        return Fraction(int(match["whole"]))
    return Fraction(int(match["top"]), int(match["bottom"])) * (-1 if match["minus"] else 1)


NO_BOX = "no \\boxed{} answer in the response"
EMPTY_BOX = "empty \\boxed{}"


def exact_gold_verdict(gold: str, boxes: tuple[str, ...] | list[str]) -> tuple[str, str | None, str | None] | None:
    """`grade(gold, response)` where it needs no math-verify, for a gold that is an exact number (`boxes`: the
    response's `all_boxes`, or its last ones): no box or an empty last box (no answer), or a last box that is an
    exact number too (compared by value); None otherwise. The verify stage and GRPO's reward decide these in
    their own process, never sending them to a grader."""
    if (expected := _exact_number((gold or "").strip())) is None:
        return None
    if not boxes:
        return "no_answer", None, NO_BOX
    if not boxes[-1]:
        return "no_answer", "", EMPTY_BOX
    if (answer := _exact_number(boxes[-1])) is None:
        return None
    return ("correct" if answer == expected else "wrong"), boxes[-1], None


def grade(gold: str, response: str) -> tuple[str, str | None, str | None]:
    """(verdict, extracted answer, detail) with verdict in correct / wrong / no_answer / bad_gold."""
    exact = bool(gold) and _exact_number(gold.strip()) is not None
    if exact and (decided := exact_gold_verdict(gold, last_boxes(response or "", 1))) is not None:
        return decided
    gold_parsed = parse_gold(gold)
    if not gold_parsed:
        return "bad_gold", None, f"math-verify cannot parse the gold answer {gold[:80]!r}"
    parts = 1 if exact else _gold_parts(gold_parsed)  # an exact number parses, as one part
    boxes = last_boxes(response or "", parts)
    if not boxes:
        return "no_answer", None, NO_BOX
    final = boxes[-1]
    if not final:
        return "no_answer", "", EMPTY_BOX
    ok = _grade_answer(gold_parsed, final)
    if ok:
        return "correct", final, None
    # a k-part gold answered one part per box: the last k boxes together, as one list
    together = ", ".join(box for box in boxes if box)
    if len(boxes) > 1 and _grade_answer(gold_parsed, together):
        return "correct", together, None
    if ok is None:
        return "wrong", final, "math-verify cannot parse the boxed answer"
    return "wrong", final, None


def run_item(kind: str, gold: str, response: str) -> tuple[str, str | None, str | None, float]:
    started = time.perf_counter()
    try:
        if kind == "gold":
            verdict = "ok" if parse_gold(gold) else "bad_gold"
            extracted, detail = None, None
        else:
            verdict, extracted, detail = grade(gold, response)
    except MemoryError:
        verdict, extracted, detail = "timeout", None, "grader memory limit exceeded"
    except RecursionError:
        verdict, extracted, detail = "timeout", None, "grader recursion limit exceeded"
    except Exception as err:  # math-verify raises many types on odd input; never kill the batch
        verdict, extracted, detail = ("bad_gold" if kind == "gold" else "wrong"), None, f"grader error: {err!r}"[:300]
    return verdict, extracted, detail, time.perf_counter() - started


def warm_up() -> None:
    """Grade a few typical answers once. Run in the forkserver before it forks workers, so each worker
    inherits math-verify's and sympy's warmed parsers and caches instead of building them itself."""
    for gold, response in (
        ("72", "\\boxed{72}"), ("\\frac{1}{2}", "\\boxed{0.5}"), ("2\\sqrt{3}", "\\boxed{\\sqrt{12}}"),
        ("(1, 2)", "\\boxed{(1,2)}"), ("[0, 1)", "\\boxed{[0,1)}"), ("x^2+1", "\\boxed{1+x^{2}}"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\boxed{(3, \\pi/2)}"), ("\\text{(C)}", "\\boxed{C}"),
    ):
        grade(gold, response)
    parse_gold.cache_clear()
