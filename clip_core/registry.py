"""Known pretrained weights: where they come from and how their images are prepared.

An entry names an architecture (a JSON config), the weights' URL and SHA-256, and the
preprocessing those weights were trained with. OpenAI's URLs and hashes are facts taken
from openai/CLIP clip/clip.py (`_MODELS`); each URL's path carries the file's SHA-256.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import OPENAI_MEAN, OPENAI_STD, PreprocessConfig, load_architecture
from .errors import ModelNotFound


@dataclass(frozen=True)
class ModelEntry:
    name: str  # canonical, "openai/ViT-B-32"
    architecture: str  # a config in configs/, "ViT-B-32"
    url: str  # "" for weights shipped inside the package
    sha256: str
    preprocess: PreprocessConfig
    aliases: tuple[str, ...] = ()
    builtin: str | None = None  # a file in clip_core/weights/, instead of a download

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


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
            aliases=(_openai_name, _arch),
        )
    )


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
    )
)


def get_entry(name: str) -> ModelEntry:
    """Looks a model up by canonical name or alias ('openai/ViT-B-32', 'ViT-B/32')."""
    canonical = _ALIASES.get(name.lower())
    if canonical is None:
        raise ModelNotFound(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[canonical]


def known_models() -> list[str]:
    return sorted(REGISTRY)
