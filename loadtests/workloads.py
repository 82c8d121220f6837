"""What the load tests send: photo-like JPEGs, unique captions, and the request shapes of
real use (one image, sixteen images, one short text, one image against a fixed label set).

Everything is generated from a seed, so two runs send the same bytes. Images are encoded
once into a pool before a run, so the client's CPU does not encode JPEGs while it measures.
Imports neither torch nor the service: the Locust file loads this too.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

POOL_SIZE = 64

# The content-moderation shape: one image against the same labels every time, so the
# server builds the classifier once and each request costs one image.
MODERATION_LABELS = (
    "a safe everyday photo",
    "graphic violence",
    "a weapon",
    "blood or gore",
    "drugs or drug paraphernalia",
    "nudity",
    "a hate symbol",
    "self-harm",
    "a screenshot of text",
    "a cartoon or drawing",
)

WORDS = (
    "a", "the", "of", "on", "in", "with", "and", "two", "three", "small", "large", "old",
    "new", "red", "blue", "green", "yellow", "white", "black", "brown", "dark", "bright",
    "sunny", "rainy", "snowy", "photo", "picture", "close-up", "view", "dog", "cat",
    "horse", "bird", "car", "bus", "bicycle", "boat", "train", "tree", "flower", "garden",
    "house", "street", "city", "river", "lake", "beach", "mountain", "forest", "field",
    "road", "bridge", "building", "window", "table", "chair", "kitchen", "child", "man",
    "woman", "people", "group", "running", "sitting", "standing", "playing", "eating",
    "parked", "near", "under", "behind", "front", "top", "side", "morning", "evening",
    "night", "sky", "clouds", "water", "grass", "sand", "stone",
)


def photo_jpeg(seed: int) -> bytes:
    """A photo-like JPEG of about 640×480 (a quarter portrait): smooth gradients, random
    ellipses and rectangles, light noise; quality 90. Same seed, same bytes."""
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(600, 681)), int(rng.integers(440, 521))
    if rng.random() < 0.25:
        w, h = h, w
    # Two-colour gradient along a random direction: (h, w, 3) floats in 0..255.
    c0, c1 = rng.uniform(0, 255, 3).astype(np.float32), rng.uniform(0, 255, 3).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.arange(w, dtype=np.float32)[None, :] * np.float32(np.cos(angle))
         + np.arange(h, dtype=np.float32)[:, None] * np.float32(np.sin(angle)))  # (h, w)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    base = c0 + (c1 - c0) * t[..., None]
    img = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 12))):
        x0, y0 = int(rng.integers(-w // 4, w)), int(rng.integers(-h // 4, h))
        x1, y1 = x0 + int(rng.integers(w // 10, w // 2)), y0 + int(rng.integers(h // 10, h // 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=fill)
    # Soft edges and sensor-like noise, so the JPEG's size and decode cost look like a photo's.
    img = img.filter(ImageFilter.GaussianBlur(1.5))
    noise = rng.integers(-6, 7, (h, w, 3), dtype=np.int16)
    noisy = (np.asarray(img, np.int16) + noise).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@dataclass(frozen=True)
class ImagePool:
    jpegs: tuple[bytes, ...]
    b64: tuple[bytes, ...]  # ASCII base64 of each JPEG, ready to splice into a JSON body


def image_pool(n: int = POOL_SIZE, seed: int = 0) -> ImagePool:
    """The pool for (n, seed), encoded once per process however it is asked for."""
    # lru_cache keys on how arguments are spelled: image_pool() and image_pool(seed=0)
    # would be two entries, and the Locust users would re-encode the pool mid-run.
    return _encoded_pool(n, seed)


@functools.lru_cache(maxsize=4)
def _encoded_pool(n: int, seed: int) -> ImagePool:
    jpegs = tuple(photo_jpeg(seed * 1_000_003 + i) for i in range(n))
    return ImagePool(jpegs, tuple(base64.b64encode(j) for j in jpegs))


class Captions:
    """Unique short captions: 2–12 words, the last a running number, so no two texts of a
    run are equal and the server's text cache never answers for the model."""

    def __init__(self, seed: int = 0):
        self._rng = random.Random(seed)
        self._n = 0

    def __call__(self) -> str:
        self._n += 1
        words = self._rng.choices(WORDS, k=self._rng.randint(1, 11))
        return " ".join([*words, str(self._n)])


@dataclass(frozen=True)
class Call:
    """One request: where it goes, its JSON body, and how many items it asks for."""

    kind: str
    path: str
    body: bytes
    items: int


def _images_body(b64: list[bytes], extra: bytes = b"") -> bytes:
    return b'{"images":["' + b'","'.join(b64) + b'"]' + extra + b"}"


class Workload:
    """Builds the next request of a named workload; deterministic for a given seed.

    image1: POST /embed, one JPEG. image16: sixteen. text: one unique caption.
    classify: POST /classify, one JPEG against MODERATION_LABELS. mix: 40% image1,
    40% text, 20% classify.
    """

    MIX = (("image1", 0.4), ("text", 0.4), ("classify", 0.2))

    def __init__(self, name: str, seed: int = 0, pool: ImagePool | None = None,
                 image_seed: int = 0):
        if name not in WORKLOADS:
            raise ValueError(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)}")
        self.name = name
        self._pool = pool
        self._image_seed = image_seed
        self._rng = random.Random(seed)
        self._captions = Captions(seed)
        self._next_image = 0
        self._labels = b',"labels":' + json.dumps(list(MODERATION_LABELS)).encode()
        self._build: dict[str, Callable[[], Call]] = {
            "image1": lambda: Call("image1", "/embed", _images_body(self._images(1)), 1),
            "image16": lambda: Call("image16", "/embed", _images_body(self._images(16)), 16),
            "text": lambda: Call("text", "/embed",
                                 json.dumps({"texts": [self._captions()]}).encode(), 1),
            "classify": lambda: Call("classify", "/classify",
                                     _images_body(self._images(1), self._labels), 1),
        }

    @property
    def pool(self) -> ImagePool:
        """Built on first use (seconds of CPU): call before a timed run, not during it."""
        if self._pool is None:
            self._pool = image_pool(seed=self._image_seed)
        return self._pool

    @property
    def uses_images(self) -> bool:
        return self.name != "text"

    def _images(self, n: int) -> list[bytes]:
        b64 = self.pool.b64
        out = [b64[(self._next_image + i) % len(b64)] for i in range(n)]
        self._next_image += n
        return out

    def next(self) -> Call:
        name = self.name
        if name == "mix":
            r, acc = self._rng.random(), 0.0
            for name, share in self.MIX:  # noqa: B007 (the last name is the fallback)
                acc += share
                if r < acc:
                    break
        return self._build[name]()


WORKLOADS = ("image1", "image16", "text", "classify", "mix")
