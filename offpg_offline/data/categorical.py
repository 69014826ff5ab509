"""Categorical context columns (strings or integers) → one-hot blocks of the observation vector.

`offpg ingest parquet|csv --categorical-cols GLOB` turns each matched column into a block of
V + 1 indicator features appended to `obs`: one per value of the column's vocabulary (sorted:
numerically for integer columns, as text otherwise) and a last "unknown" slot. The vocabulary
is stored in the card (`categorical`), so data ingested later with `--categories-from DATASET`
(and any code that encodes a new context for a trained policy, `Categories.encode`) produce
identical vectors; a value outside the vocabulary sets the unknown slot instead of failing.

Card layout (`card["categorical"]`):
    {"encoding": "one-hot",
     "columns": [{"column": "position", "kind": "integer", "values": ["1", "2", "3"],
                  "offset": 80, "width": 4, "unknown_index": 83}, ...]}
`offset` is the block's first index in `obs`; `unknown_index` = offset + len(values).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

ENCODING = "one-hot"


@dataclass(frozen=True, slots=True)
class Vocabulary:
    """The values of one categorical column, as text, in their one-hot order."""

    column: str
    values: tuple[str, ...]
    kind: str  # "integer" (sorted numerically) or "text"

    @property
    def width(self) -> int:
        """One slot per value plus the unknown slot."""
        return len(self.values) + 1


def _as_text(series: pl.Series) -> pl.Series:
    return series.cast(pl.String)


def vocabulary(column: str, values: pl.Series) -> Vocabulary:
    """The sorted distinct non-null values of `values` (integers numerically, else as text)."""
    distinct = values.drop_nulls().unique()
    if distinct.dtype.is_integer():
        return Vocabulary(column, tuple(str(v) for v in distinct.sort().to_list()), "integer")
    return Vocabulary(column, tuple(sorted(_as_text(distinct).to_list())), "text")


@dataclass(frozen=True, slots=True)
class Categories:
    """The vocabularies of all categorical columns, in obs order, after `offset` numeric values."""

    vocabularies: tuple[Vocabulary, ...]
    offset: int = 0

    @property
    def width(self) -> int:
        return sum(v.width for v in self.vocabularies)

    def encode(self, frame: pl.DataFrame) -> tuple[np.ndarray, dict[str, int]]:
        """One-hot blocks [rows, width] (float32) and, per column, how many rows were unknown."""
        rows = len(frame)
        out = np.zeros((rows, self.width), dtype=np.float32)
        unknown: dict[str, int] = {}
        start = 0
        arange = np.arange(rows)
        for vocab in self.vocabularies:
            text = _as_text(frame.get_column(vocab.column))
            index = text.replace_strict(list(vocab.values), list(range(len(vocab.values))),
                                        default=len(vocab.values), return_dtype=pl.Int64)
            slots = index.to_numpy()
            out[arange, start + slots] = 1.0
            unknown[vocab.column] = int(np.count_nonzero(slots == len(vocab.values)))
            start += vocab.width
        return out, unknown

    def to_card(self) -> dict[str, Any]:
        columns, start = [], self.offset
        for vocab in self.vocabularies:
            columns.append({"column": vocab.column, "kind": vocab.kind,
                            "values": list(vocab.values), "offset": start,
                            "width": vocab.width, "unknown_index": start + len(vocab.values)})
            start += vocab.width
        return {"encoding": ENCODING, "columns": columns}

    @classmethod
    def from_card(cls, entry: Mapping[str, Any], columns: Sequence[str],
                  offset: int, source: str) -> Categories:
        """The vocabularies an earlier dataset's card holds, for `columns` (in this order).

        Raises:
            ValueError: the card has no vocabulary for one of `columns`, or another encoding.
        """
        if not isinstance(entry, Mapping) or entry.get("encoding") != ENCODING:
            raise ValueError(f"{source}: the card has no one-hot categorical vocabulary "
                             f"(key 'categorical'); ingest it with --categorical-cols first.")
        known = {c.get("column"): c for c in entry.get("columns", []) if isinstance(c, Mapping)}
        vocabularies = []
        for column in columns:
            if column not in known:
                raise ValueError(f"{source}: the card has no vocabulary for column {column!r} "
                                 f"(it has {', '.join(map(str, known)) or 'none'}).")
            item = known[column]
            vocabularies.append(Vocabulary(column, tuple(str(v) for v in item["values"]),
                                           str(item.get("kind", "text"))))
        return cls(tuple(vocabularies), offset)
