"""Parquet streamed one row group at a time, and the Arrow shapes of datasets' images.

Imported only by the stages that read Parquet (``offload``, ``inline``): pyarrow is the
``parquet`` extra, and the light core never imports it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO, Protocol

from mmoffload.errors import BadInputError, Where
from mmoffload.extras import require
from mmoffload.io.remote import is_url

if TYPE_CHECKING:
    import pyarrow as pa

pa = require("pyarrow", "Reading Parquet")
pc = require("pyarrow.compute", "Reading Parquet")
pq = require("pyarrow.parquet", "Reading Parquet")

# Schema metadata key of datasets' features JSON.
DATASETS_KEY = b"huggingface"
_IMAGE_FEATURE = {"_type": "Image"}
_IMAGE_FIELDS = frozenset(("bytes", "path"))


class BatchWork(Protocol):
    """The work on a table: its output schema, and each record batch mapped to it."""

    schema: pa.Schema

    def __call__(self, batch: pa.RecordBatch, where: Where, first_row: int) -> pa.RecordBatch: ...


def is_image_struct(kind: pa.DataType) -> bool:
    """Whether ``kind`` is datasets' ``Image`` storage: a struct of exactly ``bytes`` and ``path``."""
    return pa.types.is_struct(kind) and {kind.field(i).name for i in range(kind.num_fields)} == _IMAGE_FIELDS


