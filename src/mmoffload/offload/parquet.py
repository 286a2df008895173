"""Offload Parquet files and Arrow tables (datasets, verl, EasyR1 prompt sets), one row group at a time.

Image cells are found in the shapes such sets keep them:

- a datasets ``Image`` struct column ``{bytes, path}``, or a list of them (verl's ``images``);
- a binary column of image bytes: it becomes a datasets ``Image`` struct column (and the
  schema's datasets features say ``Image``), since a path needs somewhere to go;
- a string column of ``data:`` URLs: each becomes the stored file's path;
- nested columns (chat ``messages``, ``prompt``) holding image parts: the JSONL walker's
  parts, each source changed in place, so the column keeps its type.

Stored images become ``{bytes: null, path: PATH}`` with PATH the plain path (an object URL on
an object store), which ``datasets`` decodes and ``PIL.Image.open`` opens. Every other column
and the schema's metadata pass through unchanged. Memory is bounded by one row group.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO

from mmoffload.contract.addresses import sniff_extension
from mmoffload.contract.imageparts import plain_path
from mmoffload.errors import BadInputError, Where
from mmoffload.extras import require
from mmoffload.offload.records import Offloader, OffloadOptions, RecordCounts
from mmoffload.store.backend import open_store

if TYPE_CHECKING:
    import pyarrow as pa

    from mmoffload.store.local import AssetStore
    from mmoffload.store.objects import ObjectStore

pa = require("pyarrow", "Reading Parquet")
pc = require("pyarrow.compute", "Reading Parquet")
pq = require("pyarrow.parquet", "Reading Parquet")

# Schema metadata key of datasets' features JSON.
_DATASETS_KEY = b"huggingface"
_IMAGE_FEATURE = {"_type": "Image"}
_IMAGE_FIELDS = frozenset(("bytes", "path"))


def is_image_struct(kind: pa.DataType) -> bool:
    """Whether ``kind`` is datasets' ``Image`` storage: a struct of exactly ``bytes`` and ``path``."""
    return pa.types.is_struct(kind) and {kind.field(i).name for i in range(kind.num_fields)} == _IMAGE_FIELDS


def _is_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind)


