"""Request bodies, JSON or multipart, into a validated request model and image bytes.

FastAPI parses and validates JSON bodies as usual. A body in any other content type
reaches the route as raw bytes (`JsonOrRaw`), and `read_body` reads it as a form: the
whole body is split into its parts in a worker thread (`parse_form`, python-multipart's
parser with every part held in memory, as the body cap already bounds them), and the
fields are assembled into the JSON-equivalent dict and validated by the same model, so
both encodings fail with the same messages. Image file parts stay raw bytes; only JSON
(and text form fields) carry base64, a data URI or (when enabled) an http(s) URL.

Image sources stay undecoded until the route has checked the request's limits.
"""

from __future__ import annotations

import asyncio
import codecs
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Annotated, Generic, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError, WrapValidator
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

from ..core import Engine
from ..errors import EmptyInput, InvalidRequest, TooManyItems, UnsupportedMediaType
from ..prepare import Base64Image, ImageSource
from .schemas import FormSpec

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

_DATA_URI = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,", re.I)
_URL = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.-]*://")  # base64 never holds ':'
# A field whose first characters hold no ':' and that starts with no space is neither a
# URL with a scheme that short nor a data URI: base64, with no regex run and no lowering.
_PLAIN_HEAD = 64

M = TypeVar("M", bound=BaseModel)


def image_source(value: str, index: int) -> Base64Image | str:
    """One image field as the engine takes it: base64 left undecoded (the decode pool
    decodes it, see `service.prepare.Base64Image`), or the URL it holds (a str, fetched
    later). O(1) here beyond the URL and data-URI prefixes; InvalidRequest naming the
    field, never echoing it."""
    if ":" not in value[:_PLAIN_HEAD] and not value[:1].isspace():
        return Base64Image(value)  # the common case: base64 never holds ':'
    if _URL.match(value):
        return value.strip()
    if value[:5].lower() == "data:":
        m = _DATA_URI.match(value)
        if m is None:
            raise InvalidRequest(f"image {index}: a data URI must be base64 ('data:image/...;base64,')")
        mime = (m.group("mime") or "").lower()
        if not mime.startswith("image/"):
            raise InvalidRequest(f"image {index}: data URI type {mime or 'none'!r} is not an image")
        return Base64Image(value, m.end())
    return Base64Image(value)


def image_sources(sources: Sequence[bytes | str]) -> list[ImageSource | str]:
    """File bytes as they are, text fields as `image_source` reads them."""
    out: list[ImageSource | str] = []
    for i, s in enumerate(sources):
        if isinstance(s, str):
            out.append(image_source(s, i))
        elif not s:
            raise EmptyInput(f"image {i} is empty")
        else:
            out.append(s)
    return out


async def load_images(engine: Engine, sources: Sequence[bytes | str]) -> list[ImageSource]:
    """Every image's bytes, or its base64 for the decode pool; URLs fetched."""
    return await engine.load_images(image_sources(sources))


def _raw_passes(value: object, handler):
    # A non-JSON body arrives as bytes: leave it to read_body instead of failing here.
    return value if isinstance(value, bytes) else handler(value)


# The request model as a JSON body (documented, validated by FastAPI), or the raw bytes
# of a body in another content type.
JsonOrRaw = Annotated[M, WrapValidator(_raw_passes)]


@dataclass
class Decoded(Generic[M]):
    body: M
    # Undecoded sources by dotted path in the body ("images", "queries.images"): base64
    # strings, data URIs or URLs from JSON and text fields, bytes from file parts.
    images: dict[str, list[bytes | str]]


def _images(body: BaseModel, path: str) -> list[bytes | str]:
    """A copy of the image field at dotted `path` ("queries.images") of a JSON body."""
    obj: object = body
    for key in path.split("."):
        obj = getattr(obj, key)
    assert isinstance(obj, list)  # an image field is a list[str] (schemas.Images)
    return list(obj)


async def read_body(request: Request, raw: M | bytes, model: type[M], form: FormSpec) -> Decoded[M]:
    if isinstance(raw, BaseModel):
        return Decoded(raw, {p: _images(raw, p) for p in form.image_paths})
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "multipart/form-data":
        raise UnsupportedMediaType("the body must be application/json or multipart/form-data")
    data, sources = await _read_form(request, form)
    try:
        body = model.model_validate(data)
    except ValidationError as e:
        # Located like FastAPI's own JSON errors, so both encodings read the same.
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in e.errors()]
        ) from None
    return Decoded(body, sources)