def is_image_list(kind: pa.DataType) -> bool:
    """Whether ``kind`` is a list of datasets images (verl's ``images`` column)."""
    return (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and is_image_struct(kind.value_type)


def is_binary(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def is_string(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def image_type(binary: pa.DataType | None = None, path: pa.DataType | None = None) -> pa.DataType:
    """datasets' ``Image`` struct; a column of no values (Arrow's ``null`` type) gets typed ones."""
    binary = pa.binary() if binary is None or pa.types.is_null(binary) else binary
    path = pa.string() if path is None or pa.types.is_null(path) else path
    return pa.struct([("bytes", binary), ("path", path)])


def normal_image_type(kind: pa.DataType) -> pa.DataType:
    """The type an image struct (or list of them) is written as: typed ``bytes`` and ``path``."""
    if is_image_struct(kind):
        return image_type(kind.field("bytes").type, kind.field("path").type)
    item = pa.field(kind.value_field.name, normal_image_type(kind.value_type))
    return pa.large_list(item) if pa.types.is_large_list(kind) else pa.list_(item)


def with_image_columns(schema: pa.Schema, columns: dict[str, pa.DataType]) -> pa.Schema:
    """Return ``schema`` with ``columns`` retyped, datasets' features saying ``Image`` for new image ones."""
    metadata = dict(schema.metadata or {})
    features = json.loads(metadata[DATASETS_KEY]) if DATASETS_KEY in metadata else None
    for name, kind in columns.items():
        index = schema.get_field_index(name)
        was = schema.field(index).type
        schema = schema.set(index, schema.field(index).with_type(kind))
        if features is not None and is_image_struct(kind) and not is_image_struct(was):
            named = features.get("info", {}).get("features", {})
            if name in named:
                named[name] = _IMAGE_FEATURE
    if features is not None:
        metadata[DATASETS_KEY] = json.dumps(features).encode()
    return schema.with_metadata(metadata) if metadata else schema


def image_cells(column: pa.Array, values: list[object], kind: pa.DataType, *, paths: bool) -> pa.Array:
    """Rebuild an image struct array with new ``bytes`` (``paths`` False) or new ``path`` values.

    The other field is all null: a stored image has a path and no bytes, an inlined one bytes only.
    """
    bytes_type, path_type = kind.field("bytes").type, kind.field("path").type
    if paths:
        arrays = [pa.nulls(len(column), bytes_type), pa.array(values, path_type)]
    else:
        arrays = [pa.array(values, bytes_type), pa.nulls(len(column), path_type)]
    return pa.StructArray.from_arrays(arrays, fields=list(kind), mask=column.is_null())


def list_items(
    column: pa.Array, first_row: int, where: Where
) -> tuple[pa.Array, Callable[[int], tuple[int, Where]]]:
    """Return a list column's items and, for an item's index, its row number and ``Where``."""
    parents = pc.list_parent_indices(column).to_pylist()
    starts = pc.subtract(column.offsets, column.offsets[0]).to_pylist()

    def row(index: int) -> tuple[int, Where]:
        parent = parents[index]
        path = (*(where.path or ()), index - starts[parent])
        return first_row + parent, where.at(index=first_row + parent, path=path)

    return column.flatten(), row


def rebuild_list(column: pa.Array, items: pa.Array) -> pa.Array:
    """Return ``column`` (a list array) holding ``items`` instead of its own."""
    starts = pc.subtract(column.offsets, column.offsets[0])
    return type(column).from_arrays(starts, items, mask=column.is_null())


def map_row_groups(
    source: str | os.PathLike[str],
    out: BinaryIO,
    plan: Callable[[pa.Schema, pa.RecordBatch | None], BatchWork],
    advance: Callable[[int], None] = lambda _n: None,
) -> None:
    """Stream a Parquet file through ``plan``'s work into ``out``, one row group at a time.

    Each input row group becomes an output row group; the compression of the input's
    first column is kept. Memory is bounded by a row group, whatever the file's size.

    Args:
        source: the Parquet file.
        out: the binary file the output is written to.
        plan: makes the work from the input schema and its first record batch (None when empty).
        advance: called with the compressed bytes of each row group done (progress).

    Raises:
        BadInputError: the file is not Parquet.
    """
    name = os.fspath(source)
    try:
        if is_url(name):  # Parquet seeks to its footer: an fsspec file (seekable), not a stream.
            from mmoffload.io.remote import open_url

            source = open_url(name)  # type: ignore[assignment]
        parquet = pq.ParquetFile(source)
    except (OSError, pa.ArrowException) as exc:
        raise BadInputError(f"Expected a Parquet file: {exc}", Where(file=name)) from exc
    metadata = parquet.metadata
    groups = metadata.num_row_groups
    first = parquet.read_row_group(0).to_batches() if groups else []
    work = plan(parquet.schema_arrow, first[0] if first else None)
    compression = metadata.row_group(0).column(0).compression.lower() if groups else "snappy"
    row = 0
    with pq.ParquetWriter(
        out, work.schema, compression="none" if compression == "uncompressed" else compression
    ) as writer:
        for group in range(groups):
            # The first group was read for the plan; it is let go once done, as every group is.
            read, first = (first if group == 0 else parquet.read_row_group(group).to_batches()), []
            batches = []
            for batch in read:
                batches.append(work(batch, Where(file=name), row))
                row += batch.num_rows
            del read
            table = pa.Table.from_batches(batches, work.schema)
            writer.write_table(table, row_group_size=max(table.num_rows, 1))
            info = metadata.row_group(group)
            advance(sum(info.column(i).total_compressed_size for i in range(info.num_columns)))


def map_table(table: pa.Table, plan: Callable[[pa.Schema, pa.RecordBatch | None], BatchWork]) -> pa.Table:
    """Return an Arrow table mapped through ``plan``'s work, batch by batch."""
    batches = table.to_batches()
    work = plan(table.schema, batches[0] if batches else None)
    out, row = [], 0
    for batch in batches:
        out.append(work(batch, Where(), row))
        row += batch.num_rows
    return pa.Table.from_batches(out, schema=work.schema)


def table_of(table_or_dataset: object) -> tuple[pa.Table, Callable[[pa.Table], object]]:
    """Return the Arrow table of a ``pyarrow.Table`` or ``datasets.Dataset``, and how to wrap a result alike."""
    if isinstance(table_or_dataset, pa.Table):
        return table_or_dataset, lambda table: table
    dataset = table_or_dataset
    # A selected or shuffled Dataset reads its rows through an indices table: apply it first.
    if getattr(dataset, "_indices", None) is not None:
        dataset = dataset.flatten_indices()  # type: ignore[attr-defined]
    from datasets.table import InMemoryTable  # The caller gave a Dataset: datasets is installed.

    # The result's features come from its schema's metadata (which says Image for image columns).
    return dataset.data.table, lambda table: type(dataset)(InMemoryTable(table))  # type: ignore[attr-defined]
