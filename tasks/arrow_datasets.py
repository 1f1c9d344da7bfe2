"""Arrow tables as `datasets` objects without copying them, and TRL's conversational columns built in
Arrow: what the finetune methods' `dataset`s and `evoforge export` (tasks/export.py) share. A row never
passes through Python: `datasets.Dataset.from_list(table.to_pylist())` copies every value twice."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from evoforge.data.schemas import one_array

if TYPE_CHECKING:
    import datasets


# -- Arrow tables as datasets --------------------------------------------------------------------------

def hub_compatible(table: pa.Table) -> pa.Table:
    """`table` with every column in a type the `datasets` library has a feature for: a map becomes a list of
    {key, value} structs (its buffers reinterpreted, not copied); a dictionary-encoded column is decoded (so
    the features describe the Arrow data exactly). Every other column is the same Arrow data, not copied."""
    for i, field in enumerate(table.schema):
        wanted = hub_type(field.type)
        if wanted != field.type:
            table = table.set_column(i, field.with_type(wanted), _as_type(table.column(i), wanted))
    return table


def _as_type(column: pa.ChunkedArray, wanted: pa.DataType) -> pa.ChunkedArray:
    """`column` as `wanted`: its buffers viewed as the new type where the layouts agree (a map is a list of
    key/value structs in memory), else converted (a dictionary-encoded column is decoded)."""
    try:
        return pa.chunked_array([chunk.view(wanted) for chunk in column.chunks], wanted)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return column.cast(wanted)


def hub_type(kind: pa.DataType) -> pa.DataType:
    """The type `datasets` has a feature for that holds `kind`'s values (maps and dictionaries replaced, deeply)."""
    if pa.types.is_map(kind):
        return pa.list_(pa.struct([("key", hub_type(kind.key_type)), ("value", hub_type(kind.item_type))]))
    if pa.types.is_dictionary(kind):
        return hub_type(kind.value_type)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        item = kind.value_field
        inner = item.with_type(hub_type(item.type))
        return pa.list_(inner) if pa.types.is_list(kind) else pa.large_list(inner)
    if pa.types.is_fixed_size_list(kind):
        return pa.list_(kind.value_field.with_type(hub_type(kind.value_type)), kind.list_size)
    if pa.types.is_struct(kind):
        return pa.struct([kind.field(i).with_type(hub_type(kind.field(i).type)) for i in range(kind.num_fields)])
    return kind


def arrow_dataset(table: pa.Table, split: str | None = None) -> datasets.Dataset:
    """`table` as a `datasets.Dataset` without copying it: the dataset's Arrow table holds the same buffers
    (tests/test_export.py checks their addresses). Only the schema's metadata is new: `datasets` records its
    features there. A column `datasets` has no feature for raises; `hub_compatible` converts those first.

    The fingerprint is random, as `datasets` gives a dataset it cannot hash: hashing an in-memory table
    serializes all of it (a copy, ~1 s per 200 MB). An in-memory dataset keeps no cache files, so its
    fingerprint only names it; `map` and the like derive theirs from it."""
    import datasets
    from datasets.fingerprint import generate_random_fingerprint
    from datasets.table import InMemoryTable

    return datasets.Dataset(InMemoryTable(table), split=datasets.NamedSplit(split) if split else None,
                            fingerprint=generate_random_fingerprint())


# -- TRL's conversational rows, column-wise in Arrow (the finetune methods' `dataset`s share these) ------------

def _strings(column) -> pa.Array:
    """A text column as one `string` array (zero-copy when it is one already)."""
    column = one_array(column)
    return column if column.type == pa.string() else column.cast(pa.string())


def messages_column(template: Callable[..., list[dict]], **columns) -> pa.Array:
    """The chat messages `template(**row)` gives each row, built column-wise: a list<struct<role, content>>
    array equal to `pa.array([template(**row) for row in rows])`, which `datasets` reads as TRL's
    conversational format (`prompt`, `completion`, `chosen`, `rejected` of message lists).

    `template` (a function of models/prompts.py) is called once, with a marker for each column; each message's
    content is then literal text (a system prompt, a few-shot turn) and the columns it inserts verbatim,
    joined row by row by Arrow (`binary_join_element_wise`), and one `take` lays the messages out row after
    row. A one-message template whose content is a column (an assistant turn) keeps that column's buffers.
    A template must insert its arguments verbatim: one that transforms them (strip, slice) is refused where
    the marker shows it, and tests/test_export.py compares every method's rows with the template applied
    row by row."""
    marks = {name: f" \x00{index}\x00 " for index, name in enumerate(columns)}
    named = {mark: name for name, mark in marks.items()}
    split = re.compile("(" + "|".join(map(re.escape, marks.values())) + ")")
    values = {name: _strings(column) for name, column in columns.items()}
    rows = len(next(iter(values.values())))
    messages = template(**marks)
    pieces, per_row = [], []  # each message's contents: one per row (from the columns) or one literal for all rows
    for message in messages:
        if set(message) != {"role", "content"} or not isinstance(message["role"], str) or "\x00" in message["role"]:
            raise ValueError(f"messages_column: a message is {{'role': literal, 'content': text}}, not {message!r}")
        parts = [part for part in split.split(message["content"]) if part]
        if any("\x00" in part and part not in named for part in parts):
            raise ValueError(f"messages_column: {template!r} does not insert its arguments verbatim")
        if not any(part in named for part in parts):
            pieces.append(pa.array([message["content"]], pa.string()))
            per_row.append(False)
            continue
        pieces.append(values[named[parts[0]]] if len(parts) == 1 else pc.binary_join_element_wise(
            *[values[named[part]] if part in named else pa.scalar(part, pa.string()) for part in parts], ""))
        per_row.append(True)
    count = len(messages)
    if count == 1 and per_row[0]:
        contents = pieces[0]  # already one message per row, in row order
    else:
        # row i's message j: pieces[j][i] (from the row) or pieces[j][0] (a literal)
        starts = np.cumsum([0] + [len(piece) for piece in pieces[:-1]], dtype=np.int64)
        take = starts[None, :] + np.outer(np.arange(rows, dtype=np.int64), np.asarray(per_row, np.int64))
        contents = pa.concat_arrays(pieces).take(pa.array(take.ravel()))
    roles = pa.array([m["role"] for m in messages], pa.string()).take(pa.array(np.tile(np.arange(count), rows)))
    structs = pa.StructArray.from_arrays([roles, contents], names=["role", "content"])
    return pa.ListArray.from_arrays(pa.array(np.arange(0, rows * count + 1, count, dtype=np.int32)), structs)


def assistant_turn(column) -> pa.Array:
    """Each row's text as a one-message assistant turn, `[{"role": "assistant", "content": text}]`, pointing
    at the text's own buffers."""
    return messages_column(lambda content: [{"role": "assistant", "content": content}], content=column)
