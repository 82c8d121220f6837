"""Every setting of the service, read once at start-up.

From flags (see `service.__main__`), then `CLIP_*` environment variables, then defaults.
The one `Settings` object is passed down; nothing deeper reads the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .batcher import BatcherConfig


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLIP_", extra="forbid")

    # Models: registry names or checkpoint paths; the first is the default of every request.
    # CLIP_MODELS accepts a comma-separated list.
    models: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["ViT-B-32"])
    random_weights: bool = False  # build the architectures with random weights (tests only)
    device: str = "auto"  # auto: cuda when present, else cpu
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"  # auto: fp16 on CUDA, fp32 on CPU
    cache_dir: Path | None = None  # where downloaded weights live
    offline: bool = False  # never download weights

    # Batching (see service.batcher.BatcherConfig)
    max_batch_size: int = Field(32, ge=1)
    max_batch_tokens: int = Field(64 * 77, ge=77)
    max_queue_items: int = Field(1024, ge=1)
    max_wait_ms: float = Field(0.0, ge=0)
    request_timeout_s: float = Field(30.0, gt=0)
    stall_timeout_s: float | None = Field(None, gt=0)

    cache_size: int = Field(10_000, ge=0)  # text embeddings kept, per process
    prepare_workers: int = Field(2, ge=1)  # threads decoding and resizing images
    torch_threads: int | None = Field(None, ge=1)  # CPU intra-op threads; None: all cores

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_format: Literal["json", "text"] = "json"
    log_level: str = "info"
    drain_timeout_s: float = Field(20.0, ge=0)

    @field_validator("models", mode="before")
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

    def batcher(self) -> BatcherConfig:
        return BatcherConfig(
            max_batch_size=self.max_batch_size,
            max_batch_tokens=self.max_batch_tokens,
            max_queue_items=self.max_queue_items,
            max_wait_ms=self.max_wait_ms,
            default_timeout_s=self.request_timeout_s,
            stall_timeout_s=self.stall_timeout_s,
        )
