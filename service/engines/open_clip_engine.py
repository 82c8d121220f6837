"""The open_clip engine: the families clip_core does not build (SigLIP, SigLIP2,
MobileCLIP/MobileCLIP2, EVA-CLIP, XLM-R multilingual), through open_clip_torch and timm.

A spec names an open_clip architecture, optionally its pretrained tag, optionally a local
file or folder (`open_clip:ARCH[/TAG][@PATH]`):

- `open_clip:ViT-B-16-SigLIP2/webli`: the tag's weights and tokenizer from the Hugging Face
  hub's cache (`huggingface_hub`, `cache_dir`; downloaded unless `offline`).
- `open_clip:ViT-B-16-SigLIP2/webli@/models/siglip2`: a folder laid out as the hub repo
  (`open_clip_model.safetensors` or `open_clip_pytorch_model.bin`, the tokenizer files);
  or `@/path/weights.safetensors`, the tokenizer then read from the file's folder.
  The tag, when named, gives the preprocessing those weights were trained with.
- `random_weights`: nothing is read but the tokenizer (tests).

The model's preprocessing becomes clip_core's `PreprocessConfig`, so the decode pool
prepares its pixels as for any model; its texts are tokenised by clip_core's BPE
(CLIP-vocabulary towers) or `clip_core.tokenizers_sp` (SigLIP's T5, SigLIP2's Gemma,
XLM-R), and every row is padded to the context length: several of these towers attend
over the padding or pool its last position. A model with a `logit_bias` (SigLIP) is
scored with a sigmoid per label.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clip_core.config import PreprocessConfig
from clip_core.errors import ModelNotFound
from clip_core.loader import resolve_dtype
from clip_core.moderation.fingerprint import model_fingerprint
from clip_core.tokenizers_sp import TOKENIZER_FILES, SentencePieceTokenizer

from ..backend import BackendInfo, ClipBackend
from ..errors import EngineUnavailable
from ..settings import Settings
from ..tuning import in_passing_thread
from . import EngineModel, Scoring, TextTokenizer, require
from .torch_engine import clip_tokenizer

log = logging.getLogger(__name__)

ENGINE = "open_clip"
EXTRA = "open_clip"
_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class OpenClipSpec:
    """`ARCH[/TAG][@PATH]`, parsed."""

    architecture: str
    tag: str | None = None
    path: Path | None = None

    @property
    def name(self) -> str:
        return f"{self.architecture}/{self.tag}" if self.tag else self.architecture

    @classmethod
    def parse(cls, spec: str) -> OpenClipSpec:
        body, sep, path = spec.partition("@")
        arch, _, tag = body.partition("/")
        if not arch or (sep and not path):
            raise ModelNotFound(f"open_clip spec {spec!r}: use ARCH[/TAG][@PATH]")
        return cls(arch, tag or None, Path(path).expanduser() if path else None)


@dataclass(frozen=True)
class TextLayout:
    """What the backend needs to collate a text batch: rows padded to `context_length`."""

    context_length: int
    pad_id: int
    pad_left: bool
    vocab_size: int
    eos_id: int


def preprocess_config(cfg: dict[str, Any]) -> PreprocessConfig:
    """open_clip's preprocess dict (`model.visual.preprocess_cfg` merged with the tag's)
    -> clip_core's config. A non-square size or `longest` has no clip_core equivalent."""
    size = cfg["size"]
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ValueError(f"non-square image size {tuple(size)} is not supported")
        size = size[0]
    mode = cfg.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise ValueError(f"resize_mode {mode!r} is not supported (shortest, squash)")
    return PreprocessConfig(image_size=int(size), mean=tuple(cfg["mean"]),
                            std=tuple(cfg["std"]),
                            interpolation=cfg.get("interpolation", "bicubic"),
                            resize_mode=mode)


def open_clip_preprocess(spec: OpenClipSpec, size: int | tuple[int, int]) -> dict[str, Any]:
    """open_clip's preprocess dict for these weights, as `create_model` sets it on the
    model: its defaults, the tag's mean, std, interpolation and resize mode, the tower's
    image size. (create_model given a file rather than a tag keeps the defaults; the tag
    named beside a local file still describes how those weights were trained.)"""
    open_clip = require("open_clip", EXTRA, ENGINE)
    from open_clip.transform import (  # type: ignore[import-untyped]
        PreprocessCfg,
        merge_preprocess_dict,
    )

    cfg = dataclasses.asdict(PreprocessCfg())
    if spec.tag is not None:
        cfg = merge_preprocess_dict(cfg, open_clip.get_pretrained_cfg(spec.architecture,
                                                                      spec.tag))
    cfg["size"] = size
    return cfg


