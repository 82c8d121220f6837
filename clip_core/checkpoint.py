"""Reading and writing CLIP weights in every layout users bring.

Formats: OpenAI's released TorchScript archives (only the weights are read; the graph is
never run), plain or open_clip training state dicts (`weights_only=True`), safetensors
(ours carry config and preprocessing in their metadata), and Hugging Face `CLIPModel`
folders. Everything is mapped onto one key layout, OpenAI's, and loaded strictly.
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import CLIPConfig, Interpolation, PreprocessConfig, TextConfig, VisionConfig
from .errors import CheckpointError
from .model import CLIP, infer_config

log = logging.getLogger(__name__)

FORMAT_TAG = "clip_core/1"

# Entries that some releases store beside the weights and that carry no parameters:
# OpenAI's archives keep three scalars, older open_clip saves its causal mask buffer.
_NON_WEIGHT_KEYS = {"input_resolution", "context_length", "vocab_size", "attn_mask"}


@dataclass
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    config: CLIPConfig | None = None  # known when the file says so, else inferred
    preprocess: PreprocessConfig | None = None
    source_format: str = "state_dict"


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        # TorchScript archives hold compiled code beside the pickled data; plain
        # torch.save archives never do.
        return any(name.split("/", 2)[1:2] == ["code"] for name in zf.namelist())


def _read_torchscript(path: Path) -> dict[str, torch.Tensor]:
    # Loading compiles the archive's TorchScript (a restricted language, no Python
    # pickle execution); only state_dict() is read from it and nothing is called.
    archive = torch.jit.load(str(path), map_location="cpu")
    return {k: v.detach().clone() for k, v in archive.state_dict().items()}


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many classes
        raise CheckpointError(f"{path}: not a readable weights file ({e})") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # open_clip training checkpoints
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors")
    return obj


def _read_safetensors(path: Path) -> Checkpoint:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    config = CLIPConfig.from_dict(json.loads(meta["config"])) if "config" in meta else None
    preprocess = (
        PreprocessConfig.from_dict(json.loads(meta["preprocess"]))
        if "preprocess" in meta
        else None
    )
    fmt = "clip_core" if meta.get("format") == FORMAT_TAG else "safetensors"
    return Checkpoint(sd, config, preprocess, fmt)


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DistributedDataParallel saves every key under "module.".
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if k not in _NON_WEIGHT_KEYS}


# ---- Hugging Face CLIPModel ------------------------------------------------------------

_HF_BLOCK = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_HF_FIXED = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",  # sic, HF's spelling
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}
_HF_LAYER = re.compile(r"(text|vision)_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def convert_hf_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Maps a transformers `CLIPModel` state dict onto OpenAI's layout.

    HF keeps separate q/k/v projections and stores projections as Linear weights, i.e.
    transposed: (E, D) where OpenAI keeps a (D, E) matrix.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in hf.items():
        if key.endswith("position_ids"):
            continue  # a buffer of arange(), not a weight
        if key in _HF_FIXED:
            out[_HF_FIXED[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
        elif key == "visual_projection.weight":
            out["visual.proj"] = value.t().contiguous()
        elif m := _HF_LAYER.match(key):
            tower, idx, name, kind = m.groups()
            prefix = ("" if tower == "text" else "visual.") + f"transformer.resblocks.{idx}."
            if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((prefix, kind), {})[name[-6]] = value
            elif name in _HF_BLOCK:
                out[f"{prefix}{_HF_BLOCK[name]}.{kind}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{prefix}: incomplete q/k/v projections {sorted(parts)}")
        fused = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        out[f"{prefix}attn.in_proj_{kind}"] = fused
    if unknown:
        raise CheckpointError(f"unexpected keys in Hugging Face checkpoint: {_sample(unknown)}")
    return out


def hf_config_to_clip(hf: dict) -> CLIPConfig:
    """Our config from a transformers `config.json` of `model_type` "clip"."""
    if hf.get("model_type") not in (None, "clip"):
        raise CheckpointError(f"model_type {hf.get('model_type')!r} is not a CLIP model")
    v, t = hf.get("vision_config", {}), hf.get("text_config", {})
    act = t.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu") or v.get("hidden_act", act) != act:
        raise CheckpointError(f"unsupported activation {act!r}/{v.get('hidden_act')!r}")
    return CLIPConfig(
        embed_dim=hf.get("projection_dim", 512),
        vision=VisionConfig(
            kind="vit",
            image_size=v.get("image_size", 224),
            width=v.get("hidden_size", 768),
            layers=v.get("num_hidden_layers", 12),
            patch_size=v.get("patch_size", 32),
            heads=v.get("num_attention_heads", 12),
        ),
        text=TextConfig(
            context_length=t.get("max_position_embeddings", 77),
            vocab_size=t.get("vocab_size", 49408),
            width=t.get("hidden_size", 512),
            heads=t.get("num_attention_heads", 8),
            layers=t.get("num_hidden_layers", 12),
        ),
        act=act,
        ln_eps=t.get("layer_norm_eps", 1e-5),
    )


def _hf_preprocess(folder: Path, image_size: int) -> PreprocessConfig | None:
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None
    p = json.loads(path.read_text())
    crop = p.get("crop_size", image_size)
    size = crop.get("height", image_size) if isinstance(crop, dict) else crop
    # PIL resample code 3 is bicubic, what every CLIP preprocessor config uses.
    interps: dict[int, Interpolation] = {3: "bicubic", 2: "bilinear", 0: "nearest"}
    interp = interps.get(p.get("resample", 3), "bicubic")
    return PreprocessConfig(
        image_size=int(size),
        mean=tuple(p.get("image_mean", PreprocessConfig.mean)),
        std=tuple(p.get("image_std", PreprocessConfig.std)),
        interpolation=interp,
    )


def _read_hf_folder(folder: Path) -> Checkpoint:
    hf_config = json.loads((folder / "config.json").read_text())
    cfg = hf_config_to_clip(hf_config)
    if (folder / "model.safetensors").is_file():
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            hf_sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    elif (folder / "pytorch_model.bin").is_file():
        hf_sd = _read_torch(folder / "pytorch_model.bin")
    else:
        raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin")
    sd = convert_hf_state_dict(hf_sd)
    return Checkpoint(sd, cfg, _hf_preprocess(folder, cfg.vision.image_size), "huggingface")


# ---- public API --------------------------------------------------------------------------


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Reads weights (and whatever config the file carries) from any supported format."""
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: a model folder needs a Hugging Face config.json")
        ckpt = _read_hf_folder(path)
    elif not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    elif path.suffix == ".safetensors":
        ckpt = _read_safetensors(path)
    elif _is_torchscript(path):
        ckpt = Checkpoint(_read_torchscript(path), source_format="openai-torchscript")
    else:
        ckpt = Checkpoint(_read_torch(path), source_format="state_dict")
    ckpt.state_dict = _strip_prefixes(ckpt.state_dict)
    return ckpt


