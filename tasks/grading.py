"""Reading answers and grading them: the final answer of a response (its last `\\boxed{}`), gold
answers in one normal form, and math-verify's verdict on the two. `grade` runs inside grader worker
processes (tasks/grader_pool.py).

The final answer is the content of the LAST box: math-verify's own extraction concatenates repeated
boxes, so extraction happens here, before math-verify sees text.

math-verify's own timeouts use `signal.alarm` (main thread only) and do not stop a C-level big-integer
power; here they are switched off and the pool's hard deadline, which kills the worker, is the only
clock. A memory blow-up (e.g. `2^{10^{10}}`) hits the worker's address-space limit instead.
"""
from __future__ import annotations

import logging
import re
import time
from functools import lru_cache

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

# it warns on every call that its own timeouts are off; that is deliberate here (see above)
logging.getLogger("math_verify").setLevel(logging.ERROR)

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) whose braces close, or None."""
    for match in reversed(list(_BOX.finditer(text))):
        depth = 0
        for j in range(match.end() - 1, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[match.end() : j].strip()
    return None


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


def _parse_boxed(content: str) -> list:
    return parse("\\boxed{" + _e_notation_as_latex(content) + "}", extraction_config=_EXTRACTION, parsing_timeout=None)


@lru_cache(maxsize=4096)
def parse_gold(gold: str) -> tuple:
    """The parsed gold, or () when math-verify finds no mathematical object in it. math-verify
    returns [expression, source string]; a lone string (e.g. for '\\frac{') means it parsed nothing."""
    if not gold or not gold.strip():
        return ()
    parsed = tuple(_parse_boxed(gold.strip()))
    return parsed if any(not isinstance(p, str) for p in parsed) else ()


def grade(gold: str, response: str) -> tuple[str, str | None, str | None]:
    """(verdict, extracted answer, detail) with verdict in correct / wrong / no_answer / bad_gold."""
    gold_parsed = parse_gold(gold)
    if not gold_parsed:
        return "bad_gold", None, f"math-verify cannot parse the gold answer {gold[:80]!r}"
    extracted = last_boxed(response or "")
    if extracted is None:
        return "no_answer", None, "no \\boxed{} answer in the response"
    if not extracted:
        return "no_answer", "", "empty \\boxed{}"
    pred_parsed = _parse_boxed(extracted)
    if not pred_parsed:
        return "wrong", extracted, "math-verify cannot parse the boxed answer"
    ok = verify(list(gold_parsed), pred_parsed, timeout_seconds=None)
    return ("correct" if ok else "wrong"), extracted, None


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
