"""Inline Parquet files and Arrow tables: stored image refs back to image bytes, one row group at a time.

The reverse of ``offload.parquet``: a datasets ``Image`` struct (or a list of them) gets its
``bytes`` back and a null ``path``; a string cell naming a stored image (``<h32>.<ext>``, as a
path or URL) becomes its ``data:`` URL; parts in nested chat columns get ``data:`` URLs in place.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, BinaryIO

from mmoffload.contract.addresses import HASH_HEX_DIGITS, IMAGE_EXTENSIONS
from mmoffload.errors import Where
from mmoffload.inline.records import InlineCounts, Inliner
from mmoffload.io.parquet import (
    image_cells,
    is_image_list,
    is_image_struct,
    is_string,
    list_items,
    map_row_groups,
    map_table,
    normal_image_type,
    pa,
    pc,
    rebuild_list,
    table_of,
    with_image_columns,
)
from mmoffload.store.read import AllowedRoots

# A string cell that names a stored image ends with its content-addressed name.
_STORED = rf"[0-9a-f]{{{HASH_HEX_DIGITS}}}\.({'|'.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))})$"


class InlineColumns:
    """Inline the stored image refs of record batches (the column plan is decided once per table)."""

    def __init__(self, inliner: Inliner, schema: pa.Schema) -> None:
        self.inliner = inliner
        self.counts = InlineCounts()
        self.kinds: dict[str, str] = {}
        retyped: dict[str, pa.DataType] = {}
        for field in schema:
            if is_image_struct(field.type) or is_image_list(field.type):
                self.kinds[field.name] = "images" if is_image_list(field.type) else "image"
                retyped[field.name] = normal_image_type(field.type)
            elif is_string(field.type):
                self.kinds[field.name] = "stored"
            elif pa.types.is_nested(field.type):
                self.kinds[field.name] = "nested"
        self.schema = with_image_columns(schema, retyped)

    def __call__(self, batch: pa.RecordBatch, where: Where, first_row: int) -> pa.RecordBatch:
        """Inline one batch; return it in the output schema.

        Raises:
            MissingImageError: a ref to no file; IntegrityError: content that does not match its name.
        """
        self.counts.records += batch.num_rows
        changed: set[int] = set()
        columns = []
        for name, column in zip(batch.schema.names, batch.columns, strict=True):
            if (kind := self.kinds.get(name)) is not None:
                column = getattr(self, f"_{kind}")(column, where.at(path=(name,)), first_row, changed)
            columns.append(column)
        self.counts.records_rewritten += len(changed)
        return pa.RecordBatch.from_arrays(columns, schema=self.schema)

    def _cells(
        self, column: pa.Array, row: Callable[[int], tuple[int, Where]], changed: set[int]
    ) -> pa.Array:
        blobs_array, paths_array = column.flatten()
        blobs, paths = blobs_array.to_pylist(), paths_array.to_pylist()
        for index, path in enumerate(paths):
            if blobs[index] is None and path is not None:
                number, at = row(index)
                blobs[index] = self.inliner.image(path, at, self.counts)[0]
                changed.add(number)
            elif blobs[index] is not None:
                self.counts.image_parts += 1
        return image_cells(column, blobs, normal_image_type(column.type), paths=False)

    def _image(self, column: pa.Array, where: Where, first_row: int, changed: set[int]) -> pa.Array:
        return self._cells(column, lambda i: (first_row + i, where.at(index=first_row + i)), changed)

    def _images(self, column: pa.Array, where: Where, first_row: int, changed: set[int]) -> pa.Array:
        items, row = list_items(column, first_row, where)
        return rebuild_list(column, self._cells(items, row, changed))

    def _stored(self, column: pa.Array, where: Where, first_row: int, changed: set[int]) -> pa.Array:
        stored = pc.fill_null(pc.match_substring_regex(column, _STORED), False)
        if not pc.any(stored).as_py():
            return column
        values = column.to_pylist()
        for index in pc.indices_nonzero(stored).to_pylist():
            values[index] = self.inliner.image(values[index], where.at(index=first_row + index), self.counts)[
                1
            ]
            changed.add(first_row + index)
        return pa.array(values, column.type)

    def _nested(self, column: pa.Array, where: Where, first_row: int, changed: set[int]) -> pa.Array:
        name = where.path[0]  # type: ignore[index]
        values, rewritten = column.to_pylist(), False
        for index, value in enumerate(values):
            record = {name: value}  # The column's name heads the JSON path of every part in the cell.
            found = self.inliner.record(record, where.at(index=first_row + index, path=None), reshape=False)
            rewrote, found.records, found.records_rewritten = found.records_rewritten, 0, 0
            self.counts.add(found)
            if rewrote:
                values[index], rewritten = record[name], True
                changed.add(first_row + index)
        return pa.array(values, column.type) if rewritten else column


def inline_table(table: Any, allowed_roots: AllowedRoots = None) -> Any:
    """Inline every stored image ref of an Arrow table or a ``datasets.Dataset``; return the same kind.

    Raises:
        MissingImageError: a ref to no file; IntegrityError: content that does not match its name.
    """
    arrow, wrap = table_of(table)
    inliner = Inliner(allowed_roots)
    return wrap(map_table(arrow, lambda schema, _first: InlineColumns(inliner, schema)))


def inline_parquet(
    source: str | os.PathLike[str],
    out: BinaryIO,
    inliner: Inliner,
    advance: Callable[[int], None] = lambda _n: None,
) -> InlineCounts:
    """Inline one Parquet file into ``out``, one row group at a time; return what was done.

    Raises:
        BadInputError: the file is not Parquet.
        MissingImageError: a ref to no file; IntegrityError: content that does not match its name.
    """
    work: list[InlineColumns] = []

    def plan(schema: pa.Schema, _first: pa.RecordBatch | None) -> InlineColumns:
        work.append(InlineColumns(inliner, schema))
        return work[0]

    map_row_groups(source, out, plan, advance)
    return work[0].counts if work else InlineCounts()
