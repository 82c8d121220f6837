"""Image fields of JSON bodies: base64, raw or as a data URI, into bytes."""

from __future__ import annotations

import base64
import binascii
import re

from ..errors import InvalidRequest

_DATA_URI = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,", re.I)


def decode_image_field(value: str, index: int) -> bytes:
    """The bytes of one image field; InvalidRequest naming the field, never echoing it."""
    data = value
    if value[:5].lower() == "data:":
        m = _DATA_URI.match(value)
        if m is None:
            raise InvalidRequest(f"image {index}: a data URI must be base64 ('data:image/...;base64,')")
        mime = (m.group("mime") or "").lower()
        if not mime.startswith("image/"):
            raise InvalidRequest(f"image {index}: data URI type {mime or 'none'!r} is not an image")
        data = value[m.end() :]
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"image {index}: not valid base64") from None
    if not raw:
        raise InvalidRequest(f"image {index}: empty")
    return raw
