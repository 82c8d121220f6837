"""CLIP's two towers exported for other inference engines (ONNX Runtime, OpenVINO), cached.

Each tower becomes its own graph with a dynamic batch; the text tower's sequence length is
dynamic too, and its dense layers run on the batch's real tokens packed together (as
`CLIP.encode_text` runs them), so a text costs its own tokens, not 77 nor its batch's
longest. The
image graph takes the uint8 (B, 3, S, S) pixels the service prepares and normalises them
itself, in `ImageTransform.normalize`'s order of operations, with the weights' mean and std.

An export lives in `<cache_dir>/exports/<key>/`, where the key is the SHA-256 of the
weights' SHA-256 (the checkpoint file's, or the state dict's for weights built in memory),
the engine, the opset, the precision, the preprocessing baked into the graph and this
module's format version. It is built in a temporary directory and moved into place with one
rename, its manifest written last, and on load every file is checked against the hashes
the manifest records: a corrupt, partial or stale export is logged, removed and rebuilt,
never served. Once built, serving needs neither the network nor, for registry models, the
checkpoint itself.

int8: ONNX Runtime quantises dynamically (weights int8 ahead of time, activations scaled
per batch at run time; MatMul/Gemm only, where the CPU's VNNI instructions pay), and
OpenVINO stores int8 weights through NNCF (`_to_openvino` says why not activations too).

`clip-export MODEL --engine onnxruntime [--int8]` builds an export ahead of time;
`--compare DIR` reports how far the export's embeddings are from PyTorch's on your images.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .config import PreprocessConfig
from .layers import Packing
from .model import CLIP
from .moderation.fingerprint import model_fingerprint

log = logging.getLogger(__name__)

FORMAT_VERSION = 4  # bump when the graphs change: every older export becomes stale
DEFAULT_OPSET = 17
Engine = Literal["onnxruntime", "openvino"]
Precision = Literal["fp32", "int8"]
ENGINES: tuple[Engine, ...] = ("onnxruntime", "openvino")
TOWERS = ("image", "text")
_MANIFEST = "manifest.json"
# How each engine's int8 is made; part of the key, so a change of recipe is a new export.
_INT8_RECIPES = {"onnxruntime": "ort-dynamic-matmul-gemm-per-channel-1",
                 "openvino": "nncf-compress-weights-int8-asym-1"}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ExportTarget:
    """What an export is built for; with the weights' hash, it names the cached export."""

    engine: Engine
    precision: Precision = "fp32"
    opset: int = DEFAULT_OPSET

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown export engine {self.engine!r}; known: {', '.join(ENGINES)}")
        if self.precision not in ("fp32", "int8"):
            raise ValueError(f"precision must be fp32 or int8, got {self.precision!r}")


@dataclass(frozen=True)
class ModelCard:
    """What a backend needs to know of the model without building it."""

    name: str
    embed_dim: int
    image_size: int
    context_length: int
    vocab_size: int
    logit_scale: float  # exp of the stored log: the factor cosines are multiplied by
    preprocess: PreprocessConfig
    # clip_core.moderation.model_fingerprint of the weights the export was traced from
    # (the engine adds what its precision changes); "" in exports made before it was kept.
    fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["preprocess"] = self.preprocess.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelCard:
        return cls(**{**d, "preprocess": PreprocessConfig.from_dict(d["preprocess"])})

    @classmethod
    def of(cls, name: str, model: CLIP, preprocess: PreprocessConfig) -> ModelCard:
        cfg = model.config
        return cls(name=name, embed_dim=cfg.embed_dim, image_size=preprocess.image_size,
                   context_length=cfg.text.context_length, vocab_size=cfg.text.vocab_size,
                   logit_scale=float(model.logit_scale.detach().float().exp()),
                   preprocess=preprocess, fingerprint=model_fingerprint(model, preprocess))


@dataclass(frozen=True)
class Export:
    """A verified export: each tower's graph file (.onnx, or OpenVINO's .xml beside its .bin)."""

    directory: Path
    target: ExportTarget
    card: ModelCard
    image: Path
    text: Path


# ---- the towers as export-friendly modules ----


