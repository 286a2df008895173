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
from typing import TYPE_CHECKING, Any, BinaryIO

from mmoffload.contract.addresses import sniff_extension
from mmoffload.contract.imageparts import plain_path
from mmoffload.errors import Where
from mmoffload.io.parquet import (
    image_cells,
    image_type,
    is_binary,
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
from mmoffload.offload.records import Offloader, OffloadOptions, RecordCounts
from mmoffload.store.backend import open_store

if TYPE_CHECKING:
    from mmoffload.store.local import AssetStore
    from mmoffload.store.objects import ObjectStore

Row = Callable[[int], tuple[int, Where]]


class OffloadColumns:
    """Offload the image cells of record batches, with a column plan decided once per table.

    Attributes:
        schema: the output schema.
        counts: what was done so far (records are rows).
    """

    def __init__(self, offloader: Offloader, schema: pa.Schema, first: pa.RecordBatch | None) -> None:
        self.offloader = offloader
        self.counts = RecordCounts()
        self.kinds: dict[str, str] = {}
        retyped: dict[str, pa.DataType] = {}
        for field in schema:
            kind = field.type
            if is_image_struct(kind) or is_image_list(kind):
                self.kinds[field.name] = "images" if is_image_list(kind) else "image"
                retyped[field.name] = normal_image_type(kind)
            elif is_binary(kind) and first is not None and _first_is_image(first.column(field.name)):
                self.kinds[field.name] = "binary"
                retyped[field.name] = image_type(kind)
            elif is_string(kind):
                self.kinds[field.name] = "data_url"
            elif pa.types.is_nested(kind):
                self.kinds[field.name] = "nested"
        self.schema = with_image_columns(schema, retyped)

    def __call__(self, batch: pa.RecordBatch, where: Where, first_row: int) -> pa.RecordBatch:
        """Offload one batch's image cells; return it in the output schema.

        Raises:
            BadInputError: a bad image cell, naming its file, row (``index``) and column path.
        """
        self.counts.records += batch.num_rows
        changed: set[int] = set()
        columns = []
        for name, column in zip(batch.schema.names, batch.columns, strict=True):
            if (kind := self.kinds.get(name)) is not None:
                at = where.at(path=(name,))
                column = getattr(self, f"_{kind}")(column, at, first_row, changed)
            columns.append(column)
        self.counts.records_rewritten += len(changed)
        return pa.RecordBatch.from_arrays(columns, schema=self.schema)

    def _cells(self, column: pa.Array, row: Row, changed: set[int]) -> pa.Array:
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

    def _image(self, column: pa.Array, where: Where, first_row: int, changed: set[int]) -> pa.Array:
        return self._cells(column, lambda i: (first_row + i, where.at(index=first_row + i)), changed)

    def _images(self, column: pa.Array, where: Where, first_row: int, changed: set[int]) -> pa.Array:
        items, row = list_items(column, first_row, where)
        return rebuild_list(column, self._cells(items, row, changed))

    def _binary(self, column: pa.Array, where: Where, first_row: int, changed: set[int]) -> pa.Array:
        kind = image_type(column.type)
        paths = pa.nulls(len(column), pa.string())
        structs = pa.StructArray.from_arrays([column, paths], fields=list(kind), mask=column.is_null())
        return self._image(structs, where, first_row, changed)

    def _data_url(self, column: pa.Array, where: Where, first_row: int, changed: set[int]) -> pa.Array:
        is_data = pc.fill_null(pc.starts_with(column, "data:"), False)
        if not pc.any(is_data).as_py():
            return column
        values = column.to_pylist()
        for index in pc.indices_nonzero(is_data).to_pylist():
            uri = self.offloader.data_url(values[index], where.at(index=first_row + index), self.counts)
            values[index] = plain_path(uri)
            changed.add(first_row + index)
        return pa.array(values, column.type)

    def _nested(self, column: pa.Array, where: Where, first_row: int, changed: set[int]) -> pa.Array:
        name = where.path[0]  # type: ignore[index]
        values, rewritten = column.to_pylist(), False
        for index, value in enumerate(values):
            # The column's name heads the JSON path of every part found in the cell.
            record = {name: value}
            found = self.offloader.record(record, where.at(index=first_row + index, path=None), reshape=False)
            rewrote, found.records, found.records_rewritten = found.records_rewritten, 0, 0
            self.counts.add(found)
            if rewrote:
                values[index], rewritten = record[name], True
                changed.add(first_row + index)
        return pa.array(values, column.type) if rewritten else column


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
        return wrap(map_table(arrow, lambda schema, first: OffloadColumns(offloader, schema, first)))


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
    work: list[OffloadColumns] = []

    def plan(schema: pa.Schema, first: pa.RecordBatch | None) -> OffloadColumns:
        work.append(OffloadColumns(offloader, schema, first))
        return work[0]

    map_row_groups(source, out, plan, advance)
    return work[0].counts if work else RecordCounts()
