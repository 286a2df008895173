"""Parquet rewritten column by column, one row group at a time, and the Arrow shapes of datasets' images.

Imported only by the stages that read Parquet (``offload``, ``inline``): pyarrow is the
``parquet`` extra, and the light core never imports it.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO, Generic, Protocol, Self, TypeVar

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

# For an item's index in a flattened column: its row number and where it is.
Row = Callable[[int], tuple[int, Where]]
# How a planned column is rewritten: (column, where, first row number, rows changed so far) to column.
Rewrite = Callable[[pa.Array, Where, int, set[int]], pa.Array]


class RowCounts(Protocol):
    """What a stage counts as it rewrites rows: records are rows; other figures are the stage's own."""

    records: int
    records_rewritten: int

    def add(self, other: Self) -> None: ...


Counts = TypeVar("Counts", bound=RowCounts)


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


def list_items(column: pa.Array, first_row: int, where: Where) -> tuple[pa.Array, Row]:
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


class ColumnRewriter(ABC, Generic[Counts]):
    """Rewrite the image cells of record batches, with a column plan decided once per table.

    What the Parquet stages share: datasets image columns (and lists of them), string columns
    and nested (chat) columns are planned from the schema, each batch's planned columns are
    rewritten, and its rows counted. A stage says what differs: how an image struct array's
    cells change, which strings it rewrites and into what, and how one record is rewritten.

    Attributes:
        schema: the output schema.
        counts: what was done so far (records are rows).
    """

    def __init__(self, schema: pa.Schema, first: pa.RecordBatch | None, counts: Counts) -> None:
        self.counts = counts
        self.rewrites: dict[str, Rewrite] = {}
        retyped: dict[str, pa.DataType] = {}
        for field in schema:
            if (planned := self.plan_column(field, first)) is not None:
                self.rewrites[field.name], output_type = planned
                if output_type is not None:
                    retyped[field.name] = output_type
        self.schema = with_image_columns(schema, retyped)

    def plan_column(
        self, field: pa.Field, first: pa.RecordBatch | None
    ) -> tuple[Rewrite, pa.DataType | None] | None:
        """Return how a column is rewritten and its output type (None: its own), or None to keep it.

        Args:
            field: the column's field in the input schema.
            first: the table's first record batch (None when empty), for a plan that looks at values.
        """
        if is_image_struct(field.type) or is_image_list(field.type):
            rewrite = self._images if is_image_list(field.type) else self._image
            return rewrite, normal_image_type(field.type)
        if is_string(field.type):
            return self._strings, None
        if pa.types.is_nested(field.type):
            return self._nested, None
        return None

    def __call__(self, batch: pa.RecordBatch, where: Where, first_row: int) -> pa.RecordBatch:
        """Rewrite one batch's planned columns; return it in the output schema."""
        self.counts.records += batch.num_rows
        changed: set[int] = set()
        columns = []
        for name, column in zip(batch.schema.names, batch.columns, strict=True):
            if (rewrite := self.rewrites.get(name)) is not None:
                column = rewrite(column, where.at(path=(name,)), first_row, changed)
            columns.append(column)
        self.counts.records_rewritten += len(changed)
        return pa.RecordBatch.from_arrays(columns, schema=self.schema)

    @abstractmethod
    def rewrite_image_cells(self, column: pa.Array, row: Row, changed: set[int]) -> pa.Array:
        """Return an image struct array rewritten (see ``image_cells``).

        ``row`` gives an item's row number and ``Where``; each row whose cell changed goes in ``changed``.
        """

    @abstractmethod
    def strings_to_rewrite(self, column: pa.Array) -> pa.Array:
        """Return which cells of a string column the stage rewrites: a boolean array (null: no)."""

    @abstractmethod
    def rewrite_string(self, value: str, where: Where) -> str:
        """Return what a string cell that ``strings_to_rewrite`` picked becomes."""

    @abstractmethod
    def rewrite_record(self, record: dict[str, Any], where: Where) -> Counts:
        """Rewrite the image parts of a one-key record (a nested cell) in place, keeping its shape."""

    def _image(self, column: pa.Array, where: Where, first_row: int, changed: set[int]) -> pa.Array:
        return self.rewrite_image_cells(
            column, lambda i: (first_row + i, where.at(index=first_row + i)), changed
        )

    def _images(self, column: pa.Array, where: Where, first_row: int, changed: set[int]) -> pa.Array:
        items, row = list_items(column, first_row, where)
        return rebuild_list(column, self.rewrite_image_cells(items, row, changed))

    def _strings(self, column: pa.Array, where: Where, first_row: int, changed: set[int]) -> pa.Array:
        picked = pc.fill_null(self.strings_to_rewrite(column), False)
        if not pc.any(picked).as_py():
            return column
        values = column.to_pylist()
        for index in pc.indices_nonzero(picked).to_pylist():
            values[index] = self.rewrite_string(values[index], where.at(index=first_row + index))
            changed.add(first_row + index)
        return pa.array(values, column.type)

    def _nested(self, column: pa.Array, where: Where, first_row: int, changed: set[int]) -> pa.Array:
        name = where.path[0]  # type: ignore[index]
        values, rewritten = column.to_pylist(), False
        for index, value in enumerate(values):
            record = {name: value}  # The column's name heads the JSON path of every part in the cell.
            found = self.rewrite_record(record, where.at(index=first_row + index, path=None))
            # The record's own counts are this row's: rows are counted once, by the batch.
            rewrote, found.records, found.records_rewritten = found.records_rewritten, 0, 0
            self.counts.add(found)
            if rewrote:
                values[index], rewritten = record[name], True
                changed.add(first_row + index)
        return pa.array(values, column.type) if rewritten else column


