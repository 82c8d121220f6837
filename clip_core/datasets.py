"""(image, caption) datasets for training, and the collate that turns them into tensors.

Two sources: a folder of images with a captions file (JSON lines or CSV), the shape people
fine-tune with, and the procedural scenes of `scenes.py`. Both are random-access, so the
trainer's sample order is a pure function of (seed, step) and a resumed run sees exactly
the samples the uninterrupted run would have.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image

from .config import PreprocessConfig
from .errors import InvalidInput
from .preprocess import ImageTransform, open_image
from .scenes import SceneGenerator, Split
from .tokenizer import Tokenizer


class CaptionFolder(torch.utils.data.Dataset):
    """Images under `root` named by a captions file.

    JSON lines: one `{"image": "relative/path.jpg", "caption": "..."}` per line.
    CSV: a header with `image` and `caption` columns. An image may appear on several lines
    (one pair per caption).
    """

    def __init__(self, root: str | Path, captions: str | Path):
        self.root = Path(root)
        path = Path(captions)
        if not path.is_absolute() and not path.exists():
            path = self.root / path
        self.pairs = _read_pairs(path)
        if not self.pairs:
            raise InvalidInput(f"{path}: no (image, caption) pairs")
        missing = [p for p, _ in self.pairs if not (self.root / p).is_file()]
        if missing:
            raise InvalidInput(
                f"{len(missing)} images named in {path} are not under {self.root}, e.g. "
                f"{missing[0]!r}"
            )

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        name, text = self.pairs[index]
        return open_image(self.root / name, formats=None), text


def _read_pairs(path: Path) -> list[tuple[str, str]]:
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
                raise InvalidInput(f"{path}: the CSV header needs 'image' and 'caption' columns")
            return [(row["image"], row["caption"]) for row in reader]
    pairs = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append((str(row["image"]), str(row["caption"])))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise InvalidInput(
                    f"{path}:{n}: expected {{\"image\": ..., \"caption\": ...}} ({e})"
                ) from None
    return pairs


class SceneDataset(torch.utils.data.Dataset):
    """`length` procedural scenes of one seed; sample i is the same on every run."""

    def __init__(self, seed: int, length: int, image_size: int, split: Split = "train"):
        self.seed, self.length = seed, length
        self.generator = SceneGenerator(image_size, split=split)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        return self.generator.sample(self.seed, index)


class Collate:
    """[(image, caption)] -> (uint8 pixels (B, 3, S, S), token ids (B, context)).

    Pixels stay uint8 until the trainer normalises them on its device: a quarter of the bytes
    through the loader's queue.
    """

    def __init__(self, preprocess: PreprocessConfig, context_length: int):
        self.transform = ImageTransform(preprocess)
        self.tokenizer = Tokenizer(context_length=context_length)

    def __call__(self, batch: Sequence[tuple[Image.Image, str]]):
        pixels = torch.stack([self.transform.pixels(image) for image, _ in batch])
        ids = self.tokenizer([text for _, text in batch], truncate=True).ids
        return pixels, ids


class StepSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of indices from `start_step` on: epoch e is a permutation seeded by (seed, e).

    A pure function of (seed, step), so resuming at step k yields the same batches as an
    uninterrupted run from step k.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int, steps: int):
        if n < batch_size:
            raise InvalidInput(f"the dataset has {n} pairs, fewer than one batch ({batch_size})")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start, self.steps = start_step, steps
        self.per_epoch = n // batch_size  # the ragged tail of each epoch is dropped

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        # (n,) the current epoch's permutation; the first step always draws one (e >= 0).
        epoch, order = -1, torch.empty(0, dtype=torch.long)
        for step in range(self.start, self.steps):
            e, k = divmod(step, self.per_epoch)
            if e != epoch:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
                epoch, order = e, torch.randperm(self.n, generator=g)
            yield order[k * self.batch_size : (k + 1) * self.batch_size].tolist()
