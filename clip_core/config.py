"""Architecture and preprocessing configs.

Architectures are data: one JSON file per model in `configs/`. Preprocessing is kept
apart because it belongs to a set of weights, not to an architecture (the same ViT-B/32
shape is trained with different normalisations by different groups).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any, Literal

# CLIP's normalisation constants, from openai/CLIP clip/clip.py (_transform).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# Image formats accepted from callers: the default, and the most the service can enable.
# Pillow can open many more; some are risky to feed untrusted bytes (EPS runs
# Ghostscript), and none matter for CLIP. Here, not in preprocess.py, so that settings
# can name them without importing torch.
DECODE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")

Activation = Literal["quick_gelu", "gelu"]
Interpolation = Literal["bicubic", "bilinear", "nearest"]
# "shortest": the shorter side to the image size, then the centre square (CLIP's way);
# "squash": the whole image to a square, aspect ratio not kept (DFN-5B's weights, SigLIP's).
ResizeMode = Literal["shortest", "squash"]


@dataclass(frozen=True)
class VisionConfig:
    kind: Literal["vit", "resnet"]
    image_size: int
    width: int  # ViT: token width; ResNet: channels of the first stage
    layers: int | tuple[int, ...]  # ViT: blocks; ResNet: bottlenecks per stage
    patch_size: int = 0  # ViT only
    heads: int = 0  # 0 = OpenAI's rule (ViT: width // 64, ResNet: width * 32 // 64)
    # The MLP's hidden width; 0 = 4 * width. Only g/14 (6144) and bigG/14 (8192) differ:
    # open_clip's JSON gives them as ratios (4.3637, 4.9231), a width is exact.
    mlp_width: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.layers, list):
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.kind not in ("vit", "resnet"):
            raise ValueError(f"vision kind must be 'vit' or 'resnet', not {self.kind!r}")
        if self.kind == "vit" and self.patch_size <= 0:
            raise ValueError("a ViT vision config needs patch_size")
        if self.kind == "resnet" and (not isinstance(self.layers, tuple) or len(self.layers) != 4):
            raise ValueError("a ResNet vision config needs four stage depths")

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_width or 4 * self.width

    @property
    def n_heads(self) -> int:
        if self.heads:
            return self.heads
        return self.width // 64 if self.kind == "vit" else self.width * 32 // 64


@dataclass(frozen=True)
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_width: int = 0  # 0 = 4 * width

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_width or 4 * self.width


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int
    vision: VisionConfig
    text: TextConfig = field(default_factory=TextConfig)
    # OpenAI trained with x * sigmoid(1.702 x); most open_clip models use exact GELU.
    act: Activation = "quick_gelu"
    ln_eps: float = 1e-5

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CLIPConfig:
        d = dict(d)
        d.pop("name", None)
        vision = VisionConfig(**d.pop("vision"))
        text = TextConfig(**d.pop("text", {}))
        return cls(vision=vision, text=text, **d)

    @classmethod
    def from_open_clip(cls, d: dict[str, Any]) -> CLIPConfig:
        """Our config from an open_clip model JSON (`embed_dim`, `vision_cfg`, `text_cfg`).

        Only the options that describe the towers built here are accepted; anything else
        (timm or HF towers, layer scale, other pooling...) is refused by name rather than
        silently built as a different model.
        """
        top = set(d) - {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}
        v, t = dict(d["vision_cfg"]), dict(d.get("text_cfg", {}))
        vis = set(v) - {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"}
        txt = set(t) - {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
        if top or vis or txt:
            unknown = sorted(top) + [f"vision_cfg.{k}" for k in sorted(vis)]
            unknown += [f"text_cfg.{k}" for k in sorted(txt)]
            raise ValueError(f"unsupported open_clip options: {', '.join(unknown)}")
        resnet = isinstance(v["layers"], (list, tuple))
        width = v["width"]
        head_width = v.get("head_width", 64)
        heads = 0 if resnet or head_width == 64 else width // head_width  # 0: OpenAI's rule
        vision = VisionConfig(
            kind="resnet" if resnet else "vit",
            image_size=v["image_size"],
            width=width,
            layers=tuple(v["layers"]) if resnet else v["layers"],
            patch_size=0 if resnet else v["patch_size"],
            heads=heads,
            mlp_width=_mlp_width(width, v.get("mlp_ratio", 4)),
        )
        text = {k: x for k, x in t.items() if k != "mlp_ratio"}
        text["mlp_width"] = _mlp_width(t.get("width", TextConfig.width), t.get("mlp_ratio", 4))
        return cls(
            embed_dim=d["embed_dim"],
            vision=vision,
            text=TextConfig(**text),
            act="quick_gelu" if d.get("quick_gelu", False) else "gelu",
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["vision"]["layers"] = (
            list(self.vision.layers) if isinstance(self.vision.layers, tuple) else self.vision.layers
        )
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _mlp_width(width: int, ratio: float) -> int:
    """open_clip's hidden width, int(width * mlp_ratio); 0 when it is the usual 4 * width."""
    hidden = int(width * ratio)
    return 0 if hidden == 4 * width else hidden


@dataclass(frozen=True)
class PreprocessConfig:
    """How images must be prepared for one set of weights."""

    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: Interpolation = "bicubic"
    resize_mode: ResizeMode = "shortest"

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


def architecture_names() -> list[str]:
    """Names of the architectures shipped as JSON, e.g. 'ViT-B-32'."""
    files = (resources.files("clip_core") / "configs").iterdir()
    return sorted(f.name[: -len(".json")] for f in files if f.name.endswith(".json"))


def load_architecture(name: str) -> CLIPConfig:
    """Reads `configs/NAME.json`; OpenAI's spellings ('ViT-B/32', '@336px') are accepted."""
    file_name = name.replace("/", "-").replace("@", "-").removesuffix("px") + ".json"
    # `/` twice: Python 3.10's Traversable.joinpath takes a single name.
    path = resources.files("clip_core") / "configs" / file_name
    if not path.is_file():
        from .errors import ModelNotFound

        raise ModelNotFound(
            f"unknown architecture {name!r}; known: {', '.join(architecture_names())}"
        )
    return CLIPConfig.from_dict(json.loads(path.read_text()))
