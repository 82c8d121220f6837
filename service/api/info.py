"""`GET /v1/limits`: the request limits this server enforces, so a client can split a
long list into requests the server accepts instead of guessing (clip_client reads it)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from ..settings import Settings
from .schemas import ClassifyRequest


class LimitsCard(BaseModel):
    max_items_per_request: int = Field(
        description="texts + images (+ labels + templates) in one request")
    max_body_bytes: int = Field(description="a request body's size, base64 images included")
    max_text_chars: int = Field(description="per text, label or template")
    max_image_pixels: int = Field(description="width x height of one image")
    max_labels: int = Field(description="labels in one /classify request")


def _max_labels() -> int:
    # The schema's own bound, so the two cannot drift apart.
    for m in ClassifyRequest.model_fields["labels"].metadata:
        if (n := getattr(m, "max_length", None)) is not None:
            return int(n)
    raise RuntimeError("ClassifyRequest.labels has no max_length")


info = APIRouter()


@info.get("/v1/limits", response_model=LimitsCard)
async def limits(request: Request) -> LimitsCard:
    s: Settings = request.app.state.settings
    return LimitsCard(max_items_per_request=s.max_items_per_request,
                      max_body_bytes=s.max_body_bytes, max_text_chars=s.max_text_chars,
                      max_image_pixels=s.max_image_pixels, max_labels=_max_labels())