def _sample(keys: list[str], limit: int = 12) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_state_dict_strict(model: CLIP, state_dict: dict[str, torch.Tensor]) -> None:
    """Loads every tensor or fails naming the missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    # Batch-norm step counters are bookkeeping for training; some exports drop them.
    optional = {k for k in expected if k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in state_dict and k not in optional]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_sample(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_sample(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches (checkpoint vs model): {_sample(shapes)}")
    if problems:
        raise CheckpointError("checkpoint does not fit the architecture; " + "; ".join(problems))
    counters = {k: torch.zeros_like(expected[k]) for k in optional if k not in state_dict}
    full = {**counters, **state_dict}
    model.load_state_dict(full, strict=True)


def build_model(ckpt: Checkpoint, config: CLIPConfig | None = None) -> CLIP:
    """An eval-mode fp32 CLIP holding the checkpoint's weights.

    The architecture is, in order: the one given, the one the file names, or the one read
    off the tensor shapes.
    """
    cfg = config or ckpt.config
    if cfg is None:
        try:
            cfg = infer_config(ckpt.state_dict)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f"cannot infer an architecture from the checkpoint: {e}") from e
    # Build on the meta device: random initialisation would be thrown away at once.
    with torch.device("meta"):
        model = CLIP(cfg)
    model = model.to_empty(device="cpu")
    sd = {k: v.float() if v.is_floating_point() else v for k, v in ckpt.state_dict.items()}
    load_state_dict_strict(model, sd)
    return model.eval()


def save_checkpoint(
    model: CLIP, path: str | Path, preprocess: PreprocessConfig | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Writes safetensors whose metadata carries the architecture and preprocessing."""
    sd = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        sd[k] = v.contiguous().clone()
    meta = {"format": FORMAT_TAG, "config": model.config.to_json()}
    if preprocess is not None:
        meta["preprocess"] = json.dumps(preprocess.to_dict(), sort_keys=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=meta)
