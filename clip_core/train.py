"""Contrastive training and fine-tuning, as in the CLIP paper.

Each step embeds B images and their B captions and scores every image against every caption;
the loss is the mean of the cross-entropies over rows (image -> its caption) and over columns
(caption -> its image), so every other pair in the batch is a negative. The temperature is
learned as log(logit_scale), starts at 1/0.07 and is clamped at 100.

`clip-train --config CONFIG.json --out DIR` (or `python -m clip_core.train`). DIR receives
`config.json`, `log.jsonl`, periodic `last.safetensors` + `state.pt` (optimizer and step:
`--resume` continues from them), and the final `model.safetensors`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .checkpoint import load_state_dict_strict, read_checkpoint, save_checkpoint
from .config import CLIPConfig, PreprocessConfig, load_architecture
from .datasets import CaptionFolder, Collate, SceneDataset, StepSampler
from .errors import ClipCoreError, InvalidInput
from .loader import load, resolve_dtype
from .model import CLIP
from .preprocess import ImageTransform
from .resnet import ModifiedResNet

log = logging.getLogger(__name__)

MAX_LOGIT_SCALE = 100.0  # the paper's clamp, "to prevent scaling the logits by more than 100"


@dataclass(frozen=True)
class DataConfig:
    kind: Literal["scenes", "folder"] = "scenes"
    seed: int = 0  # scenes: which scenes
    size: int = 1_000_000  # scenes: how many distinct ones (an epoch)
    root: str | None = None  # folder: the images
    captions: str | None = None  # folder: the captions file, JSON lines or CSV


@dataclass(frozen=True)
class TrainConfig:
    # A config name in clip_core/configs (or the config itself), randomly initialised
    architecture: str | dict[str, Any] | None = None
    init: str | None = None  # or: any loadable checkpoint or registry name to fine-tune
    preprocess: dict[str, Any] | None = None  # default: the init's, else CLIP's at the arch size
    data: DataConfig = field(default_factory=DataConfig)
    steps: int = 1000
    batch_size: int = 256
    lr: float = 5e-4
    min_lr: float = 0.0
    warmup_steps: int = 100
    weight_decay: float = 0.2  # on matrices only; see param_groups
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float | None = 1.0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: int = 0
    checkpoint_every: int = 200
    log_every: int = 10
    workers: int = 1  # data loader processes; 0 = in the training process
    threads: int | None = None  # torch CPU threads; None = torch's default
    device: str = "auto"

    def __post_init__(self) -> None:
        if (self.architecture is None) == (self.init is None):
            raise InvalidInput("give exactly one of 'architecture' (from scratch) or 'init'")
        if isinstance(self.data, dict):
            object.__setattr__(self, "data", _strict(DataConfig, self.data, "data"))
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.data.kind == "folder" and not (self.data.root and self.data.captions):
            raise InvalidInput("a folder dataset needs data.root and data.captions")
        if self.steps <= 0 or self.batch_size <= 1:
            raise InvalidInput("steps must be positive and batch_size at least 2")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return _strict(cls, d, "config")

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _strict(cls, d: dict[str, Any], where: str):
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise InvalidInput(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    return cls(**d)


# ---- the method ----


def contrastive_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """(B, B) scaled cosines, pair i on the diagonal -> the symmetric cross-entropy."""
    target = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, target)
            + F.cross_entropy(logits_per_image.t(), target)) / 2


def param_groups(model: CLIP, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices and convolutions only.

    Gains, biases, the temperature and the embeddings (token, positional, class) are left
    undecayed, as in the paper: decaying them shrinks scales the model needs.
    """
    decay: list[torch.nn.Parameter] = []
    keep: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        embedding = "embedding" in name.rsplit(".", 1)[-1] or name.startswith("token_embedding")
        (keep if p.ndim < 2 or embedding else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": keep, "weight_decay": 0.0}]


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to `lr`, then a cosine to `min_lr` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None = plain fp32. auto: bf16 on CUDA that has it, else fp16 on CUDA; fp32 on the CPU
    (CPU autocast is slower than fp32 on most CPUs without AMX)."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None if precision == "fp32" else resolve_dtype(precision, device)


# ---- the loop ----


@dataclass
class TrainResult:
    out: Path
    model_path: Path
    steps: int
    seconds: float
    first_loss: float
    last_loss: float


class Trainer:
    def __init__(self, cfg: TrainConfig, out: str | Path, resume: bool = False):
        self.cfg, self.out = cfg, Path(out)
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        )
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.model, self.preprocess = self._build()
        # A ResNet tower's convolutions are faster channels-last (oneDNN's native layout on
        # the CPU; docs/models/clip-shapes.md has the step times). The same arithmetic,
        # summed in another order; checkpoints are saved contiguous.
        self.layout = (torch.channels_last if isinstance(self.model.visual, ModifiedResNet)
                       else torch.contiguous_format)
        self.model.to(self.device).train()
        self.model.visual.to(memory_format=self.layout)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay),
                                           lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        self.amp = _autocast_dtype(cfg.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.amp == torch.float16)
        self.normalize = ImageTransform(self.preprocess).normalize
        self.step = 0
        state = self.out / "state.pt"
        if resume:
            if not state.exists():
                raise InvalidInput(f"nothing to resume: {state} does not exist")
            self._restore()
        elif state.exists():
            raise InvalidInput(f"{self.out} holds a run already; pass --resume or another --out")

    def _build(self) -> tuple[CLIP, PreprocessConfig]:
        cfg = self.cfg
        if cfg.init:
            loaded = load(cfg.init, dtype=torch.float32)
            model, preprocess = loaded.model, loaded.preprocess
        else:
            arch = cfg.architecture
            assert arch is not None  # TrainConfig asks for exactly one of architecture, init
            model = CLIP(CLIPConfig.from_dict(arch) if isinstance(arch, dict)
                         else load_architecture(arch))
            preprocess = PreprocessConfig(image_size=model.config.vision.image_size)
        if cfg.preprocess:
            preprocess = PreprocessConfig.from_dict(cfg.preprocess)
        return model.float(), preprocess

    def dataset(self) -> SceneDataset | CaptionFolder:
        d = self.cfg.data
        if d.kind == "scenes":
            return SceneDataset(d.seed, d.size, self.preprocess.image_size)
        assert d.root and d.captions  # TrainConfig checks a folder dataset names both
        return CaptionFolder(d.root, d.captions)

    def _save(self, final: bool = False) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        weights = self.out / ("model.safetensors" if final else "last.safetensors")
        tmp = weights.with_suffix(".tmp")
        save_checkpoint(self.model, tmp, self.preprocess)
        os.replace(tmp, weights)
        if not final:
            state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                     "scaler": self.scaler.state_dict()}
            torch.save(state, self.out / "state.tmp")
            os.replace(self.out / "state.tmp", self.out / "state.pt")
        return weights

    def _restore(self) -> None:
        ckpt = read_checkpoint(self.out / "last.safetensors")
        load_state_dict_strict(self.model, {k: v.float() for k, v in ckpt.state_dict.items()})
        self.model.to(self.device)
        state = torch.load(self.out / "state.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        log.info("resuming %s at step %d", self.out, self.step)

    def train_step(self, pixels: torch.Tensor, ids: torch.Tensor) -> tuple[float, float]:
        """One optimizer step on a batch; the loss and in-batch image->text top-1 accuracy."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.cfg, self.step)
        images = self.normalize(pixels.to(self.device, non_blocking=True))  # (B, 3, S, S)
        images = images.contiguous(memory_format=self.layout)
        with torch.autocast(self.device.type, dtype=self.amp or torch.float32,
                            enabled=self.amp is not None):
            logits, _ = self.model(images, ids.to(self.device))  # (B, B)
            loss = contrastive_loss(logits.float())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
        self.step += 1
        target = torch.arange(logits.shape[0], device=logits.device)
        acc = (logits.argmax(dim=1) == target).float().mean().item()
        return loss.item(), acc

    def run(self, progress: bool = True, until: int | None = None) -> TrainResult:
        """Trains to the config's last step, or stops after step `until` with a resumable
        checkpoint (the schedule still spans all steps, so a resumed run is the same run)."""
        cfg = self.cfg
        stop = min(cfg.steps, until or cfg.steps)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        data = self.dataset()
        loader = torch.utils.data.DataLoader(
            data,
            batch_sampler=StepSampler(len(data), cfg.batch_size, cfg.seed, self.step, stop),
            collate_fn=Collate(self.preprocess, self.model.config.text.context_length),
            num_workers=cfg.workers, persistent_workers=False,
            pin_memory=self.device.type == "cuda",
        )
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not progress, unit="step",
                   dynamic_ncols=True)
        first = last = float("nan")
        start, rate, tick = time.perf_counter(), 0.0, time.perf_counter()
        with (self.out / "log.jsonl").open("a") as logf:
            for pixels, ids in loader:
                loss, acc = self.train_step(pixels, ids)
                now = time.perf_counter()
                rate = 0.9 * rate + 0.1 * pixels.shape[0] / (now - tick) if rate else (
                    pixels.shape[0] / (now - tick))
                tick = now
                first = loss if math.isnan(first) else first
                last = loss
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.2f}",
                                scale=f"{self.model.logit_scale.exp().item():.1f}",
                                pairs_s=f"{rate:.0f}")
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    logf.write(json.dumps({
                        "step": self.step, "loss": round(loss, 5), "acc": round(acc, 4),
                        "lr": learning_rate(cfg, self.step - 1),
                        "logit_scale": round(self.model.logit_scale.exp().item(), 3),
                        "pairs_per_s": round(rate, 1),
                        "elapsed_s": round(now - start, 1)}) + "\n")
                    logf.flush()
                if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
                    self._save()
        bar.close()
        path = self._save()  # resumable even at the end (e.g. to train for longer)
        if self.step == cfg.steps:
            path = self._save(final=True)
        return TrainResult(self.out, path, self.step, time.perf_counter() - start, first, last)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="clip-train", description="Contrastive training or fine-tuning of a CLIP model.")
    parser.add_argument("--config", required=True, help="a training config (JSON)")
    parser.add_argument("--out", required=True, help="folder for checkpoints and logs")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument("--steps", type=int, help="override the config's steps")
    parser.add_argument("--until", type=int, metavar="STEP",
                        help="stop after this step, resumable with --resume")
    parser.add_argument("--device", help="override the config's device (cpu, cuda, ...)")
    parser.add_argument("--no-eval", action="store_true",
                        help="skip the held-out evaluation after training on scenes")
    parser.add_argument("--export-fp16", metavar="FILE",
                        help="also write the final weights as fp16 safetensors here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        raw = json.loads(Path(args.config).read_text())
        raw.update({k: v for k, v in (("steps", args.steps), ("device", args.device)) if v})
        cfg = TrainConfig.from_dict(raw)
        trainer = Trainer(cfg, args.out, resume=args.resume)
        result = trainer.run(until=args.until)
    except (ClipCoreError, OSError, json.JSONDecodeError) as e:
        print(f"clip-train: {e}", file=sys.stderr)
        return 1
    print(f"trained {result.steps} steps in {result.seconds / 60:.1f} min: loss "
          f"{result.first_loss:.3f} -> {result.last_loss:.3f}; weights in {result.model_path}")
    if args.export_fp16:
        save_checkpoint(trainer.model, args.export_fp16, trainer.preprocess, dtype=torch.float16)
        print(f"fp16 copy: {args.export_fp16}")
    if cfg.data.kind == "scenes" and not args.no_eval and result.steps == cfg.steps:
        from .evaluate import evaluate_scenes, format_report

        trainer.model.eval()
        report = evaluate_scenes(trainer.model, trainer.preprocess)
        (Path(args.out) / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
        print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