class ImageTower(nn.Module):
    """uint8 (B, 3, S, S) pixels -> (B, E) fp32 embeddings, normalisation included."""

    def __init__(self, model: CLIP, preprocess: PreprocessConfig):
        super().__init__()
        self.model = model
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(preprocess.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocess.std).view(1, 3, 1, 1))
        # Eval now: the exporter puts a wrapper back in the mode it found it in, and a new
        # module's training mode would switch the model's batch norms to batch statistics.
        self.eval()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels.float() / 255 - self.mean) / self.std  # (B, 3, S, S) fp32
        # The ViT pools the class token inside its last block (one query there, not every
        # token's), as PyTorch serves it; one_query sizes its views by q.shape[0], so the
        # batch stays dynamic. The ResNet traces as it runs.
        return self.model.visual(x)  # (B, E)


@dataclass(frozen=True)
class _GraphPacking(Packing):
    """`Packing` as an exported graph computes it: every size read from a tensor's shape,
    which the tracer keeps symbolic (Packing's Python ints would be frozen to the example's
    batch); padding is put back by a gather, not a scatter (ONNX Runtime runs index_copy's
    ScatterElements on one thread, element by element: 15% of a batch's time); and a
    sequence's packed rows are found from its start, since ONNX has no searchsorted."""

    mask: torch.Tensor | None = None  # (B, L) bool: real tokens
    sources: torch.Tensor | None = None  # (B * L,) packed row of each position; T: padding
    starts: torch.Tensor | None = None  # (B,) each sequence's first row in the packed (T, ...)

    @classmethod
    def of_lengths(cls, lengths: torch.Tensor, length: int) -> _GraphPacking:
        mask = torch.arange(length, device=lengths.device) < lengths[:, None]  # (B, L)
        flat = mask.flatten()  # (B * L,)
        index = flat.nonzero().squeeze(1)  # (T,)
        sources = torch.where(flat, torch.cumsum(flat.long(), 0) - 1, index.shape[0])
        starts = torch.cumsum(lengths, 0) - lengths  # (B,)
        return cls(index, 0, 0, mask, sources, starts)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(T, D) -> (B, L, D), zeros at padded positions: row T of the extended input."""
        assert self.mask is not None and self.sources is not None
        extended = torch.cat([x, x.new_zeros(1, x.shape[1])])  # (T + 1, D)
        out = extended.index_select(0, self.sources)  # (B * L, D)
        return out.view(self.mask.shape[0], self.mask.shape[1], x.shape[1])

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        """(B,) positions, each inside its sequence -> (B,) rows in the packed (T, ...)."""
        assert self.starts is not None
        return self.starts + positions


class TextTower(nn.Module):
    """int64 (B, L) token ids, zero padded, L <= context length -> (B, E) fp32 embeddings.

    End-of-text has the largest id, so argmax finds each text's length at any L. The dense
    layers run on the T real tokens packed as (T, D); attention alone goes back to (B, L),
    where causality keeps the padding after a text's end from reaching its pooled token.
    """

    def __init__(self, model: CLIP):
        super().__init__()
        self.model = model
        self.eval()  # see ImageTower

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        n = tokens.shape[1]
        eot = tokens.argmax(dim=-1)  # (B,)
        packing = _GraphPacking.of_lengths(eot + 1, n)
        x = m.token_embedding(tokens) + m.positional_embedding[:n]  # (B, L, D)
        # The last block runs for the end-of-text query alone, as in CLIP.encode_text.
        x = m.transformer(packing.pack(x), causal=True, packing=packing, pool=eot)  # (B, D)
        return m.ln_final(x) @ m.text_projection  # (B, E)


def export_onnx(model: CLIP, preprocess: PreprocessConfig, directory: Path,
                opset: int = DEFAULT_OPSET) -> dict[str, Path]:
    """Both towers as fp32 ONNX files in `directory`: {"image": ..., "text": ...}.

    The TorchScript-based exporter: it traces in about half the dynamo exporter's time
    here and its graphs run the same in ONNX Runtime.
    """
    model = model.float().eval()
    s = preprocess.image_size
    ctx = model.config.text.context_length
    vocab = model.config.text.vocab_size
    tokens = torch.randint(1, vocab - 2, (2, min(9, ctx)))
    tokens[:, 0], tokens[:, -1] = vocab - 2, vocab - 1
    towers: dict[str, tuple[nn.Module, torch.Tensor, dict[int, str]]] = {
        "image": (ImageTower(model, preprocess),
                  torch.randint(0, 256, (2, 3, s, s), dtype=torch.uint8), {0: "batch"}),
        "text": (TextTower(model), tokens, {0: "batch", 1: "length"}),
    }
    out = {}
    for tower, (module, example, axes) in towers.items():
        path = directory / f"{tower}.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's and exporter's deprecation notes
            torch.onnx.export(module, (example,), str(path), input_names=["input"],
                              output_names=["embedding"], opset_version=opset,
                              dynamic_axes={"input": axes, "embedding": {0: "batch"}},
                              dynamo=False)
        out[tower] = path
    return out


# ---- calibration data for static int8 ----


def calibration_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """(n, 3, size, size) uint8 images with photographs' broad statistics: smooth colour
    fields at several scales, a lit gradient, a few hard-edged objects and sensor noise.
    Activation ranges from these sit much closer to real photos' than uniform noise's."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, size, size), dtype=np.uint8)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        img = np.zeros((3, size, size))
        for cells in (2, 4, 8, 16):  # octaves of smooth colour noise, coarse ones strongest
            grid = rng.normal(0, 1, (3, cells, cells))
            up = np.kron(grid, np.ones((size // cells + 1, size // cells + 1)))[:, :size, :size]
            img += up * (24 / cells**0.5)
        img += rng.uniform(60, 190, (3, 1, 1))  # the scene's base colour
        img += rng.uniform(-50, 50) * (yy * rng.uniform(-1, 1) + xx * rng.uniform(-1, 1))
        for _ in range(rng.integers(1, 4)):  # objects: discs and boxes of flat colour
            cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.3)
            mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) if rng.random() < 0.5 else (
                (abs(yy - cy) < r) & (abs(xx - cx) < r * rng.uniform(0.3, 1)))
            img[:, mask] = rng.uniform(0, 255, (3, 1))
        img += rng.normal(0, 4, img.shape)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


# ---- quantisation ----


def quantize_dynamic_int8(fp32: dict[str, Path], directory: Path) -> dict[str, Path]:
    """ONNX Runtime dynamic int8: MatMul and Gemm weights int8 (per channel), activations
    quantised per batch at run time. Convolutions stay fp32: ONNX Runtime's ConvInteger
    is slower on a CPU than its fp32 convolution."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = {}
    for tower, path in fp32.items():
        target = directory / f"{tower}.int8.onnx"
        quantize_dynamic(str(path), str(target), weight_type=QuantType.QInt8,
                         per_channel=True, op_types_to_quantize=["MatMul", "Gemm"])
        out[tower] = target
    return out


def _to_openvino(onnx: dict[str, Path], directory: Path, precision: Precision,
                 card: ModelCard) -> dict[str, Path]:
    """OpenVINO IR (.xml + .bin) per tower, weights kept fp32 (the CPU plugin picks its
    run-time precision itself: f32, or bf16 when asked). int8: NNCF's int8 weights."""
    import openvino as ov

    out = {}
    for tower, path in onnx.items():
        ir = ov.convert_model(str(path))
        if precision == "int8":
            import nncf

            # Weight-only int8 (asymmetric, per output channel): MatMul and convolution
            # weights are stored int8 and widened in the kernels. NNCF's full
            # post-training quantisation (activations too) moved clip-shapes' embeddings
            # to a cosine of 0.90 to fp32 with these calibration sets, which is not
            # servable; weights alone stay above 0.99 (docs/benchmarks.md).
            ir = nncf.compress_weights(ir, mode=nncf.CompressWeightsMode.INT8_ASYM)
        target = directory / f"{tower}.xml"
        ov.save_model(ir, str(target), compress_to_fp16=False)
        out[tower] = target
    return out


# ---- the cache ----


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def state_dict_sha256(model: nn.Module) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order: the
    weights' identity when they come from no file (random weights, a model in memory)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def export_key(weights_sha256: str, target: ExportTarget, preprocess: PreprocessConfig) -> str:
    """The cache key: everything that changes the files an export holds."""
    parts = {"format": FORMAT_VERSION, "weights": weights_sha256, "engine": target.engine,
             "precision": target.precision, "opset": target.opset,
             "recipe": _INT8_RECIPES[target.engine] if target.precision == "int8" else "",
             "image_size": preprocess.image_size, "mean": list(preprocess.mean),
             "std": list(preprocess.std)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def exports_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "exports"


def load_cached(cache_dir: Path, weights_sha256: str, target: ExportTarget,
                preprocess: PreprocessConfig) -> Export | None:
    """The cached export, verified file by file; None when there is none. One that fails
    its check (a missing or altered file, a manifest for other weights) is logged and
    removed, so the caller builds it again."""
    key = export_key(weights_sha256, target, preprocess)
    directory = exports_dir(cache_dir) / key
    if not directory.exists():
        return None
    problem = _check(directory, key)
    if problem is None:
        manifest = json.loads((directory / _MANIFEST).read_text())
        return Export(directory, target, ModelCard.from_dict(manifest["card"]),
                      directory / manifest["graphs"]["image"],
                      directory / manifest["graphs"]["text"])
    log.warning("export %s fails its check (%s); removing it to build it again",
                directory, problem)
    shutil.rmtree(directory, ignore_errors=True)
    return None


def _check(directory: Path, key: str) -> str | None:
    """Why the export in `directory` cannot be served, or None."""
    try:
        manifest = json.loads((directory / _MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"manifest unreadable: {e}"
    if manifest.get("key") != key or manifest.get("format") != FORMAT_VERSION:
        return "manifest is for other weights or another format"
    for name, expected in manifest.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != expected:
            return f"{name} does not match its recorded SHA-256"
    if not manifest.get("files"):
        return "manifest lists no files"
    return None


def build(model: CLIP, card: ModelCard, weights_sha256: str, target: ExportTarget,
          cache_dir: Path) -> Export:
    """Export `model` for `target` into the cache, replacing whatever was there."""
    key = export_key(weights_sha256, target, card.preprocess)
    root = exports_dir(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    log.info("exporting model %s for %s %s (opset %d) to %s", card.name, target.engine,
             target.precision, target.opset, final)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{key[:12]}-") as tmp:
        work = Path(tmp) / "build"
        staged = Path(tmp) / key
        work.mkdir()
        staged.mkdir()
        graphs = _fp32_onnx(model, card, weights_sha256, target, cache_dir, work)
        if target.engine == "onnxruntime":
            if target.precision == "int8":
                graphs = quantize_dynamic_int8(graphs, work)
            for tower, path in graphs.items():
                graphs[tower] = staged / f"{tower}.onnx"
                shutil.copyfile(path, graphs[tower])
        else:
            graphs = _to_openvino(graphs, staged, target.precision, card)
        files = {p.name: sha256_file(p) for p in sorted(staged.iterdir())}
        manifest = {"format": FORMAT_VERSION, "key": key, "weights_sha256": weights_sha256,
                    "target": asdict(target), "card": card.to_dict(), "files": files,
                    "graphs": {tower: p.name for tower, p in graphs.items()}}
        (staged / _MANIFEST).write_text(json.dumps(manifest, indent=2))
        if final.exists():  # a stale or corrupt one load_cached did not remove
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(staged, final)  # one rename: readers see all of it or none
        except OSError:
            if _check(final, key) is not None:  # another process won the race, or not
                raise
    found = load_cached(cache_dir, weights_sha256, target, card.preprocess)
    if found is None:
        raise RuntimeError(f"the export in {final} fails its check right after building")
    return found


def _fp32_onnx(model: CLIP, card: ModelCard, weights_sha256: str, target: ExportTarget,
               cache_dir: Path, work: Path) -> dict[str, Path]:
    """The fp32 ONNX graphs every export starts from: the cached onnxruntime fp32 export's
    when there is a sound one (tracing a ViT-B/32 takes most of a minute on 2 cores), else
    traced now into `work`."""
    base_target = ExportTarget("onnxruntime", "fp32", target.opset)
    if target != base_target:
        base = load_cached(cache_dir, weights_sha256, base_target, card.preprocess)
        if base is not None:
            log.info("starting from the fp32 ONNX export in %s", base.directory)
            return {"image": base.image, "text": base.text}
    return export_onnx(model, card.preprocess, work, target.opset)


# ---- from a model spec ----


@dataclass(frozen=True)
class WeightsIdentity:
    """A spec's weights as the cache knows them, found without building the model."""

    name: str
    sha256: str
    preprocess: PreprocessConfig


def identify(spec: str, *, cache_dir: Path, offline: bool = False) -> WeightsIdentity | None:
    """The weights' hash and preprocessing for a registry name or a checkpoint file, when
    they can be known without building the model (a registry entry's recorded SHA-256: not
    even the checkpoint is read). None for what must be built to be known (a folder)."""
    from . import loader
    from .checkpoint import read_checkpoint
    from .registry import get_entry

    path = Path(spec)
    if path.is_file():
        ckpt_pre = read_checkpoint(path).preprocess
        return WeightsIdentity(path.stem, sha256_file(path),
                               ckpt_pre or PreprocessConfig(image_size=_image_size(path)))
    if path.exists():
        return None
    entry = get_entry(spec)
    if entry.builtin:
        file = loader._builtin_file(entry, entry.builtin)
        return WeightsIdentity(entry.name, sha256_file(file), entry.preprocess)
    return WeightsIdentity(entry.name, entry.sha256.lower(), entry.preprocess)


def _image_size(path: Path) -> int:
    from .checkpoint import build_model, read_checkpoint

    return build_model(read_checkpoint(path)).config.vision.image_size


def ensure(spec: str, target: ExportTarget, *, cache_dir: Path, offline: bool = False,
           random_weights: bool = False) -> Export:
    """The export of `spec` for `target`: from the cache when it is there and sound, else
    built now (the model is loaded on the CPU in fp32 for it, then dropped)."""
    from .loader import load

    ident = None if random_weights else identify(spec, cache_dir=cache_dir, offline=offline)
    if ident is not None:
        found = load_cached(cache_dir, ident.sha256, target, ident.preprocess)
        if found is not None:
            log.info("model %s: serving the cached %s %s export in %s", ident.name,
                     target.engine, target.precision, found.directory)
            return found
    loaded = load(spec, device="cpu", dtype="fp32", cache_dir=cache_dir, offline=offline,
                  random_weights=random_weights, progress=False)
    weights = ident.sha256 if ident is not None else state_dict_sha256(loaded.model)
    card = ModelCard.of(loaded.name, loaded.model, loaded.preprocess)
    if ident is None:
        found = load_cached(cache_dir, weights, target, card.preprocess)
        if found is not None:
            return found
    return build(loaded.model, card, weights, target, cache_dir)


# ---- running an export ----

@dataclass
class Towers:
    """An export opened for inference: uint8 (B, 3, S, S) -> (B, E) and int64 (B, L) ->
    (B, E), fp32 numpy both; texts zero padded to any L. Each call may come from any
    thread; the calls use every thread the export was opened with.

    `lanes`: for runs side by side, stream i calls `lanes[i]`, which computes on its share
    of the threads, so that two runs at once do not fight over one pool (empty when the
    export was opened for one run at a time). A lane is a second session of the same
    graphs (ONNX Runtime) or a second compiled model (OpenVINO)."""

    image: Any  # Callable[[np.ndarray], np.ndarray]
    text: Any
    dtype: str  # what the engine computes in: "float32", "int8", "bfloat16"
    lanes: list[Towers] = field(default_factory=list)

    def sessions(self) -> list[Towers]:
        """This and each distinct lane: every session there is to warm up."""
        distinct = {id(t): t for t in [self, *self.lanes]}
        return list(distinct.values())


def lane_threads(threads: int, streams: int) -> int:
    """Each lane's threads when `streams` runs share `threads`; the remainder is left to
    the decoders and the event loop rather than given to one lane."""
    return max(1, threads // streams)


def _lanes(threads: int, streams: int, open_lane: Callable[[int], Towers]) -> list[Towers]:
    """`open_lane(n)` -> Towers on n threads, for each of `streams` runs side by side.

    No lanes with one stream or one thread: that one pool is all there is to share. A lane of
    one thread computes on its caller's thread alone, so one such session serves every
    stream at once (one more copy of the weights in all); wider lanes need a session each,
    or the streams would share one pool's workers again."""
    if streams <= 1 or threads <= 1:
        return []
    n = lane_threads(threads, streams)
    if n == 1:
        return [open_lane(1)] * streams
    return [open_lane(n) for _ in range(streams)]


def open_onnxruntime(export: Export, threads: int, streams: int = 1) -> Towers:
    """ONNX Runtime sessions on the CPU, with `threads` intra-op threads and every graph
    optimisation, and for `streams` > 1 a lane per stream (`Towers.lanes`).

    One session per thread count, because ONNX Runtime sizes a session's pool once:
    runs side by side on one session share its workers, and a worker that the decoders
    or the event loop preempt stalls both runs at its barrier (docs/benchmarks.md, "CPU
    engines: a lane a stream")."""
    import onnxruntime as ort

    dtype = "int8" if export.target.precision == "int8" else "float32"

    def session(path: Path, n: int):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = n
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads sleep rather than spin: beside them the server decodes
        # images and runs its event loop on the same cores, and a spinning pool takes
        # those cores between batches (docs/benchmarks.md, issue 23).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return lambda x: sess.run(None, {"input": x})[0]

    def towers(n: int) -> Towers:
        return Towers(session(export.image, n), session(export.text, n), dtype)

    whole = towers(threads)
    whole.lanes = _lanes(threads, streams, towers)
    return whole


def open_openvino(export: Export, threads: int, streams: int = 1,
                  bf16: bool = False) -> Towers:
    """OpenVINO compiled models on the CPU: one for a run at a time on all `threads`,
    and for `streams` > 1 one compiled for that many streams on a share of the threads
    each, which every lane uses (one infer request per calling thread). The inference
    precision is pinned: the CPU plugin would otherwise pick bf16 by itself wherever the
    CPU has it (this one has), and fp32 serving must stay within 1e-5 of PyTorch."""
    import threading

    import openvino as ov

    core = ov.Core()
    dtype = "int8" if export.target.precision == "int8" else "bfloat16" if bf16 else "float32"

    def compiled(path: Path, n: int, k: int):
        config = {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
                  "INFERENCE_NUM_THREADS": n * k, "NUM_STREAMS": k,
                  "PERFORMANCE_HINT": "LATENCY" if k == 1 else "THROUGHPUT"}
        model = core.compile_model(core.read_model(str(path)), "CPU", config)
        local = threading.local()

        def run(x: np.ndarray) -> np.ndarray:
            request = getattr(local, "request", None)
            if request is None:
                request = local.request = model.create_infer_request()
            return request.infer({0: x})[0].copy()  # the request reuses its buffer

        return run

    whole = Towers(compiled(export.image, threads, 1), compiled(export.text, threads, 1), dtype)
    # Even on one thread: a model compiled for one stream runs one request at a time (its
    # requests run on the plugin's stream threads, not the caller's), so streams side by
    # side need the model compiled for them, a thread each.
    if streams > 1:
        n = lane_threads(threads, streams)
        lane = Towers(compiled(export.image, n, streams), compiled(export.text, n, streams),
                      dtype)
        whole.lanes = [lane] * streams  # the compiled model gives each request a stream
    return whole


def open_export(export: Export, threads: int, streams: int = 1, bf16: bool = False) -> Towers:
    if export.target.engine == "onnxruntime":
        if bf16:
            raise ValueError("ONNX Runtime's CPU kernels have no bf16: serve fp32 or int8")
        return open_onnxruntime(export, threads, streams)
    return open_openvino(export, threads, streams, bf16)


class ExportedCLIP:
    """An opened export with the `encode_image`/`encode_text` of clip_core.model.CLIP, so
    offline tools (clip_core.evaluate, zero-shot) can run on it unchanged. Images arrive
    normalised, as CLIP takes them, and are turned back into the uint8 pixels the graph
    takes (exact: they were uint8 before normalising)."""

    def __init__(self, towers: Towers, card: ModelCard, config: Any):
        self.towers = towers
        self.card = card
        self.config = config  # clip_core.config.CLIPConfig: its context length is read
        self.logit_scale = torch.tensor(card.logit_scale).log()
        self._mean = torch.tensor(card.preprocess.mean).view(1, 3, 1, 1)
        self._std = torch.tensor(card.preprocess.std).view(1, 3, 1, 1)

    def eval(self) -> ExportedCLIP:
        return self

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        pixels = ((images.float() * self._std + self._mean) * 255).round().clamp(0, 255)
        x = torch.from_numpy(self.towers.image(pixels.to(torch.uint8).numpy()))
        return torch.nn.functional.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        length = int(tokens.argmax(dim=-1).max()) + 1  # trimmed, as the service sends them
        x = torch.from_numpy(self.towers.text(tokens[:, :length].numpy()))
        return torch.nn.functional.normalize(x, dim=-1) if normalize else x


def evaluate_export(export: Export, towers: Towers, model: CLIP, *, per_combo: int = 20,
                    retrieval_n: int = 1000) -> dict[str, dict]:
    """clip_core.evaluate's held-out scene evaluation of PyTorch fp32 and of the export,
    side by side: {"torch": report, "export": report}."""
    from typing import cast

    from .evaluate import evaluate_scenes

    pre = export.card.preprocess
    exported = cast(CLIP, ExportedCLIP(towers, export.card, model.config))
    return {name: evaluate_scenes(m, pre, per_combo=per_combo, retrieval_n=retrieval_n)
            for name, m in (("torch", model), ("export", exported))}


# ---- the command line ----


def compare(export: Export, towers: Towers, spec: str, images: Path, *, cache_dir: Path,
            offline: bool = False) -> dict[str, float]:
    """Cosine between the export's and PyTorch fp32's embeddings of the images in a folder
    and of their file names read as texts: how far an export (int8 above all) moves your
    own data."""
    from PIL import Image

    from .loader import load
    from .preprocess import ImageTransform
    from .tokenizer import Tokenizer

    files = sorted(p for p in images.iterdir()
                   if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp", ".bmp"))
    if not files:
        raise SystemExit(f"no images in {images}")
    loaded = load(spec, dtype="fp32", cache_dir=cache_dir, offline=offline, progress=False)
    transform = ImageTransform(loaded.preprocess)
    pixels = torch.stack([transform.pixels(Image.open(p)) for p in files])  # (N, 3, S, S) u8
    tok = Tokenizer(context_length=loaded.model.config.text.context_length)
    ids = tok([p.stem.replace("_", " ").replace("-", " ") for p in files]).ids  # (N, 77)
    with torch.no_grad():
        ref_img = ImageTower(loaded.model, loaded.preprocess)(pixels).numpy()
        ref_txt = loaded.model.encode_text(ids).numpy()
    length = int(ids.argmax(dim=-1).max()) + 1
    got_img = np.concatenate([towers.image(pixels[i:i + 16].numpy())
                              for i in range(0, len(files), 16)])
    got_txt = towers.text(ids[:, :length].numpy())
    report = {"images": float(len(files))}
    for kind, a, b in (("image", got_img, ref_img), ("text", got_txt, ref_txt)):
        cos = _cosines(a, b)
        report[f"{kind}_cosine_min"] = float(cos.min())
        report[f"{kind}_cosine_mean"] = float(cos.mean())
    return report


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (N, E) arrays."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def main(argv: list[str] | None = None) -> int:
    from .hub import default_cache_dir

    parser = argparse.ArgumentParser(prog="clip-export", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a registry name or a checkpoint path")
    parser.add_argument("--engine", choices=ENGINES, required=True)
    parser.add_argument("--int8", action="store_true", help="quantise to int8")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="default: $CLIP_CACHE_DIR, else the weights' cache")
    parser.add_argument("--offline", action="store_true", help="never download weights")
    parser.add_argument("--random-weights", action="store_true", help="tests and benchmarks")
    parser.add_argument("--compare", type=Path, metavar="DIR",
                        help="report the export's cosine to PyTorch fp32 on the images in "
                             "DIR (and their file names as texts)")
    parser.add_argument("--evaluate", action="store_true",
                        help="the held-out scene evaluation (clip_core.evaluate) of PyTorch "
                             "fp32 and of the export: for the models trained on the scenes")
    parser.add_argument("--bf16", action="store_true",
                        help="with --compare or --evaluate: OpenVINO computes in bf16")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cache = args.cache_dir or Path(os.environ.get("CLIP_CACHE_DIR") or default_cache_dir())
    target = ExportTarget(args.engine, "int8" if args.int8 else "fp32", args.opset)
    export = ensure(args.model, target, cache_dir=cache, offline=args.offline,
                    random_weights=args.random_weights)
    print(export.directory)
    if args.compare is not None:
        towers = open_export(export, threads=os.cpu_count() or 1, bf16=args.bf16)
        report = compare(export, towers, args.model, args.compare, cache_dir=cache,
                         offline=args.offline)
        print(json.dumps(report, indent=2))
    if args.evaluate:
        from .evaluate import format_report
        from .loader import load

        towers = open_export(export, threads=os.cpu_count() or 1, bf16=args.bf16)
        model = load(args.model, dtype="fp32", cache_dir=cache, offline=args.offline,
                     progress=False).model
        for name, r in evaluate_export(export, towers, model).items():
            print(f"== {name}\n{format_report(r)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