async def _read_form(request: Request, form: FormSpec) -> tuple[dict, dict[str, list]]:
    """The JSON-equivalent body, with image files as placeholders, and the image sources."""
    data: dict = {}
    sources: dict[str, list[bytes | str]] = {p: [] for p in form.image_paths}
    settings = request.app.state.settings
    body = await request.body()
    content_type = request.headers.get("content-type", "")
    # Off the loop whatever the size: python-multipart reads each part's headers a byte
    # at a time in Python, so even a two-field form costs more there than the hop.
    parts = await asyncio.get_running_loop().run_in_executor(None, partial(
        parse_form, body, content_type, max_parts=settings.max_form_parts,
        max_part_size=settings.max_body_bytes))
    for part in parts:
        name = part.name
        field = form.fields.get(name)
        if field is None:
            data[name] = None  # the model refuses it as an extra field
            continue
        value = part.value
        if part.filename is not None and not field.image:
            raise InvalidRequest(f"form field {name!r} takes text, not a file")
        if field.image:
            sources[field.path].append(value)
            value = value if isinstance(value, str) else ""  # the model checks the count
        *parents, key = field.path.split(".")
        target = data
        for p in parents:
            target = target.setdefault(p, {})
        if field.many:
            target.setdefault(key, []).append(value)
        elif key in target:
            raise InvalidRequest(f"form field {name!r} is given more than once")
        else:
            target[key] = value
    return data, sources


@dataclass(frozen=True, slots=True)
class FormPart:
    name: str
    filename: str | None  # a part with a filename is a file, whatever its content type
    value: bytes | str  # a file's bytes; a text field's text


def parse_form(body: bytes, content_type: str, *, max_parts: int,
               max_part_size: int) -> list[FormPart]:
    """A whole multipart/form-data body as its parts, in order, with no temporary files.

    Read as Starlette reads a form: the boundary and charset (default UTF-8; bytes that
    do not decode are read as latin-1) come from the request's Content-Type, a part's
    name and filename from its Content-Disposition. At most `max_parts` files and
    `max_parts` text fields (TooManyItems); a text field of at most `max_part_size`
    bytes; anything malformed is InvalidRequest("multipart body: ...").
    """
    _, params = parse_options_header(content_type)
    charset = params.get(b"charset", b"utf-8").decode("latin-1")
    try:
        charset = codecs.lookup(charset).name
    except LookupError:
        charset = "latin-1"
    boundary = params.get(b"boundary")
    if boundary is None:
        raise InvalidRequest("multipart body: Missing boundary in multipart.")
    collector = _FormCollector(charset, max_parts, max_part_size)
    try:
        parser = MultipartParser(boundary, collector.callbacks())
        parser.write(body)
        parser.finalize()
    except FormParserError:
        raise InvalidRequest("multipart body: Invalid multipart data.") from None
    return collector.parts


def _decode(raw: bytes, charset: str) -> str:
    try:
        return raw.decode(charset)
    except UnicodeDecodeError:
        return raw.decode("latin-1")


class _FormCollector:
    """python-multipart's callbacks for one body: each finished part as a FormPart."""

    def __init__(self, charset: str, max_parts: int, max_part_size: int) -> None:
        self.charset = charset
        self.max_parts = max_parts
        self.max_part_size = max_part_size
        self.parts: list[FormPart] = []
        self.files = self.fields = 0
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._reset_part()

    def _reset_part(self) -> None:
        self._name = ""
        self._filename: str | None = None
        self._chunks: list[bytes] = []  # one, when the part's bytes lie in one write()
        self._size = 0

    def callbacks(self) -> MultipartCallbacks:
        return {"on_part_begin": self.on_part_begin, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished}

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._reset_part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)  # the last one counts
        self._header_name.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name")
        if name is None:
            raise InvalidRequest('multipart body: The Content-Disposition header field "name" '
                                 "must be provided.")
        self._name = _decode(name, self.charset)
        filename = options.get(b"filename")
        if filename is not None:
            self.files += 1
            if self.files > self.max_parts:
                raise TooManyItems(f"the form has more than {self.max_parts} parts of one kind")
            self._filename = _decode(filename, self.charset)
        else:
            self.fields += 1
            if self.fields > self.max_parts:
                raise TooManyItems(f"the form has more than {self.max_parts} parts of one kind")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._size += end - start
        if self._filename is None and self._size > self.max_part_size:
            raise InvalidRequest("multipart body: Part exceeded maximum size of "
                                 f"{self.max_part_size // 1024}KB.")
        self._chunks.append(data[start:end])

    def on_part_end(self) -> None:
        raw = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        value = raw if self._filename is not None else _decode(raw, self.charset)
        self.parts.append(FormPart(self._name, self._filename, value))
