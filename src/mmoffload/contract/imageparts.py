"""Image parts in chat JSON (contract.md section 3): find them anywhere, decode and rewrite them.

These shapes carry an image source ``U``:

- OpenAI chat ``{"type": "image_url", "image_url": {"url": U, ...}}``, or ``"image_url": U``;
- Hugging Face chat templates ``{"type": "image", K: V}`` with ``K`` one of ``image``
  (a URL, or a datasets object below), ``url`` (a URL), ``path`` (a local path or a
  URL) or ``base64`` (base64 image bytes, or a data URL);
- OpenAI Responses ``{"type": "input_image", "image_url": U}``;
- a raw descriptor carrying ``raw_image_data: U`` (or ``raw_image_uri`` / ``raw_uri``);
- a Hugging Face datasets image ``{"bytes": B, "path": P}`` (exactly these keys):
  ``B`` base64 bytes (or a data URL), else ``P`` a local path or URL.

A local path becomes the ``file://`` URI of its absolute path (relative to the
working directory); base64 bytes become a ``data:`` URL.

``find_parts`` walks a JSON value read-only and returns each part with the
container that holds it; ``rewrite_part`` points a part at a new source and
puts it in its canonical shape. ``iter_image_sources`` is the read-only view
the audit uses.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mmoffload.contract.addresses import file_uri, is_local_file_uri, is_object_uri
from mmoffload.errors import BadInputError, PathPart, Where

SourceKind = Literal["data", "file", "remote"]
Shape = Literal[
    "openai",
    "openai_string",
    "hf",
    "responses",
    "descriptor_data",
    "descriptor_uri",
    "hf_datasets",
    "datasets",
]

DESCRIPTOR_DATA_KEY = "raw_image_data"
DESCRIPTOR_URI_KEYS = ("raw_image_uri", "raw_uri")
# The keys of a Hugging Face chat template's image part that may hold its source, in the order read.
HF_SOURCE_KEYS = ("image", "url", "path", "base64")
# A Hugging Face datasets image: its bytes, or the path they were read from.
DATASETS_KEYS = frozenset(("bytes", "path"))
# The data URL header given to bare base64 bytes; the stored file's type is sniffed from the bytes.
_BASE64_HEADER = "data:image/*;base64,"
_URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:")

# `data:` + media type + params; the payload follows the first comma.
_DATA_HEADER = re.compile(r"data:([^;,]*)((?:;[^;,]*)*),", re.IGNORECASE)
# What real producers put into base64: whitespace, URL-safe letters, no padding.
_WHITESPACE = re.compile(r"\s+")
_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")


@dataclass(frozen=True, slots=True)
class ImageSource:
    """One image source found in a JSON value: where it is, the URL/URI string, its kind."""

    path: tuple[PathPart, ...]
    source: str
    kind: SourceKind


@dataclass(frozen=True, slots=True)
class ImagePart:
    """One image part: the object holding it, its shape, and its source.

    ``path`` is the JSON path of the source string itself (for example
    ``$.prompt[0].content[1].image_url.url``).
    """

    container: dict[str, Any]
    shape: Shape
    key: str
    path: tuple[PathPart, ...]
    source: str

    @property
    def kind(self) -> SourceKind:
        return source_kind(self.source)


def source_kind(source: str) -> SourceKind:
    """Classify a source: ``data:`` URL, stored file (local ``file://`` or object store), or remote."""
    if source[:5].lower() == "data:":
        return "data"
    if is_local_file_uri(source) or is_object_uri(source):
        return "file"
    return "remote"


def describe_source(source: str) -> str:
    """Name a source's kind for an error message, e.g. "`https:` URL" or "file URI on host `h`"."""
    scheme, colon, _ = source.partition(":")
    if not colon or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        return "a string that is no URL"
    if scheme.lower() == "file":
        return f"a `file:` URI on another host (`{source[:60]}`)"
    return f"a remote `{scheme.lower()}:` URL (`{source[:60]}`)"


def iter_image_sources(value: Any) -> Iterator[ImageSource]:
    """Yield every image source in a JSON value, in document order (read-only).

    Raises:
        BadInputError: an image part of an unknown shape, naming its JSON path.
    """
    for part in find_parts(value):
        yield ImageSource(part.path, part.source, part.kind)


def find_parts(value: Any, where: Where | None = None) -> list[ImagePart]:
    """Return every image part in a JSON value, in document order, without changing it.

    Raises:
        BadInputError: an image part of an unknown shape (``where`` gets its JSON path).
    """
    parts: list[ImagePart] = []
    _walk(value, (), parts, where or Where())
    return parts


def _walk(value: Any, path: tuple[PathPart, ...], parts: list[ImagePart], where: Where) -> None:
    if isinstance(value, dict):
        consumed = _match(value, path, parts, where)
        for key, child in value.items():
            if key != consumed and isinstance(child, (dict, list)):
                _walk(child, (*path, key), parts, where)
    elif isinstance(value, list):
        for index, child in enumerate(value):
            if isinstance(child, (dict, list)):
                _walk(child, (*path, index), parts, where)


def _match(
    node: dict[str, Any], path: tuple[PathPart, ...], parts: list[ImagePart], where: Where
) -> str | None:
    """Append the image part ``node`` is, if any; return the key that holds its source."""
    kind = node.get("type")
    if kind == "image_url":
        image_url = node.get("image_url")
        if isinstance(image_url, dict) and isinstance(image_url.get("url"), str):
            parts.append(
                ImagePart(node, "openai", "image_url", (*path, "image_url", "url"), image_url["url"])
            )
        elif isinstance(image_url, str):
            parts.append(ImagePart(node, "openai_string", "image_url", (*path, "image_url"), image_url))
        else:
            raise _unknown_shape(node, '`image_url` as `{"url": string}` or a string', path, where)
        return "image_url"
    if kind == "image":
        key = next((key for key in HF_SOURCE_KEYS if node.get(key) is not None), None)
        value = node.get(key) if key is not None else None
        if key == "image" and isinstance(value, dict) and value.keys() == DATASETS_KEYS:
            found = _datasets_source(value)
            if found is None:
                raise _unknown_shape(node, "`image` with `bytes` or `path` set", path, where)
            parts.append(ImagePart(node, "hf_datasets", key, (*path, key, found[0]), found[1]))
            return key
        if key is None or not isinstance(value, str):
            expected = "one of `image`, `url`, `path`, `base64` as a string (or `image` as `{bytes, path}`)"
            raise _unknown_shape(node, expected, path, where)
        source = _path_source(value) if key == "path" else _base64_source(value) if key == "base64" else value
        parts.append(ImagePart(node, "hf", key, (*path, key), source))
        return key
    if kind == "input_image":
        if not isinstance(node.get("image_url"), str):
            raise _unknown_shape(node, "`image_url` as a URL string", path, where)
        parts.append(ImagePart(node, "responses", "image_url", (*path, "image_url"), node["image_url"]))
        return "image_url"
    if DESCRIPTOR_DATA_KEY in node:
        data = node[DESCRIPTOR_DATA_KEY]
        if not isinstance(data, str):
            raise _unknown_shape(node, f"`{DESCRIPTOR_DATA_KEY}` as a data URL string", path, where)
        parts.append(
            ImagePart(node, "descriptor_data", DESCRIPTOR_DATA_KEY, (*path, DESCRIPTOR_DATA_KEY), data)
        )
        # The inline data is the image; a URI beside it is superseded by the offload.
        return DESCRIPTOR_DATA_KEY
    for key in DESCRIPTOR_URI_KEYS:
        if isinstance(uri := node.get(key), str):
            parts.append(ImagePart(node, "descriptor_uri", key, (*path, key), uri))
    if node.keys() == DATASETS_KEYS and (found := _datasets_source(node)) is not None:
        parts.append(ImagePart(node, "datasets", found[0], (*path, found[0]), found[1]))
        return found[0]
    return None


def _datasets_source(value: dict[str, Any]) -> tuple[str, str] | None:
    """Return the key and source of a datasets image (bytes first), or None when neither is a string."""
    if isinstance(value["bytes"], str):
        return "bytes", _base64_source(value["bytes"])
    if isinstance(value["path"], str):
        return "path", _path_source(value["path"])
    return None


def _path_source(path: str) -> str:
    """A URL stays itself; a local path becomes its absolute ``file://`` URI."""
    return path if _URL_SCHEME.match(path) else file_uri(Path(path))


def _base64_source(data: str) -> str:
    """A data URL stays itself; bare base64 bytes get a data URL header."""
    return data if data[:5].lower() == "data:" else _BASE64_HEADER + data


def _unknown_shape(
    node: dict[str, Any], expected: str, path: tuple[PathPart, ...], where: Where
) -> BadInputError:
    found = ", ".join(f"`{key}`" for key in node) or "no keys"
    return BadInputError(
        f"Image part of unknown shape: expected {expected} with `type` `{node.get('type')}`, got keys {found}",
        where.at(path=path),
    )


def rewrite_part(part: ImagePart, uri: str) -> bool:
    """Point ``part`` at ``uri`` and give it its canonical shape; return True if anything changed.

    Canonical shapes: OpenAI chat ``{"type": "image_url", "image_url": {"url": ...}}``
    (sibling keys kept; every Hugging Face chat shape becomes it), Responses unchanged,
    a descriptor with ``raw_image_uri`` and no ``raw_image_data``, a datasets image
    ``{"bytes": null, "path": URI}``. Key order is kept; a renamed key stays where it was.
    """
    node = part.container
    if part.shape == "openai":
        changed = node["image_url"]["url"] != uri
        node["image_url"]["url"] = uri
        return changed
    if part.shape == "openai_string":
        node["image_url"] = {"url": uri}
        return True
    if part.shape in ("hf", "hf_datasets"):
        _replace_items(node, {"type": ("type", "image_url"), part.key: ("image_url", {"url": uri})})
        return True
    if part.shape == "datasets":
        changed = node["bytes"] is not None or node["path"] != uri
        _replace_items(node, {"bytes": ("bytes", None), "path": ("path", uri)})
        return changed
    if part.shape == "descriptor_data":
        # The inline data becomes the URI, in place; stale URIs (and the old synonym) go.
        _replace_items(
            node, {DESCRIPTOR_DATA_KEY: ("raw_image_uri", uri), "raw_image_uri": None, "raw_uri": None}
        )
        return True
    changed = node[part.key] != uri
    node[part.key] = uri
    return changed


def _replace_items(node: dict[str, Any], changes: dict[str, tuple[str, Any] | None]) -> None:
    """Rename/replace keys of ``node`` in place, keeping order (None in ``changes`` drops a key)."""
    items = list(node.items())
    node.clear()
    for key, value in items:
        if key not in changes:
            node[key] = value
        elif (change := changes[key]) is not None:
            node[change[0]] = change[1]


def needs_reshape(part: ImagePart) -> bool:
    """True when a part is not in its canonical shape (it changes even if its source does not)."""
    if part.shape == "datasets":
        return part.key == "bytes" or part.container["path"] != part.source
    return part.shape in ("openai_string", "hf", "hf_datasets")


def decode_data_url(url: str, where: Where | None = None) -> bytes:
    """Return the bytes of a base64 ``data:image/...`` URL.

    Accepts any case in the media type, the standard and URL-safe alphabets,
    missing padding and embedded whitespace; rejects anything else.

    Raises:
        BadInputError: not a base64 image data URL, or a payload that does not decode.
    """
    header = _DATA_HEADER.match(url)
    if header is None:
        raise BadInputError(f"Expected a data URL `data:image/<type>;base64,...`, got `{url[:40]}`", where)
    media_type, params = header.group(1).strip().lower(), header.group(2).lower()
    if not media_type.startswith("image/"):
        raise BadInputError(
            f"Expected an image media type in the data URL, got `{media_type or 'none'}`", where
        )
    if not params.replace(" ", "").endswith(";base64"):
        raise BadInputError(
            f"Expected a base64 data URL, got parameters `{header.group(2) or 'none'}`", where
        )
    payload = url[header.end() :]
    try:
        # Fast path: clean standard base64, as almost every producer writes it.
        return binascii.a2b_base64(payload, strict_mode=True)
    except (binascii.Error, ValueError):
        pass
    cleaned = _WHITESPACE.sub("", payload).translate(_URLSAFE_TO_STANDARD).rstrip("=")
    try:
        return binascii.a2b_base64(cleaned + "=" * (-len(cleaned) % 4), strict_mode=True)
    except (binascii.Error, ValueError) as exc:
        raise BadInputError(f"Expected base64 image data, got an undecodable payload ({exc})", where) from exc
