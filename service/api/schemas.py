"""Request and response bodies, with the examples shown at /docs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# A 1x1 red PNG, so every example in /docs runs as is.
RED_PIXEL_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)

Encoding = Literal["float", "base64"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbedRequest(_Strict):
    model: str | None = Field(None, description="a loaded model; default: the first")
    texts: list[str] = Field(default_factory=list)
    images: list[str] = Field(default_factory=list, description="base64, raw or data URI")
    normalize: bool = Field(True, description="unit-length embeddings")
    encoding: Encoding = Field("float", description="base64: little-endian float32 bytes")
    truncate: bool = Field(True, description="false: over-long texts are refused (422)")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [
            {"texts": ["a photo of a cat", "a red circle"], "images": [RED_PIXEL_PNG]}
        ]},
    )

    @model_validator(mode="after")
    def _something(self) -> EmbedRequest:
        if not self.texts and not self.images:
            raise ValueError("give at least one text or image")
        return self


class TextEmbedding(BaseModel):
    embedding: list[float] | str
    n_tokens: int
    truncated: bool


class ImageEmbedding(BaseModel):
    embedding: list[float] | str


class EmbedResponse(BaseModel):
    model: str
    dimension: int
    encoding: Encoding
    texts: list[TextEmbedding]
    images: list[ImageEmbedding]


class ClassifyRequest(_Strict):
    model: str | None = None
    images: list[str] = Field(min_length=1, description="base64, raw or data URI")
    labels: list[str] = Field(min_length=1, max_length=1000)
    templates: list[str] | None = Field(
        None, description="prompts with one '{}' for the label; default: a short ensemble"
    )
    top_k: int | None = Field(None, ge=1, description="labels kept per image; default: all")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [
            {"images": [RED_PIXEL_PNG], "labels": ["red", "green", "blue"], "top_k": 2}
        ]},
    )


class LabelScore(BaseModel):
    label: str
    probability: float = Field(description="softmax over labels of logit_scale x cosine")
    cosine: float


class Classification(BaseModel):
    labels: list[LabelScore]


class ClassifyResponse(BaseModel):
    model: str
    results: list[Classification]


class Inputs(_Strict):
    texts: list[str] = Field(default_factory=list)
    images: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _one_modality(self) -> Inputs:
        if bool(self.texts) == bool(self.images):
            raise ValueError("give either texts or images")
        return self


class SimilarityRequest(_Strict):
    model: str | None = None
    queries: Inputs
    candidates: Inputs

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [
            {"queries": {"images": [RED_PIXEL_PNG]},
             "candidates": {"texts": ["a red square", "a blue square"]}}
        ]},
    )


class SimilarityResponse(BaseModel):
    model: str
    cosine: list[list[float]] = Field(description="queries x candidates")
    logits: list[list[float]] = Field(description="logit_scale x cosine, as CLIP defines it")


class ModelCard(BaseModel):
    name: str
    dimension: int
    image_size: int
    context_length: int
    device: str
    dtype: str
    status: Literal["ready", "loading", "unavailable"]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail
