"""Request and response bodies, with the examples shown at /docs."""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Annotated, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, model_validator

# A 1x1 red PNG, so every example in /docs runs as is.
RED_PIXEL_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)

Encoding = Literal["float", "base64"]


class _ImageMarker:
    """Marks a field of images: base64, a data URI or a URL in JSON; in a multipart form
    also file parts (see `FormSpec.of`)."""


# A list of image sources.
Images = Annotated[list[str], _ImageMarker()]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbedRequest(_Strict):
    model: str | None = Field(None, description="a loaded model; default: the first")
    texts: list[str] = Field(default_factory=list)
    images: Images = Field(default_factory=list, description="base64, raw or data URI")
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
    images: Images = Field(min_length=1, description="base64, raw or data URI")
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
    probability: float = Field(description=(
        "softmax over the labels of logit_scale x cosine; for models whose scoring is "
        "'sigmoid' (SigLIP, see /v1/models), sigmoid(logit_scale x cosine + logit_bias) per "
        "label, independent of the other labels (scores need not sum to 1)"))
    cosine: float


class Classification(BaseModel):
    labels: list[LabelScore]


class ClassifyResponse(BaseModel):
    model: str
    results: list[Classification]


class Inputs(_Strict):
    texts: list[str] = Field(default_factory=list)
    images: Images = Field(default_factory=list)

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


class OpenAIEmbeddingRequest(_Strict):
    """OpenAI's embeddings request, plus `modality` for images."""

    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string or a list of strings; token arrays are refused (400): "
                    "CLIP reads its own tokens, not OpenAI's"
    )
    model: str | None = Field(None, description="a loaded model; default: the first")
    encoding_format: Encoding = Field("float", description="base64: little-endian float32")
    dimensions: int | None = Field(None, ge=1, description="if given, the model's dimension")
    user: str | None = Field(None, description="accepted and ignored")
    modality: Literal["text", "image"] = Field(
        "text", description="not OpenAI's: image reads each input as base64 or a data URI"
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"input": ["a photo of a cat", "a red circle"]}]},
    )

    @model_validator(mode="after")
    def _something(self) -> OpenAIEmbeddingRequest:
        if isinstance(self.input, list) and not self.input:
            raise ValueError("input must not be empty")
        return self


class OpenAIEmbedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class OpenAIUsage(BaseModel):
    prompt_tokens: int = Field(description="CLIP tokens, start and end included; 0 for images")
    total_tokens: int


class OpenAIEmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class ModelCard(BaseModel):
    name: str
    dimension: int
    image_size: int
    context_length: int
    device: str  # the devices, comma-separated: "cuda:0", or "cuda:0,cuda:1"
    devices: list[str]  # one per replica: the model serves on each (see CLIP_DEVICE)
    dtype: str
    engine: str  # torch; null: embeddings hashed from the inputs, meaningless (CLIP_ENGINE)
    status: Literal["ready", "loading", "unavailable"]
    # SHA-256 of the weights and preprocessing (clip_core.moderation.model_fingerprint),
    # as /moderate answers name it; null for a model that did not load.
    fingerprint: str | None = None
    # How /classify scores labels: a softmax over them (CLIP) or an independent sigmoid
    # per label (SigLIP); None for a model that did not load.
    scoring: Literal["softmax", "sigmoid"] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


# ---- multipart/form-data: the same request models, field by field ----

# OpenAPI type of one form value, by the field's Python type.
_OPENAPI_TYPES: dict[type, str] = {str: "string", bool: "boolean", int: "integer",
                                   float: "number"}


@dataclass(frozen=True)
class FormField:
    path: str  # where its values go in the JSON-equivalent body, dotted
    many: bool = False  # repeatable; the body gets a list
    image: bool = False  # file parts (raw bytes), or text parts in base64
    type: str = "string"  # OpenAPI type of one value
    required: bool = False


