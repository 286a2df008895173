"""Inline Parquet files and Arrow tables: stored image refs back to image bytes, one row group at a time.

The reverse of ``offload.parquet``: a datasets ``Image`` struct (or a list of them) gets its
``bytes`` back and a null ``path``; a string cell naming a stored image (``<h32>.<ext>``, as a
path or URL) becomes its ``data:`` URL; parts in nested chat columns get ``data:`` URLs in place.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from typing import Any, BinaryIO

from mmoffload.contract.addresses import HASH_HEX_DIGITS, IMAGE_EXTENSIONS
from mmoffload.errors import Where
from mmoffload.inline.records import InlineCounts, Inliner
from mmoffload.io.parquet import (
    ColumnRewriter,
    Row,
    image_cells,
    map_row_groups,
    map_table,
    normal_image_type,
    pa,
    pc,
    table_of,
)
from mmoffload.store.read import AllowedRoots

# A string cell that names a stored image ends with its content-addressed name.
_STORED = rf"[0-9a-f]{{{HASH_HEX_DIGITS}}}\.({'|'.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))})$"


class InlineColumns(ColumnRewriter[InlineCounts]):
    """Inline the stored image refs of record batches (the column plan is decided once per table).

    A batch raises MissingImageError for a ref to no file, IntegrityError for content that
    does not match its name.
    """

    def __init__(self, inliner: Inliner, schema: pa.Schema, first: pa.RecordBatch | None) -> None:
        self.inliner = inliner
        super().__init__(schema, first, InlineCounts())

    def rewrite_image_cells(self, column: pa.Array, row: Row, changed: set[int]) -> pa.Array:
        """Read back every image a cell names by its path; return the cells with bytes and null paths."""
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

    def strings_to_rewrite(self, column: pa.Array) -> pa.Array:
        return pc.match_substring_regex(column, _STORED)

    def rewrite_string(self, value: str, where: Where) -> str:
        return self.inliner.image(value, where, self.counts)[1]

    def rewrite_record(self, record: dict[str, Any], where: Where) -> InlineCounts:
        return self.inliner.record(record, where, reshape=False)


def inline_table(table: Any, allowed_roots: AllowedRoots = None) -> Any:
    """Inline every stored image ref of an Arrow table or a ``datasets.Dataset``; return the same kind.

    Raises:
        MissingImageError: a ref to no file; IntegrityError: content that does not match its name.
    """
    arrow, wrap = table_of(table)
    return wrap(map_table(arrow, partial(InlineColumns, Inliner(allowed_roots))))


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
    return map_row_groups(source, out, partial(InlineColumns, inliner), advance).counts