def _check_architecture(open_clip: Any, spec: OpenClipSpec) -> dict[str, Any]:
    """The architecture's config; ModelNotFound listing close names or tags."""
    known = open_clip.list_models()
    if spec.architecture not in known:
        close = difflib.get_close_matches(spec.architecture, known, n=5, cutoff=0.5)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise ModelNotFound(f"unknown open_clip architecture {spec.architecture!r}{hint}")
    if spec.tag is not None:
        tags = open_clip.list_pretrained_tags_by_model(spec.architecture)
        if spec.tag not in tags:
            raise ModelNotFound(f"open_clip architecture {spec.architecture!r} has no "
                                f"pretrained tag {spec.tag!r}; known: {', '.join(tags) or 'none'}")
    return open_clip.get_model_config(spec.architecture)


def _required_packages(model_cfg: dict[str, Any]) -> None:
    """EngineUnavailable now, naming the package, for a tower whose library is missing."""
    if "timm_model_name" in model_cfg.get("vision_cfg", {}):
        require("timm", EXTRA, ENGINE)
    text = model_cfg.get("text_cfg", {})
    if "hf_model_name" in text:
        require("transformers", EXTRA, ENGINE)
    if "hf_tokenizer_name" in text:
        require("sentencepiece", EXTRA, ENGINE)
        require("tokenizers", EXTRA, ENGINE)


def _hub_repo(open_clip: Any, spec: OpenClipSpec) -> tuple[str, str | None] | None:
    """(repo id, file name or None for the default) of the tag's weights on the hub."""
    if spec.tag is None:
        return None
    hub = open_clip.get_pretrained_cfg(spec.architecture, spec.tag).get("hf_hub", "")
    if not hub:
        return None
    # open_clip's convention: "org/repo/" (the default file names) or "org/repo/file".
    repo, _, filename = hub.rpartition("/")
    return repo, filename or None


def _from_hub(repo: str, filenames: tuple[str, ...], settings: Settings) -> Path:
    """The first of `filenames` that the repo has, from the cache (or the hub unless
    `offline`): huggingface_hub's cache, `HF_ENDPOINT` and `HF_HUB_OFFLINE` apply."""
    hub = require("huggingface_hub", EXTRA, ENGINE)
    errors = []
    for filename in filenames:
        try:
            return Path(hub.hf_hub_download(repo, filename, cache_dir=settings.cache_dir,
                                            local_files_only=settings.offline))
        except Exception as e:  # not in the repo, not cached offline, no network
            errors.append(f"{filename}: {type(e).__name__}")
    where = " from the cache (offline: nothing is downloaded)" if settings.offline else ""
    raise ModelNotFound(f"hub repository {repo!r}: none of {', '.join(filenames)} could be "
                        f"read{where} ({'; '.join(errors)})")


def _weights_file(spec: OpenClipSpec, hub: tuple[str, str | None] | None,
                  settings: Settings) -> Path:
    if spec.path is not None:
        if spec.path.is_file():
            return spec.path
        for name in _WEIGHT_FILES:
            if (spec.path / name).is_file():
                return spec.path / name
        raise ModelNotFound(f"{spec.path}: no weights file (one of {', '.join(_WEIGHT_FILES)})")
    if hub is None:
        raise ModelNotFound(f"open_clip model {spec.name!r}: name a pretrained tag "
                            f"(ARCH/TAG) or a local file (ARCH@PATH)")
    repo, filename = hub
    return _from_hub(repo, (filename,) if filename else _WEIGHT_FILES, settings)


def _tokenizer_folder(spec: OpenClipSpec, text_cfg: dict[str, Any], settings: Settings) -> Path:
    """Where the HF-style tokenizer's files are: the spec's folder (or its file's), else
    the hub cache of the config's `hf_tokenizer_name`."""
    if spec.path is not None:
        folder = spec.path if spec.path.is_dir() else spec.path.parent
        if any((folder / f).is_file() for f in TOKENIZER_FILES):
            return folder
    repo = text_cfg["hf_tokenizer_name"]
    hub = require("huggingface_hub", EXTRA, ENGINE)
    try:
        return Path(hub.snapshot_download(repo, cache_dir=settings.cache_dir,
                                          allow_patterns=list(TOKENIZER_FILES),
                                          local_files_only=settings.offline))
    except Exception as e:
        where = " (offline: nothing is downloaded)" if settings.offline else ""
        raise ModelNotFound(f"open_clip model {spec.name!r}: its tokenizer ({repo}) is not in "
                            f"a local folder or the hub cache{where}: {type(e).__name__}: "
                            f"{e}") from None


