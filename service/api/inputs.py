"""Request bodies, JSON or multipart, into a validated request model and image bytes.

FastAPI parses and validates JSON bodies as usual. A body in any other content type
reaches the route as raw bytes (`JsonOrRaw`), and `read_body` reads it as a form: the
fields are assembled into the JSON-equivalent dict and validated by the same model, so
both encodings fail with the same messages. Image file parts stay raw bytes; only JSON
(and text form fields) carry base64, a data URI or (when enabled) an http(s) URL.

Image sources stay undecoded until the route has checked the request's limits.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Generic, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError, WrapValidator
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..core import Engine
from ..errors import EmptyInput, InvalidRequest, TooManyItems, UnsupportedMediaType
from ..prepare import Base64Image, ImageSource
from .schemas import FormSpec

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
    limit = settings.max_form_parts
    try:
        # The body cap bounds the whole form; a text part may be as large as it.
        parts = await request.form(max_files=limit, max_fields=limit,
                                   max_part_size=settings.max_body_bytes)
    except StarletteHTTPException as e:  # a malformed multipart body, or too many parts
        if str(e.detail).startswith("Too many"):
            raise TooManyItems(f"the form has more than {limit} parts of one kind") from None
        raise InvalidRequest(f"multipart body: {e.detail}") from None
    try:
        for name, part in parts.multi_items():
            field = form.fields.get(name)
            if field is None:
                data[name] = None  # the model refuses it as an extra field
                continue
            value: bytes | str
            if isinstance(part, UploadFile):
                if not field.image:
                    raise InvalidRequest(f"form field {name!r} takes text, not a file")
                value = await part.read()
            else:
                value = part
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
    finally:
        await parts.close()
    return data, sources
