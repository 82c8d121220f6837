"""A real server process for the client tests (loadtests/serverproc, as tests/e2e use),
generated scenes the default model knows, and clip_core's own embeddings of them."""

from __future__ import annotations

import io
import subprocess
import tempfile

import numpy as np
import torch
from PIL import Image
from serverproc import ServerDidNotStart, ServerProcess

from clip_core.loader import load
from clip_core.preprocess import ImageTransform, open_image
from clip_core.scenes import COLOURS, SHAPES, SceneGenerator
from clip_core.tokenizer import Tokenizer

KEY = "client-test-key-0123456789"


class Server(ServerProcess):
    """The default model (builtin/clip-shapes) on 127.0.0.1; `env` adds CLIP_*."""

    def __init__(self, env: dict[str, str]):
        self._log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (lives as long as the server)
        super().__init__([], {"CLIP_LOG_FORMAT": "text", **env},
                         stdout=self._log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read()


def start_all(envs: list[dict[str, str]]) -> list[Server]:
    """Servers started side by side, each ready (or all stopped and the output shown)."""
    servers = [Server(env) for env in envs]
    for s in servers:
        try:
            s.wait_ready(120)
        except ServerDidNotStart as e:
            outputs = "\n".join(x.output() for x in servers)
            for x in servers:
                x.stop()
            raise AssertionError(f"{e}; their output:\n{outputs}") from None
    return servers


def scene(colour: str, shape: str, seed: int = 0) -> Image.Image:
    """One `colour` `shape` on a background, as the default model was trained on."""
    gen = SceneGenerator(128, split="all")
    rng = np.random.default_rng([seed, list(COLOURS).index(colour), SHAPES.index(shape)])
    return gen.render(gen.scene(rng, combo=(colour, shape)), rng)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


class Reference:
    """clip_core's unit embeddings, in this process: what the server should answer."""

    def __init__(self) -> None:
        self.loaded = load("clip-shapes")
        self.transform = ImageTransform(self.loaded.preprocess)

    @torch.no_grad()
    def images(self, pngs: list[bytes]) -> np.ndarray:
        px = self.transform.batch([open_image(p) for p in pngs])
        return self.loaded.model.encode_image(px, normalize=True).numpy()

    @torch.no_grad()
    def texts(self, texts: list[str]) -> np.ndarray:
        return self.loaded.model.encode_text(Tokenizer()(texts).ids, normalize=True).numpy()