def _tokenizer(spec: OpenClipSpec, model_cfg: dict[str, Any], settings: Settings
               ) -> tuple[TextTokenizer, TextLayout]:
    text_cfg = model_cfg.get("text_cfg", {})
    ctx = int(text_cfg.get("context_length", 77))
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
    if "hf_tokenizer_name" not in text_cfg:
        # CLIP's BPE (open_clip's SimpleTokenizer, clean="lower"): clip_core's own.
        if kwargs.get("clean", "lower") != "lower" or ctx != 77:
            raise ModelNotFound(f"open_clip model {spec.name!r}: a CLIP-vocabulary tokenizer "
                                f"with {kwargs} and context length {ctx} is not supported")
        bpe = clip_tokenizer()
        # open_clip's SimpleTokenizer pads with 0 on the right.
        return bpe, TextLayout(ctx, 0, False, int(text_cfg.get("vocab_size", 49408)),
                               bpe.eot_id)
    folder = _tokenizer_folder(spec, text_cfg, settings)
    tok = SentencePieceTokenizer.from_folder(
        folder, context_length=ctx, clean=kwargs.get("clean", "whitespace"),
        family_hint=spec.architecture)
    s = tok.scheme
    eos = s.eos_id if s.eos_id is not None else s.pad_id
    return tok, TextLayout(ctx, s.pad_id, s.padding_side == "left", tok.vocab_size, eos)


def build_model(spec: OpenClipSpec, settings: Settings, device: str
                ) -> tuple[Any, PreprocessConfig, dict[str, Any]]:
    """The open_clip model on `device` in the settings' dtype, weights loaded strictly
    (open_clip's `load_checkpoint(strict=True)`), and its preprocessing."""
    open_clip = require("open_clip", EXTRA, ENGINE)
    model_cfg = _check_architecture(open_clip, spec)
    _required_packages(model_cfg)
    hub = _hub_repo(open_clip, spec)
    weights = None if settings.random_weights else _weights_file(spec, hub, settings)
    dtype = resolve_dtype(settings.dtype, torch.device(device))
    model = open_clip.create_model(
        spec.architecture, pretrained=str(weights) if weights else None,
        precision=_PRECISION[dtype], device=device, pretrained_text=False,
        pretrained_image=False, require_pretrained=weights is not None)
    if weights is None:
        log.warning("model %s: random weights (random_weights is on)", spec.name)
    size = getattr(model.visual, "image_size", None) or model_cfg["vision_cfg"]["image_size"]
    return model.eval(), preprocess_config(open_clip_preprocess(spec, size)), model_cfg


