"""Every setting of the service, read once at start-up.

From flags (see `service.__main__`), then `CLIP_*` environment variables, then defaults.
The one `Settings` object is passed down; nothing deeper reads the environment.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from clip_core.config import DECODE_FORMATS
from clip_core.registry import DEFAULT_MODEL

from .batcher import BatcherConfig
from .engines import ENGINE_NAMES


class Settings(BaseSettings):
    # CLIP_X=none turns off a setting whose default is a number (a bound, a timeout).
    model_config = SettingsConfigDict(env_prefix="CLIP_", extra="forbid",
                                      env_parse_none_str="none")

    # Models: registry names or checkpoint paths; the first is the default of every request.
    # CLIP_MODELS accepts a comma-separated list.
    models: Annotated[list[str], NoDecode] = Field(default_factory=lambda: [DEFAULT_MODEL])
    random_weights: bool = False  # build the architectures with random weights (tests only)
    # auto: cuda when present, else cpu. A comma list ("cuda:0,cuda:1") or cuda:all (every
    # visible CUDA device) serves each model on several devices, one worker each; the
    # list may repeat cpu, which splits the cores between replicas (service.replicas).
    device: str = "auto"
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    cache_dir: Path | None = None  # where downloaded weights live
    # What computes embeddings (service.engines), for every model whose spec names no
    # engine of its own ("onnxruntime:ViT-B-32"). torch: the model. null: no model and no
    # weights, only the named model's shapes; each embedding is a unit vector hashed from
    # its input, so the serving layer's own ceiling can be measured (loadtests/ceiling.py).
    # Never serve it.
    engine: str = "torch"
    # The onnxruntime and openvino engines' int8 export (clip_core.export) instead of fp32.
    int8: bool = False
    offline: bool = False  # never download weights

    # Batching (see service.batcher.BatcherConfig)
    max_batch_size: int = Field(32, ge=1)
    max_batch_tokens: int = Field(64 * 77, ge=77)
    max_queue_items: int = Field(1024, ge=1)
    max_wait_ms: float = Field(0.0, ge=0)
    # Batches are sized so their predicted compute time stays within this: on a CPU a
    # ViT-B/32 batch of 32 takes ~1.5 s and is no faster per image than a batch of 8.
    max_batch_compute_ms: float | None = Field(400.0, gt=0)
    # Overload: refuse (503 + Retry-After) when the work already admitted, plus the batch
    # the request would join, is predicted to take longer than this. An accepted request
    # is then answered within about this, however large the overload.
    max_queue_wait_s: float | None = Field(2.0, gt=0)
    request_timeout_s: float = Field(30.0, gt=0)
    # An overload refusal is held this long (at most its Retry-After) before it is
    # answered, so a caller that retries a 503 at once cannot send hundreds a second;
    # beyond max_held_refusals held at once, the next are answered at once. None: never.
    refusal_delay_s: float | None = Field(0.5, gt=0)
    max_held_refusals: int = Field(256, ge=0)
    # Watchdog: a batch running longer fails its requests and the worker carries on with
    # a fresh thread (see ModelWorker). Generous: a legitimate CPU batch takes seconds.
    stall_timeout_s: float | None = Field(120.0, gt=0)
    # Seconds idle after a burst before the allocator's free memory goes back to the
    # system (RSS falls to what the model holds); None: keep it.
    release_after_idle_s: float | None = Field(2.0, gt=0)

    cache_size: int = Field(10_000, ge=0)  # text embeddings kept, per process
    # Threads decoding and resizing images. auto: the cores the model does not need (all
    # but one or two beside an accelerator; on CPU what torch_threads leaves, else a
    # quarter of the cores, at least 2), see service.tuning.decode_workers.
    prepare_workers: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    torch_threads: int | None = Field(None, ge=1)  # CPU intra-op threads; None: all cores
    # Batches computed side by side per model, each on its share of torch_threads (see
    # service.batcher). None: 2 on a CPU with 2 or more cores, else 1.
    streams: int | None = Field(None, ge=1)
    # Where JPEGs are decoded and resized. exact: Pillow in the decode pool, the reference
    # preprocessing. device: each batch's JPEGs on the model's device (nvJPEG on CUDA,
    # clip_core.tensor_preprocess), within a few grey levels of exact; other formats and
    # JPEGs turned by their EXIF orientation keep the exact path. fast: as exact, but a
    # JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still leaves its
    # shorter side at least the model's image size (Pillow's draft mode), a fraction of
    # the decoding's CPU for pixels close to exact's (docs/preprocessing.md).
    preprocess: Literal["exact", "fast", "device"] = "exact"
    # The image tower as CUDA graphs, one per batch-size bucket (powers of two up to
    # max_batch_size), captured at warm-up; a batch runs padded to its bucket. On a CPU
    # the buckets run eagerly, with no gain.
    cuda_graphs: bool = False

    # Complete server processes on one port (service.processes): each with its own models,
    # batcher, admission and caches, on its share of the cores; 1: one process, no
    # supervisor. Rate limits are divided between them; queue bounds are per process.
    processes: int = Field(1, ge=1)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_format: Literal["json", "text"] = "json"
    log_level: str = "info"
    drain_timeout_s: float = Field(20.0, ge=0)
    # exit: a model that cannot load ends the process (exit 1). serve_others: it is
    # reported unavailable (503 to its requests) and the other models serve.
    on_model_load_failure: Literal["exit", "serve_others"] = "exit"

    # Request limits (README "Security"). Sizes are bytes, text lengths characters.
    max_body_bytes: int = Field(32 * 2**20, ge=1024)
    max_items_per_request: int = Field(256, ge=1)  # texts + images (+ labels x templates)
    max_form_parts: int = Field(512, ge=1)  # multipart parts, files and fields each
    max_text_chars: int = Field(8192, ge=1)  # per text, label or template, before tokenising
    max_image_pixels: int = Field(1 << 26, ge=1)  # width x height, read from the header
    max_image_frames: int = Field(256, ge=1)  # animated/multi-page: only frame 0 is used
    # Decoders that may be enabled, all on by default: common photo formats with well-worn
    # Pillow plugins, sniffed from their leading bytes (service.prepare).
    image_formats: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DECODE_FORMATS))
    # Browsers and phones show photos turned by their EXIF orientation; classify what a
    # viewer sees. False reproduces openai/open_clip preprocessing, which ignores the tag.
    exif_orientation: bool = True

    # Image URLs in place of base64: off unless enabled. Private, loopback, link-local and
    # other non-global addresses are refused unless listed in url_allow_networks.
    url_inputs: bool = False
    url_allow_networks: Annotated[list[str], NoDecode] = Field(default_factory=list)
    url_connect_timeout_s: float = Field(3.0, gt=0)
    url_timeout_s: float = Field(10.0, gt=0)  # the whole fetch, redirects included
    url_max_bytes: int = Field(16 * 2**20, ge=1)
    url_max_redirects: int = Field(3, ge=0)

    # Access. With api_keys set, every route but /healthz, /readyz (and /metrics unless
    # metrics_auth) needs `Authorization: Bearer <key>`. CLIP_API_KEYS: comma-separated.
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    metrics_auth: bool = False
    rate_limit_per_s: float | None = Field(None, gt=0)  # requests per second, per key
    rate_limit_burst: int = Field(10, ge=1)
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Moderation: a folder of policy files (*.yaml, *.yml, *.json; clip_core.moderation),
    # loaded at start-up and checked against the served models; an invalid one ends
    # start-up (exit 1). None: /moderate has no policies.
    policies: Path | None = None

    # The browser playground at /playground (and / redirecting to it): a static page that
    # calls the API with the visitor's key; off for a server that should answer API only.
    playground: bool = True

    @field_validator("models", "image_formats", "url_allow_networks", "api_keys",
                     "cors_origins", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",")]
        return value

    @field_validator("models")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        value = [v for v in value if v]
        if not value:
            raise ValueError("at least one model is needed")
        if len(set(value)) != len(value):
            raise ValueError("a model is listed twice")
        return value

    @field_validator("engine")
    @classmethod
    def _engine(cls, value: str) -> str:
        if value not in ENGINE_NAMES:
            raise ValueError(f"unknown engine {value!r}; known: {', '.join(ENGINE_NAMES)}")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        parts = [p.strip().lower() for p in value.split(",")]
        if len(parts) == 1 and parts[0] in ("auto", "cuda:all"):
            return parts[0]
        for p in parts:
            if not re.fullmatch(r"cpu|cuda(:\d+)?", p):
                raise ValueError(
                    f"device {p!r}: use auto, cpu, cuda, cuda:N, cuda:all, or a comma list "
                    "of cpu, cuda and cuda:N")
        cuda = [p for p in parts if p != "cpu"]
        if len(set(cuda)) != len(cuda) or ("cuda" in cuda and len(cuda) > 1):
            # "cuda" is the current device, which another entry may name too.
            raise ValueError("a CUDA device is listed twice; only cpu may repeat")
        return ",".join(parts)

    @field_validator("image_formats")
    @classmethod
    def _formats(cls, value: list[str]) -> list[str]:
        value = [v.upper() for v in value if v]
        unknown = set(value) - set(DECODE_FORMATS)
        if unknown or not value:
            raise ValueError(f"image_formats must be a non-empty subset of "
                             f"{sorted(DECODE_FORMATS)}")
        return value

    @field_validator("url_allow_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        return [str(ipaddress.ip_network(v.strip(), strict=False)) for v in value if v.strip()]

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        value = [v for v in value if v.get_secret_value()]
        if any(len(v.get_secret_value()) < 16 for v in value):
            raise ValueError("an API key must have at least 16 characters")
        return value

    @model_validator(mode="after")
    def _rate_limit_needs_keys(self) -> Settings:
        if self.rate_limit_per_s is not None and not self.api_keys:
            raise ValueError("rate_limit_per_s limits each API key; set api_keys too")
        return self

    def batcher(self) -> BatcherConfig:
        return BatcherConfig(
            max_batch_size=self.max_batch_size,
            max_batch_tokens=self.max_batch_tokens,
            max_queue_items=self.max_queue_items,
            max_wait_ms=self.max_wait_ms,
            default_timeout_s=self.request_timeout_s,
            stall_timeout_s=self.stall_timeout_s,
            max_batch_s=(None if self.max_batch_compute_ms is None
                         else self.max_batch_compute_ms / 1e3),
            max_queue_wait_s=self.max_queue_wait_s,
            streams=self.streams or 1,
            release_after_idle_s=self.release_after_idle_s,
        )