@dataclass(frozen=True)
class FormSpec:
    fields: dict[str, FormField]

    @classmethod
    def of(cls, model: type[BaseModel], nested: dict[str, str] | None = None) -> FormSpec:
        """The form fields of a request model: one per JSON field, named as in JSON; a
        field holding a model (`{"queries": {"texts": ...}}`) gives one form field per
        field of its own, named with the prefix `nested` gives it (`query_texts`)."""
        nested = nested or {}
        fields: dict[str, FormField] = {}
        for name, info in model.model_fields.items():
            many, one = _unwrap(info.annotation, f"{model.__name__}.{name}")
            if isinstance(one, type) and issubclass(one, BaseModel):
                if many or name not in nested:
                    raise TypeError(f"{model.__name__}.{name}: a nested model needs a form "
                                    f"prefix, and cannot be a list")
                for sub, f in cls.of(one).fields.items():
                    fields[f"{nested[name]}_{sub}"] = FormField(
                        f"{name}.{f.path}", f.many, f.image, f.type,
                        required=info.is_required() and f.required)
                continue
            fields[name] = FormField(
                name, many=many,
                image=any(isinstance(m, _ImageMarker) for m in info.metadata),
                type=_openapi_type(one, f"{model.__name__}.{name}"),
                required=info.is_required())
        return cls(fields)

    @property
    def image_paths(self) -> list[str]:
        return [f.path for f in self.fields.values() if f.image]

    def openapi(self) -> dict:
        """`openapi_extra` adding the multipart form beside FastAPI's JSON body."""
        props = {}
        for name, f in self.fields.items():
            one = {"type": "string", "format": "binary"} if f.image else {"type": f.type}
            props[name] = {"type": "array", "items": one} if f.many else one
        schema: dict = {"type": "object", "properties": props}
        if required := [n for n, f in self.fields.items() if f.required]:
            schema["required"] = required
        return {"requestBody": {"content": {"multipart/form-data": {"schema": schema}}}}


def _unwrap(annotation: object, where: str) -> tuple[bool, object]:
    """(repeatable, the type of one value) of a field's annotation; None is dropped from
    an optional field (a form leaves such a field out)."""
    if get_origin(annotation) in (Union, types.UnionType):
        kinds = [a for a in get_args(annotation) if a is not type(None)]
        if len(kinds) != 1:
            raise TypeError(f"{where}: a form field takes one type, not {annotation}")
        annotation = kinds[0]
    if get_origin(annotation) is list:
        return True, get_args(annotation)[0]
    return False, annotation


def _openapi_type(one: object, where: str) -> str:
    if get_origin(one) is Literal:
        kinds = {type(v) for v in get_args(one)}
        one = kinds.pop() if len(kinds) == 1 else None
    if not isinstance(one, type) or one not in _OPENAPI_TYPES:
        raise TypeError(f"{where}: no form type for {one}")
    return _OPENAPI_TYPES[one]


# ---- moderation (service.moderation) ----


class ModerateRequest(_Strict):
    policy: str = Field(description="a loaded policy (GET /v1/policies); it names the model")
    categories: list[str] | None = Field(
        None, min_length=1, description="a subset of the policy's categories; default: all")
    texts: list[str] = Field(default_factory=list)
    images: Images = Field(default_factory=list, description="base64, raw or data URI")
    truncate: bool = Field(True, description="false: over-long texts are refused (422)")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [
            {"policy": "shapes", "images": [RED_PIXEL_PNG], "texts": ["a red circle"]}
        ]},
    )

    @model_validator(mode="after")
    def _something(self) -> ModerateRequest:
        if not self.texts and not self.images:
            raise ValueError("give at least one text or image")
        return self


class CategoryResult(BaseModel):
    score: float = Field(description="prompts: logit_scale x cosine margin; head: probability")
    threshold: float
    flagged: bool = Field(description="score >= threshold")


class ModerationItem(BaseModel):
    flagged: bool | None = Field(description="any category flagged; null when `error`")
    categories: dict[str, CategoryResult] = Field(
        description="the categories asked for that apply to the item's kind")
    error: ErrorDetail | None = Field(
        None, description="an image that could not be used fails its own item only")


class ModerateResponse(BaseModel):
    policy: str
    version: int
    model: str
    fingerprint: str = Field(description="the model's weights and preprocessing, SHA-256")
    categories: list[str]
    texts: list[ModerationItem]
    images: list[ModerationItem]


class PolicyCategory(BaseModel):
    kind: Literal["prompts", "head"]
    threshold: float
    description: str
    applies_to: list[Literal["image", "text"]]


class PolicyCard(BaseModel):
    name: str
    version: int
    model: str
    description: str
    categories: dict[str, PolicyCategory]


class PolicyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[PolicyCard]


EMBED_FORM = FormSpec.of(EmbedRequest)
CLASSIFY_FORM = FormSpec.of(ClassifyRequest)
SIMILARITY_FORM = FormSpec.of(SimilarityRequest,
                              nested={"queries": "query", "candidates": "candidate"})
MODERATE_FORM = FormSpec.of(ModerateRequest)