def _is_binary(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _is_string(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _image_type(binary: pa.DataType, path: pa.DataType | None = None) -> pa.DataType:
    """datasets' ``Image`` struct; a column of no paths (Arrow's ``null`` type) gets string ones."""
    binary = pa.binary() if binary is None or pa.types.is_null(binary) else binary
    path = pa.string() if path is None or pa.types.is_null(path) else path
    return pa.struct([("bytes", binary), ("path", path)])


def _normal_image_type(kind: pa.DataType) -> pa.DataType:
    """The type an image struct column is written as: its own, with typed ``bytes`` and ``path``."""
    return _image_type(kind.field("bytes").type, kind.field("path").type)


class TablePlan:
    """What to do with each column of a table (decided once, from the schema and first rows)."""

    def __init__(self, schema: pa.Schema, first: pa.RecordBatch | None) -> None:
        self.kinds: dict[str, str] = {}
        for field in schema:
            kind = field.type
            if is_image_struct(kind):
                self.kinds[field.name] = "image"
            elif _is_list(kind) and is_image_struct(kind.value_type):
                self.kinds[field.name] = "images"
            elif _is_binary(kind) and first is not None and _first_is_image(first.column(field.name)):
                self.kinds[field.name] = "binary"
            elif _is_string(kind):
                self.kinds[field.name] = "data_url"
            elif pa.types.is_nested(kind):
                self.kinds[field.name] = "nested"
        self.schema = self._output_schema(schema)

    def _output_schema(self, schema: pa.Schema) -> pa.Schema:
        """The input schema with binary image columns as datasets ``Image`` structs (features too)."""
        binary = [name for name, kind in self.kinds.items() if kind == "binary"]
        for name, kind in self.kinds.items():
            index = schema.get_field_index(name)
            field = schema.field(index)
            if kind == "binary":
                schema = schema.set(index, field.with_type(_image_type(field.type)))
            elif kind == "image":
                schema = schema.set(index, field.with_type(_normal_image_type(field.type)))
            elif kind == "images":
                item = pa.field(field.type.value_field.name, _normal_image_type(field.type.value_type))
                as_list = pa.large_list(item) if pa.types.is_large_list(field.type) else pa.list_(item)
                schema = schema.set(index, field.with_type(as_list))
        metadata = dict(schema.metadata or {})
        if binary and _DATASETS_KEY in metadata:
            info = json.loads(metadata[_DATASETS_KEY])
            features = info.get("info", {}).get("features", {})
            for name in binary:
                if name in features:
                    features[name] = _IMAGE_FEATURE
            metadata[_DATASETS_KEY] = json.dumps(info).encode()
        return schema.with_metadata(metadata) if metadata else schema


def _first_is_image(column: pa.Array) -> bool:
    """Whether a binary column holds images: its first value sniffs as one."""
    values = column.drop_null()
    return len(values) > 0 and sniff_extension(values[0].as_py()[:16]) is not None


def offload_batch(
    batch: pa.RecordBatch, plan: TablePlan, offloader: Offloader, where: Where, first_row: int
) -> tuple[pa.RecordBatch, RecordCounts]:
    """Offload the image cells of one record batch; return it in the plan's schema and the counts.

    Raises:
        BadInputError: a bad image cell, naming its column, row (``index``) and JSON path.
    """
    counts = RecordCounts(records=batch.num_rows)
    changed: set[int] = set()
    columns = []
    for name, column in zip(batch.schema.names, batch.columns, strict=True):
        kind = plan.kinds.get(name)
        if kind is not None:
            at = where.at(path=(name,))
            column = _COLUMN_WORK[kind](column, offloader, at, first_row, counts, changed)
        columns.append(column)
    counts.records_rewritten = len(changed)
    return pa.RecordBatch.from_arrays(columns, schema=plan.schema), counts


Rows = set[int]


def _image_cells(
    column: pa.Array,
    offloader: Offloader,
    row: Callable[[int], tuple[int, Where]],
    counts: RecordCounts,
    changed: Rows,
) -> pa.Array:
    """Store every ``bytes`` of an image struct array; return it with null bytes and plain paths."""
    blobs_array, paths_array = column.flatten()
    blobs, paths = blobs_array.to_pylist(), paths_array.to_pylist()
    for index, blob in enumerate(blobs):
        if blob:
            number, at = row(index)
            paths[index] = plain_path(offloader.image(blob, at, counts))
            changed.add(number)
        elif paths[index] is not None:
            counts.image_parts += 1
            counts.already_file += 1
    kind = _normal_image_type(column.type)
    arrays = [pa.nulls(len(column), kind.field("bytes").type), pa.array(paths, kind.field("path").type)]
    return pa.StructArray.from_arrays(arrays, fields=list(kind), mask=column.is_null())


def _image_column(column, offloader, where, first_row, counts, changed):  # type: ignore[no-untyped-def]
    def row(index: int) -> tuple[int, Where]:
        return first_row + index, where.at(index=first_row + index)

    return _image_cells(column, offloader, row, counts, changed)


def _images_column(column, offloader, where, first_row, counts, changed):  # type: ignore[no-untyped-def]
    parents = pc.list_parent_indices(column).to_pylist()
    starts = pc.subtract(column.offsets, column.offsets[0])

    def row(index: int) -> tuple[int, Where]:
        parent = parents[index]
        item = index - starts[parent].as_py()
        return first_row + parent, where.at(index=first_row + parent, path=(*where.path, item))

    values = _image_cells(column.flatten(), offloader, row, counts, changed)
    return type(column).from_arrays(starts, values, mask=column.is_null())


def _binary_column(column, offloader, where, first_row, counts, changed):  # type: ignore[no-untyped-def]
    kind = _image_type(column.type)
    paths = pa.array([None] * len(column), pa.string())
    as_structs = pa.StructArray.from_arrays([column, paths], fields=list(kind), mask=column.is_null())
    return _image_column(as_structs, offloader, where, first_row, counts, changed)


def _data_url_column(column, offloader, where, first_row, counts, changed):  # type: ignore[no-untyped-def]
    is_data = pc.starts_with(column, "data:")
    if not pc.any(is_data).as_py():
        return column
    values = column.to_pylist()
    for index in pc.indices_nonzero(pc.fill_null(is_data, False)).to_pylist():
        values[index] = plain_path(
            offloader.data_url(values[index], where.at(index=first_row + index), counts)
        )
        changed.add(first_row + index)
    return pa.array(values, column.type)


def _nested_column(column, offloader, where, first_row, counts, changed):  # type: ignore[no-untyped-def]
    values = column.to_pylist()
    rewritten = False
    for index, value in enumerate(values):
        # The column's name heads the JSON path of every part found in the cell.
        record = {where.path[0]: value}
        found = offloader.record(record, where.at(index=first_row + index, path=None), reshape=False)
        rewrote, found.records, found.records_rewritten = found.records_rewritten, 0, 0
        counts.add(found)  # Records are the table's rows, counted by the caller.
        if rewrote:
            values[index] = record[where.path[0]]
            changed.add(first_row + index)
            rewritten = True
    return pa.array(values, column.type) if rewritten else column


_COLUMN_WORK: dict[str, Callable[..., pa.Array]] = {
    "image": _image_column,
    "images": _images_column,
    "binary": _binary_column,
    "data_url": _data_url_column,
    "nested": _nested_column,
}


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
    dataset = None
    if not isinstance(table, pa.Table):
        # A selected or shuffled Dataset reads its rows through an indices table: apply it first.
        dataset = table.flatten_indices() if getattr(table, "_indices", None) is not None else table
        table = dataset.data.table
    offloader = Offloader(open_store(assets), options)
    batches = table.to_batches()
    plan = TablePlan(table.schema, batches[0] if batches else None)
    out, row = [], 0
    with offloader.store.syncing():
        for batch in batches:
            out.append(offload_batch(batch, plan, offloader, Where(), row)[0])
            row += batch.num_rows
    result = pa.Table.from_batches(out, schema=plan.schema)
    if dataset is None:
        return result
    from datasets.table import InMemoryTable  # The caller gave a Dataset: datasets is installed.

    # Its features come from the schema's metadata, which says Image for every image column.
    return type(dataset)(InMemoryTable(result))


def offload_parquet(
    source: str | os.PathLike[str],
    out: BinaryIO,
    offloader: Offloader,
    advance: Callable[[int], None] = lambda _n: None,
) -> RecordCounts:
    """Offload one Parquet file into ``out``, one row group at a time (memory: one row group).

    Each input row group becomes an output row group; the compression of the input's
    first column is kept.

    Raises:
        BadInputError: the file is not Parquet, or a bad image cell (column, row, JSON path).
    """
    name = os.fspath(source)
    try:
        parquet = pq.ParquetFile(source)
    except (OSError, pa.ArrowException) as exc:
        raise BadInputError(f"Expected a Parquet file: {exc}", Where(file=name)) from exc
    metadata = parquet.metadata
    first = parquet.read_row_group(0).to_batches() if metadata.num_row_groups else []
    plan = TablePlan(parquet.schema_arrow, first[0] if first else None)
    compression = metadata.row_group(0).column(0).compression.lower() if metadata.num_row_groups else "snappy"
    compression = "none" if compression == "uncompressed" else compression
    counts, row = RecordCounts(), 0
    with pq.ParquetWriter(out, plan.schema, compression=compression) as writer:
        for group in range(metadata.num_row_groups):
            batches = []
            for batch in parquet.read_row_group(group).to_batches():
                done, found = offload_batch(batch, plan, offloader, Where(file=name), row)
                batches.append(done)
                counts.add(found)
                row += batch.num_rows
            writer.write_table(pa.Table.from_batches(batches, plan.schema), row_group_size=max(row, 1))
            info = metadata.row_group(group)
            advance(sum(info.column(i).total_compressed_size for i in range(info.num_columns)))
    return counts