class OpenClipBackend(ClipBackend):
    """`ClipBackend`'s collation, threads, CUDA stream and out-of-memory handling around an
    open_clip model: images normalised on the device as there; texts padded to the
    context length with the tokenizer's pad id (see the module's docstring)."""

    def __init__(self, model: Any, name: str, preprocess: PreprocessConfig, text: TextLayout,
                 *, threads: int | None = None, warmup_images: int = 32,
                 warmup_tokens: int = 64 * 77, cuda_graphs: bool = False):
        # ClipBackend.__init__ reads a clip_core LoadedModel; the same fields are set here.
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        param = next(model.parameters())
        self.model = model
        self.preprocess = preprocess
        self.device = param.device
        self.dtype = param.dtype
        self.threads = threads
        self.warmup_images = warmup_images
        self.warmup_tokens = warmup_tokens
        self.text = text
        embed_dim = int(model.text_projection.shape[-1]) if isinstance(
            getattr(model, "text_projection", None), torch.Tensor) else int(
            self._probe_dim(model, text))
        self.info = BackendInfo(name=name, embed_dim=embed_dim,
                                image_size=preprocess.image_size, device=str(self.device),
                                dtype=str(self.dtype).removeprefix("torch."),
                                context_length=text.context_length, engine=ENGINE)
        self._mean = torch.tensor(preprocess.mean, dtype=torch.float32,
                                  device=self.device).view(3, 1, 1)
        self._std = torch.tensor(preprocess.std, dtype=torch.float32,
                                 device=self.device).view(3, 1, 1)
        # Read once, as floats: on CUDA each read of a parameter is a device sync.
        self.logit_scale = float(model.logit_scale.detach().float().exp())
        bias = getattr(model, "logit_bias", None)
        self.logit_bias = None if bias is None else float(bias.detach().float())
        self._cuda = self.device.type == "cuda"
        self._local = threading.local()
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._decoder = None  # settings.preprocess="device" is refused by the loader
        self._runner = self._image_runner() if cuda_graphs else None

    @staticmethod
    def _probe_dim(model: Any, text: TextLayout) -> int:
        with torch.inference_mode():
            ids = torch.full((1, text.context_length), text.pad_id, dtype=torch.long,
                             device=next(model.parameters()).device)
            return int(model.encode_text(ids).shape[-1])

    @property
    def scoring(self) -> Scoring:
        return "softmax" if self.logit_bias is None else "sigmoid"

    def _texts(self, payloads):  # -> (B, E)
        t = self.text
        rows: list[list[int]] = []
        for i, p in enumerate(payloads):
            if not isinstance(p, (list, tuple)) or not 1 <= len(p) <= t.context_length:
                raise ValueError(f"text payload {i} is not a list of 1 to "
                                 f"{t.context_length} token ids")
            fill = [t.pad_id] * (t.context_length - len(p))
            rows.append([*fill, *p] if t.pad_left else [*p, *fill])
        # (B, context_length) int64: these towers attend over the padding (or pool its
        # last position), so rows are padded as the model was trained, never trimmed.
        ids = torch.tensor(rows, dtype=torch.int64).to(self.device, non_blocking=self._cuda)
        return self.model.encode_text(ids)

    def _warmup_text(self, n_tokens: int, g: torch.Generator) -> list[int]:
        n = min(n_tokens, self.text.context_length)
        body = torch.randint(4, self.text.vocab_size, (n - 1,), generator=g).tolist()
        return [*body, self.text.eos_id]


def _load_one(spec: OpenClipSpec, settings: Settings, device: str
              ) -> tuple[Any, PreprocessConfig, TextTokenizer, TextLayout]:
    # The tokenizer first: a missing tokenizer file fails before the weights are read.
    model_cfg = _check_architecture(require("open_clip", EXTRA, ENGINE), spec)
    _required_packages(model_cfg)
    tokenizer, layout = _tokenizer(spec, model_cfg, settings)
    model, preprocess, _ = build_model(spec, settings, device)
    return model, preprocess, tokenizer, layout


async def load_open_clip(settings: Settings, spec: str, devices: list[str]) -> EngineModel:
    """An open_clip model per device (CPU replicas share one), an `OpenClipBackend` each,
    with the preprocessing, tokenizer and scoring of its weights."""
    require("open_clip", EXTRA, ENGINE)
    if settings.preprocess == "device":
        raise EngineUnavailable("the open_clip engine decodes images in the decode pool "
                                "only; unset CLIP_PREPROCESS=device to serve open_clip models")
    parsed = OpenClipSpec.parse(spec)
    loaded_on: dict[str, tuple[Any, PreprocessConfig, TextTokenizer, TextLayout]] = {}
    backends: list[OpenClipBackend] = []
    for device in devices:
        loaded = loaded_on.get(device)
        if loaded is None:
            loaded = loaded_on[device] = await in_passing_thread(_load_one, parsed, settings,
                                                                 device)
        model, preprocess, _, layout = loaded
        backends.append(OpenClipBackend(
            model, parsed.name, preprocess, layout, threads=settings.torch_threads,
            warmup_images=settings.max_batch_size, warmup_tokens=settings.max_batch_tokens,
            cuda_graphs=settings.cuda_graphs))
    first = backends[0]
    model, _, tokenizer, _ = loaded_on[devices[0]]
    # The same scheme as the torch engine's: any module's weights and its preprocessing.
    fingerprint = await in_passing_thread(model_fingerprint, model, first.preprocess)
    return EngineModel(name=parsed.name, preprocess=first.preprocess, backends=backends,
                       tokenizer=tokenizer, scoring=first.scoring,
                       logit_bias=first.logit_bias or 0.0, fingerprint=fingerprint)

