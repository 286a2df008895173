"""Offload Parquet files and Arrow tables (datasets, verl, EasyR1 prompt sets), one row group at a time.

Image cells are found in the shapes such sets keep them:

- a datasets ``Image`` struct column ``{bytes, path}``, or a list of them (verl's ``images``);
- a binary column of image bytes: it becomes a datasets ``Image`` struct column (and the
  schema's datasets features say ``Image``), since a path needs somewhere to go;
- a string column: each ``data:`` URL in it becomes the stored file's path;
- nested columns (chat ``messages``, ``prompt``) holding image parts: the JSONL walker's
  parts, each source changed in place, so the column keeps its type.

Stored images become ``{bytes: null, path: PATH}`` with PATH the plain path (an object URL on
an object store), which ``datasets`` decodes and ``PIL.Image.open`` opens. Every other column
and the schema's metadata pass through unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any, BinaryIO

from mmoffload.contract.addresses import sniff_extension
from mmoffload.contract.imageparts import plain_path
from mmoffload.errors import Where
from mmoffload.io.parquet import (
    ColumnRewriter,
    Rewrite,
    Row,
    image_cells,
    image_type,
    is_binary,
    map_row_groups,
    map_table,
    normal_image_type,
    pa,
    pc,
    table_of,
)
from mmoffload.offload.records import Offloader, OffloadOptions, RecordCounts
from mmoffload.store.backend import open_store

if TYPE_CHECKING:
    from mmoffload.store.local import AssetStore
    from mmoffload.store.objects import ObjectStore


class OffloadColumns(ColumnRewriter[RecordCounts]):
    """Offload the image cells of record batches, with a column plan decided once per table.

    Besides the shapes every rewriter plans, a binary column whose first value is an image
    becomes an image struct column. A bad image cell raises BadInputError, naming its file,
    row (``index``) and column path.
    """

    def __init__(self, offloader: Offloader, schema: pa.Schema, first: pa.RecordBatch | None) -> None:
        self.offloader = offloader
        super().__init__(schema, first, RecordCounts())

    def plan_column(
        self, field: pa.Field, first: pa.RecordBatch | None
    ) -> tuple[Rewrite, pa.DataType | None] | None:
        if is_binary(field.type) and first is not None and _first_is_image(first.column(field.name)):
            return self._binary, image_type(field.type)
        return super().plan_column(field, first)

    def rewrite_image_cells(self, column: pa.Array, row: Row, changed: set[int]) -> pa.Array:
        """Store every ``bytes`` of an image struct array; return it with null bytes and plain paths."""
        blobs_array, paths_array = column.flatten()
        blobs, paths = blobs_array.to_pylist(), paths_array.to_pylist()
        for index, blob in enumerate(blobs):
            if blob:
                number, at = row(index)
                paths[index] = plain_path(self.offloader.image(blob, at, self.counts))
                changed.add(number)
            elif paths[index] is not None:
                self.counts.image_parts += 1
                self.counts.already_file += 1
        return image_cells(column, paths, normal_image_type(column.type), paths=True)

    def strings_to_rewrite(self, column: pa.Array) -> pa.Array:
        return pc.starts_with(column, "data:")

    def rewrite_string(self, value: str, where: Where) -> str:
        return plain_path(self.offloader.data_url(value, where, self.counts))

    def rewrite_record(self, record: dict[str, Any], where: Where) -> RecordCounts:
        return self.offloader.record(record, where, reshape=False)

    def _binary(self, column: pa.Array, where: Where, first_row: int, changed: set[int]) -> pa.Array:
        kind = image_type(column.type)
        paths = pa.nulls(len(column), pa.string())
        structs = pa.StructArray.from_arrays([column, paths], fields=list(kind), mask=column.is_null())
        return self._image(structs, where, first_row, changed)


def _first_is_image(column: pa.Array) -> bool:
    """Whether a binary column holds images: its first value sniffs as one."""
    values = column.drop_null()
    return len(values) > 0 and sniff_extension(values[0].as_py()[:16]) is not None


def offload_table(
    table: Any,
    assets: str | os.PathLike[str] | AssetStore | ObjectStore,
    options: OffloadOptions | None = None,
) -> Any:
    """Offload every image cell of an Arrow table or a ``datasets.Dataset``; return the same kind.

    Args:
        table: a ``pyarrow.Table``, or a ``datasets.Dataset`` (its Arrow table is offloaded).
        assets: the asset directory or object-store URL, or a store on it.
        options: what to do with ``file://`` and remote sources.

    Returns:
        The offloaded table (a ``datasets.Dataset`` for a ``datasets.Dataset``).

    Raises:
        BadInputError: a bad image cell, naming its column, row and JSON path.
    """
    arrow, wrap = table_of(table)
    offloader = Offloader(open_store(assets), options)
    with offloader.store.syncing():
        return wrap(map_table(arrow, partial(OffloadColumns, offloader)))


def offload_parquet(
    source: str | os.PathLike[str],
    out: BinaryIO,
    offloader: Offloader,
    advance: Callable[[int], None] = lambda _n: None,
) -> RecordCounts:
    """Offload one Parquet file into ``out``, one row group at a time; return what was done.

    Raises:
        BadInputError: the file is not Parquet, or a bad image cell (file, row, column path).
    """
    return map_row_groups(source, out, partial(OffloadColumns, offloader), advance).counts
