"""Labelled image sets for the offline moderation tools, read from folders or CSV files.

Two layouts, both documented in docs/moderation.md:

- a folder with one sub-folder per class (`DIR/<class>/*.png`): one label per image;
- a CSV file of `path,label[,label...]` rows, paths relative to the file's folder: any
  number of labels per image, none included (an image that is negative for every class).
  A first row starting with `path` is a header and skipped.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InvalidInput

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


@dataclass(frozen=True)
class LabelledImages:
    """`paths` (N,) with `labels` (N, C) bool over `classes` (C,)."""

    paths: list[Path]
    labels: np.ndarray
    classes: list[str]
    multi_label: bool

    def __post_init__(self) -> None:
        if self.labels.shape != (len(self.paths), len(self.classes)):
            raise ValueError(f"labels {self.labels.shape} do not fit {len(self.paths)} paths "
                             f"and {len(self.classes)} classes")

    def subset(self, index: np.ndarray) -> LabelledImages:
        return LabelledImages([self.paths[i] for i in index], self.labels[index],
                              self.classes, self.multi_label)


def images_in(folder: Path) -> list[Path]:
    """The image files directly in `folder`, by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_class_folders(root: str | Path) -> LabelledImages:
    """`root/<class>/*` -> single-label images; classes in name order."""
    root = Path(root)
    if not root.is_dir():
        raise InvalidInput(f"{root}: not a folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(folders) < 2:
        raise InvalidInput(f"{root}: needs one sub-folder per class, at least two; "
                           f"found {len(folders)}")
    paths: list[Path] = []
    rows: list[int] = []
    for c, folder in enumerate(folders):
        found = images_in(folder)
        if not found:
            raise InvalidInput(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        paths += found
        rows += [c] * len(found)
    labels = np.zeros((len(paths), len(folders)), dtype=bool)
    labels[np.arange(len(paths)), rows] = True
    return LabelledImages(paths, labels, [f.name for f in folders], multi_label=False)


def read_label_rows(file: str | Path) -> list[tuple[Path, list[str]]]:
    """`path,label[,label...]` rows -> (absolute-or-relative-to-file path, labels)."""
    file = Path(file)
    if not file.is_file():
        raise InvalidInput(f"{file}: no such file")
    rows = []
    with file.open(newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.reader(f), 1):
            cells = [c.strip() for c in row]
            if not cells or not cells[0]:
                continue
            if n == 1 and cells[0].lower() == "path":
                continue
            path = Path(cells[0])
            if not path.is_absolute():
                path = file.parent / path
            if not path.is_file():
                raise InvalidInput(f"{file}:{n}: no image at {path}")
            rows.append((path, sorted({c for c in cells[1:] if c})))
    if not rows:
        raise InvalidInput(f"{file}: no rows")
    return rows


def read_label_csv(file: str | Path, classes: list[str] | None = None) -> LabelledImages:
    """Multi-label images from a CSV; `classes` defaults to every label seen, sorted."""
    rows = read_label_rows(file)
    seen = sorted({label for _, labels in rows for label in labels})
    if classes is None:
        classes = seen
    unknown = sorted(set(seen) - set(classes))
    if unknown:
        raise InvalidInput(f"{file}: labels {unknown} are not among {classes}")
    if not classes:
        raise InvalidInput(f"{file}: no labels at all")
    index = {c: i for i, c in enumerate(classes)}
    labels = np.zeros((len(rows), len(classes)), dtype=bool)
    for i, (_, names) in enumerate(rows):
        labels[i, [index[n] for n in names]] = True
    return LabelledImages([p for p, _ in rows], labels, list(classes), multi_label=True)