Rewriter = TypeVar("Rewriter", bound=ColumnRewriter[Any])


def map_row_groups(
    source: str | os.PathLike[str],
    out: BinaryIO,
    plan: Callable[[pa.Schema, pa.RecordBatch | None], Rewriter],
    advance: Callable[[int], None] = lambda _n: None,
) -> Rewriter:
    """Stream a Parquet file through ``plan``'s rewriter into ``out``, one row group at a time.

    Each input row group becomes an output row group; the compression of the input's
    first column is kept. Memory is bounded by a row group, whatever the file's size.

    Args:
        source: the Parquet file.
        out: the binary file the output is written to.
        plan: makes the rewriter from the input schema and its first record batch (None when empty).
        advance: called with the compressed bytes of each row group done (progress).

    Returns:
        The rewriter, its counts saying what was done.

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
    rewriter = plan(parquet.schema_arrow, first[0] if first else None)
    compression = metadata.row_group(0).column(0).compression.lower() if groups else "snappy"
    row = 0
    with pq.ParquetWriter(
        out, rewriter.schema, compression="none" if compression == "uncompressed" else compression
    ) as writer:
        for group in range(groups):
            # The first group was read for the plan; it is let go once done, as every group is.
            read, first = (first if group == 0 else parquet.read_row_group(group).to_batches()), []
            batches = []
            for batch in read:
                batches.append(rewriter(batch, Where(file=name), row))
                row += batch.num_rows
            del read
            table = pa.Table.from_batches(batches, rewriter.schema)
            writer.write_table(table, row_group_size=max(table.num_rows, 1))
            info = metadata.row_group(group)
            advance(sum(info.column(i).total_compressed_size for i in range(info.num_columns)))
    return rewriter


def map_table(
    table: pa.Table, plan: Callable[[pa.Schema, pa.RecordBatch | None], ColumnRewriter[Any]]
) -> pa.Table:
    """Return an Arrow table mapped through ``plan``'s rewriter, batch by batch."""
    batches = table.to_batches()
    rewriter = plan(table.schema, batches[0] if batches else None)
    out, row = [], 0
    for batch in batches:
        out.append(rewriter(batch, Where(), row))
        row += batch.num_rows
    return pa.Table.from_batches(out, schema=rewriter.schema)


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
