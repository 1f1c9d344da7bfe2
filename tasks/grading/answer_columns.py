"""The answers' rules over Arrow columns: `all_boxes` for a column of texts, for the verify stage to grade a chunk
on its columns (tasks/verify.py `_grade_batch`). Apart from tasks/grading/answers.py because that module is what
the graders import (their forkserver preloads it): Arrow and NumPy there would take ~300 MB of the address space
their `memory_mb` limit leaves to math-verify."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from evoforge.data.schemas import one_array
from evoforge.tasks.grading.answers import WHITESPACE, all_boxes

# `answers._BOX` and `answers._FLAT_BOX` for RE2, whose own `\s` is ASCII only: Python's whitespace spelled out
_RE2_SPACE = "[" + "".join(f"\\x{{{ord(c):x}}}" for c in WHITESPACE) + "]"
_RE2_BOX = rf"\\(?:boxed|fbox){_RE2_SPACE}*\{{"
_RE2_FLAT_BOX = rf"\\(?:boxed|fbox){_RE2_SPACE}*\{{(?P<box>[^{{}}]*)\}}"


@dataclass(frozen=True)
class BoxesOfColumn:
    """`all_boxes` of every text of a column: `count[i]` boxes, the last `last[i]` (null when none), and for the
    texts holding two or more `earlier[i]`, every box but the last. `boxes(i)` is `all_boxes(text i)`.
    `by_python`: the rows whose boxes `all_boxes` read (nested, open or several boxes); every other text holds one
    flat box alone or no box opening at all."""
    count: np.ndarray
    last: pa.Array
    earlier: dict[int, tuple[str, ...]]
    by_python: np.ndarray

    def boxes(self, i: int) -> tuple[str, ...]:
        return () if not self.count[i] else (*self.earlier.get(i, ()), self.last[i].as_py())


def all_boxes_of_column(texts: pa.Array | pa.ChunkedArray) -> BoxesOfColumn:
    """`all_boxes` of a column of texts (a null reads as ""), without a Python string for the common text, one
    flat box or none: Arrow counts the box openings and takes the first flat box (RE2, ~0.5 µs a 300-character
    text against ~1.4 µs in Python); a text whose opening count is 1 and whose one box is flat holds that box
    alone (a flat box starts at an opening). Any other text holding an opening goes through `all_boxes`."""
    texts = pc.fill_null(one_array(texts), "")
    openings = pc.count_substring_regex(texts, _RE2_BOX).to_numpy(zero_copy_only=False)
    flat = pc.struct_field(pc.extract_regex(texts, _RE2_FLAT_BOX), [0])  # null where the text holds no flat box
    alone = (openings == 1) & ~pc.is_null(flat).to_numpy(zero_copy_only=False)
    last = pc.if_else(pa.array(alone), pc.utf8_trim(flat, WHITESPACE), pa.scalar(None, pa.string()))
    count = alone.astype(np.int64)
    earlier: dict[int, tuple[str, ...]] = {}
    rest = np.flatnonzero((openings > 0) & ~alone)  # nested, open, or several boxes
    lasts = []
    for i, text in zip(rest.tolist(), texts.take(pa.array(rest)).to_pylist()):
        boxes = all_boxes(text)
        count[i] = len(boxes)
        lasts.append(boxes[-1] if boxes else None)
        if len(boxes) > 1:
            earlier[i] = boxes[:-1]
    if len(rest):
        mask = np.zeros(len(texts), dtype=bool)
        mask[rest] = True
        last = pc.replace_with_mask(last, pa.array(mask), pa.array(lasts, pa.string()))
    return BoxesOfColumn(count, last, earlier, rest)
