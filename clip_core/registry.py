"""Known pretrained weights: where they come from and how their images are prepared.

An entry names an architecture (a JSON config), the activation its weights were trained
with, where the weights live (a URL, or a Hugging Face hub repository and file) with their
SHA-256, and the preprocessing those weights were trained with.

Facts and their sources:
- OpenAI's URLs and hashes: openai/CLIP clip/clip.py (`_MODELS`); each URL's path carries
  the file's SHA-256.
- open_clip's pretrained weights (LAION-2B, DataComp, DFN, MetaCLIP): open_clip 3.3.0
  `pretrained.py` (hub repositories, tags, QuickGELU flags, mean/std, resize mode,
  interpolation) and `model_configs/*.json` (architectures), checked against the installed
  package by tests/clip_core/test_registry_open_clip.py. Their SHA-256s are not published;
  the first download records them and later loads check them (clip_core.hub).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

from .config import (
    OPENAI_MEAN,
    OPENAI_STD,
    Activation,
    CLIPConfig,
    Interpolation,
    PreprocessConfig,
    ResizeMode,
    load_architecture,
)
from .errors import ModelNotFound

# open_clip's hub repositories hold its weights under these names; like open_clip, the
# safetensors file is tried first and the pickle (read with weights_only) second.
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


@dataclass(frozen=True)
class ModelEntry:
    name: str  # canonical, "openai/ViT-B-32", "ViT-B-32/laion2b_s34b_b79k"
    architecture: str  # a config in configs/, "ViT-B-32"
    url: str  # "" for weights on the hub or shipped inside the package
    sha256: str  # "" when unknown: recorded at the first download, checked after
    preprocess: PreprocessConfig
    aliases: tuple[str, ...] = ()
    builtin: str | None = None  # a file in clip_core/weights/, instead of a download
    # The activation the weights were trained with, when it is not the architecture's:
    # the same ViT-B/32 shape is QuickGELU for OpenAI and MetaCLIP, GELU for LAION.
    act: Activation | None = None
    hf_repo: str = ""  # "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    hf_files: tuple[str, ...] = ()  # tried in order; the first the repository has is used
    family: str = ""  # "OpenAI", "LAION-2B", ... (the README's table)

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def config(self) -> CLIPConfig:
        """The architecture, with the activation these weights need."""
        cfg = load_architecture(self.architecture)
        return cfg if self.act is None or self.act == cfg.act else replace(cfg, act=self.act)


_OPENAI_BASE = "https://openaipublic.azureedge.net/clip/models"

# (architecture, OpenAI's own name, SHA-256, file name, image size)
_OPENAI = [
    ("RN50", "RN50", "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762", "RN50.pt", 224),
    ("RN101", "RN101", "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599", "RN101.pt", 224),
    ("RN50x4", "RN50x4", "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd", "RN50x4.pt", 288),
    ("RN50x16", "RN50x16", "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa", "RN50x16.pt", 384),
    ("RN50x64", "RN50x64", "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c", "RN50x64.pt", 448),
    ("ViT-B-32", "ViT-B/32", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt", 224),
    ("ViT-B-16", "ViT-B/16", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt", 224),
    ("ViT-L-14", "ViT-L/14", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt", 224),
    ("ViT-L-14-336", "ViT-L/14@336px", "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02", "ViT-L-14-336px.pt", 336),
]  # fmt: skip

REGISTRY: dict[str, ModelEntry] = {}
_ALIASES: dict[str, str] = {}


def register(entry: ModelEntry) -> None:
    load_architecture(entry.architecture)  # fail at registration, not at first use
    REGISTRY[entry.name] = entry
    for alias in (entry.name, *entry.aliases):
        _ALIASES[alias.lower()] = entry.name


for _arch, _openai_name, _sha, _file, _size in _OPENAI:
    register(
        ModelEntry(
            name=f"openai/{_arch}",
            architecture=_arch,
            url=f"{_OPENAI_BASE}/{_sha}/{_file}",
            sha256=_sha,
            preprocess=PreprocessConfig(
                image_size=_size, mean=OPENAI_MEAN, std=OPENAI_STD, interpolation="bicubic"
            ),
            # open_clip names them ARCH/openai (and ARCH-quickgelu/openai).
            aliases=(_openai_name, _arch, f"{_arch}/openai", f"{_arch}-quickgelu/openai"),
            act="quick_gelu",
            family="OpenAI",
        )
    )


# open_clip's pretrained weights of CLIP's own architecture, as
# (family, architecture, tag, hub repository, QuickGELU, overrides): open_clip's
# `_PRETRAINED` in pretrained.py. Unless overridden, the preprocessing is open_clip's
# `_pcfg` default, OpenAI's mean and std, bicubic, shortest side and centre crop.
_OPEN_CLIP: list[tuple[str, str, str, str, bool, dict]] = [
    ("LAION-2B", "ViT-B-32", "laion2b_s34b_b79k", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", False, {}),
    ("LAION-2B", "ViT-B-32", "laion2b_e16", "timm/vit_base_patch32_clip_224.laion2b_e16", False, {}),
    ("LAION-2B", "ViT-B-16", "laion2b_s34b_b88k", "laion/CLIP-ViT-B-16-laion2B-s34B-b88K", False, {}),
    # The one LAION model trained with mean and std 0.5 (open_clip's INCEPTION_MEAN/STD).
    ("LAION-2B", "ViT-L-14", "laion2b_s32b_b82k", "laion/CLIP-ViT-L-14-laion2B-s32B-b82K", False,
     {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}),
    ("LAION-2B", "ViT-H-14", "laion2b_s32b_b79k", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", False, {}),
    ("LAION-2B", "ViT-g-14", "laion2b_s12b_b42k", "laion/CLIP-ViT-g-14-laion2B-s12B-b42K", False, {}),
    ("LAION-2B", "ViT-g-14", "laion2b_s34b_b88k", "laion/CLIP-ViT-g-14-laion2B-s34B-b88K", False, {}),
    ("LAION-2B", "ViT-bigG-14", "laion2b_s39b_b160k", "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", False, {}),
    ("DataComp", "ViT-B-32", "datacomp_xl_s13b_b90k", "laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K", False, {}),
    ("DataComp", "ViT-B-32-256", "datacomp_s34b_b86k", "laion/CLIP-ViT-B-32-256x256-DataComp-s34B-b86K", False, {}),
    ("DataComp", "ViT-B-16", "datacomp_xl_s13b_b90k", "laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K", False, {}),
    ("DataComp", "ViT-L-14", "datacomp_xl_s13b_b90k", "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K", False, {}),
    ("DFN", "ViT-B-16", "dfn2b", "apple/DFN2B-CLIP-ViT-B-16", True, {}),
    ("DFN", "ViT-L-14", "dfn2b", "apple/DFN2B-CLIP-ViT-L-14", True, {}),
    ("DFN", "ViT-L-14", "dfn2b_s39b", "apple/DFN2B-CLIP-ViT-L-14-39B", False, {}),
    ("DFN", "ViT-H-14", "dfn5b", "apple/DFN5B-CLIP-ViT-H-14", True, {"resize_mode": "squash"}),
    ("DFN", "ViT-H-14-378", "dfn5b", "apple/DFN5B-CLIP-ViT-H-14-378", True, {"resize_mode": "squash"}),
    ("MetaCLIP", "ViT-B-32", "metaclip_400m", "timm/vit_base_patch32_clip_224.metaclip_400m", True, {}),
    ("MetaCLIP", "ViT-B-32", "metaclip_fullcc", "timm/vit_base_patch32_clip_224.metaclip_2pt5b", True, {}),
    ("MetaCLIP", "ViT-B-16", "metaclip_400m", "timm/vit_base_patch16_clip_224.metaclip_400m", True, {}),
    ("MetaCLIP", "ViT-B-16", "metaclip_fullcc", "timm/vit_base_patch16_clip_224.metaclip_2pt5b", True, {}),
    ("MetaCLIP", "ViT-L-14", "metaclip_400m", "timm/vit_large_patch14_clip_224.metaclip_400m", True, {}),
    ("MetaCLIP", "ViT-L-14", "metaclip_fullcc", "timm/vit_large_patch14_clip_224.metaclip_2pt5b", True, {}),
    ("MetaCLIP", "ViT-H-14", "metaclip_fullcc", "timm/vit_huge_patch14_clip_224.metaclip_2pt5b", True, {}),
    ("MetaCLIP", "ViT-H-14", "metaclip_altogether", "timm/vit_huge_patch14_clip_224.metaclip_altogether", False, {}),
    ("MetaCLIP", "ViT-bigG-14", "metaclip_fullcc", "timm/vit_gigantic_patch14_clip_224.metaclip_2pt5b", True, {}),
]  # fmt: skip


def _open_clip_entry(family: str, arch: str, tag: str, repo: str, quick_gelu: bool,
                     overrides: dict) -> ModelEntry:
    size = load_architecture(arch).vision.image_size
    mean: tuple[float, float, float] = overrides.get("mean", OPENAI_MEAN)
    std: tuple[float, float, float] = overrides.get("std", OPENAI_STD)
    interpolation: Interpolation = overrides.get("interpolation", "bicubic")
    resize_mode: ResizeMode = overrides.get("resize_mode", "shortest")
    # open_clip spells QuickGELU weights ARCH-quickgelu/TAG; ARCH/TAG is accepted too, and
    # here it still builds QuickGELU (open_clip would only warn of the mismatch).
    oc_arch = f"{arch}-quickgelu" if quick_gelu else arch
    aliases = {f"{arch}/{tag}", f"{oc_arch}:{tag}", f"{arch}:{tag}", f"hf-hub:{repo}"}
    return ModelEntry(
        name=f"{oc_arch}/{tag}",
        architecture=arch,
        url="",
        sha256="",
        preprocess=PreprocessConfig(image_size=size, mean=mean, std=std,
                                    interpolation=interpolation, resize_mode=resize_mode),
        aliases=tuple(sorted(aliases - {f"{oc_arch}/{tag}"})),
        act="quick_gelu" if quick_gelu else "gelu",
        hf_repo=repo,
        hf_files=OPEN_CLIP_FILES,
        family=family,
    )


for _row in _OPEN_CLIP:
    register(_open_clip_entry(*_row))


# The offline default: a small model this project trains on its procedural scenes and ships
# (docs/models/clip-shapes.md). It knows coloured shapes, nothing else.
DEFAULT_MODEL = "builtin/clip-shapes"
register(
    ModelEntry(
        name=DEFAULT_MODEL,
        architecture="RN-Tiny-64",
        url="",
        sha256="",
        preprocess=PreprocessConfig(image_size=64),
        aliases=("clip-shapes",),
        builtin="clip-shapes.safetensors",
        family="built-in",
    )
)


def get_entry(name: str) -> ModelEntry:
    """Looks a model up by canonical name or alias ('openai/ViT-B-32', 'ViT-B/32',
    'ViT-B-32/laion2b_s34b_b79k', 'hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K')."""
    canonical = _ALIASES.get(name.lower())
    if canonical is None:
        raise ModelNotFound(f"unknown model {name!r}; {_suggestion(name)}")
    return REGISTRY[canonical]


def close_matches(name: str, limit: int = 5) -> list[str]:
    """Canonical names of the models whose names or aliases look most like `name`."""
    found = difflib.get_close_matches(name.lower(), list(_ALIASES), n=4 * limit, cutoff=0.6)
    out: list[str] = []
    for alias in found:
        canonical = _ALIASES[alias]
        if canonical not in out:
            out.append(canonical)
    return out[:limit]


def _suggestion(name: str) -> str:
    matches = close_matches(name)
    if matches:
        return f"did you mean {', '.join(matches)}?"
    return (f"none of the {len(REGISTRY)} registry models is close; names look like "
            f"openai/ViT-B-32 or ViT-B-32/laion2b_s34b_b79k (README, 'Models'), or give a "
            f"checkpoint's path")


def known_models() -> list[str]:
    return sorted(REGISTRY)
