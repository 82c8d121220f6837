"""CLIP_PREPROCESS=device and CLIP_CUDA_GRAPHS through the backend and the API.

On the CPU the device path runs the same tensor code (clip_core.tensor_preprocess) as on
a GPU: JPEGs become embeddings within cosine 0.999 of the exact Pillow path, what falls
back (other formats, turned photos) gives the exact path's embeddings, and a JPEG that
does not decode fails its request as the exact path does. Image buckets are checked
through EagerRunner here, CUDA graphs and the model's own stream on a GPU.
"""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_VIT, random_clip
from PIL import Image
from refusals import PREP, b64, serving, tiny_checkpoint
from workloads import photo_jpeg  # loadtests/ is on the path: tests/conftest.py

from clip_core.errors import ImageDecodeError
from clip_core.graphs import default_buckets
from clip_core.loader import LoadedModel
from clip_core.preprocess import ImageTransform, open_image
from service.backend import ClipBackend, warmup_plan
from service.prepare import EncodedImage, ImagePreparer

MIN_COSINE = 0.999
MIN_COSINE_CUDA = 0.995  # nvJPEG against libjpeg-turbo: docs/preprocessing.md
# (width, height) of photo-like JPEGs: landscape, portrait, square, small, a wide strip.
SIZES = [(668, 491), (300, 420), (64, 64), (45, 33), (500, 120)]


def jpeg(width: int, height: int, seed: int, **save) -> bytes:
    photo = Image.open(io.BytesIO(photo_jpeg(seed))).convert("RGB")
    buf = io.BytesIO()
    photo.resize((width, height), Image.Resampling.LANCZOS).save(buf, "JPEG", quality=90,
                                                                  **save)
    return buf.getvalue()


def corrupt_jpeg(seed: int = 0) -> bytes:
    """A JPEG whose headers are intact and whose entropy-coded data is noise."""
    good = bytearray(photo_jpeg(seed))
    sos = good.find(b"\xff\xda")
    start = sos + 2 + int.from_bytes(good[sos + 2 : sos + 4], "big")
    n = len(good) - 2 - start  # up to the end-of-image marker, which stays
    good[start : start + n] = np.random.default_rng(seed).integers(0, 256, n, np.uint8).tobytes()
    return bytes(good)


def turned_jpeg(seed: int = 3, orientation: int = 6) -> bytes:
    """A photo stored on its side with the EXIF tag that says how to show it."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg(300, 200, seed, exif=exif)


def png(seed: int = 4) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(photo_jpeg(seed))).convert("RGB").resize((90, 70)).save(buf, "PNG")
    return buf.getvalue()


def embeddings(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([row["embedding"] for row in response.json()["images"]], dtype=np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return F.cosine_similarity(torch.from_numpy(a), torch.from_numpy(b), dim=-1).numpy()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("m"))


@pytest.fixture(scope="module")
def exact(checkpoint):
    with serving(checkpoint, preprocess="exact") as client:
        yield client


@pytest.fixture(scope="module")
def device(checkpoint):
    with serving(checkpoint, preprocess="device", cuda_graphs=True) as client:
        yield client


# ---- the preparer hands JPEGs on undecoded ----

def test_device_mode_leaves_jpegs_to_the_backend_and_decodes_the_rest():
    prep = ImagePreparer(PREP, mode="device", exif_orientation=True)
    try:
        photo, other, turned = jpeg(120, 90, 0), png(), turned_jpeg()
        encoded = prep.prepare_one(2, photo)
        assert isinstance(encoded, EncodedImage)
        assert (encoded.data, encoded.index) == (photo, 2)
        tf = ImageTransform(PREP)
        assert torch.equal(prep.prepare_one(0, other), tf.pixels(open_image(other)))
        # Turned photos are decoded here, upright, as the exact path does.
        upright = ImagePreparer(PREP, exif_orientation=True).prepare_one(0, turned)
        assert torch.equal(prep.prepare_one(0, turned), upright)
        # Without EXIF orientation a turned photo is just a JPEG.
        plain = ImagePreparer(PREP, mode="device", exif_orientation=False)
        assert isinstance(plain.prepare_one(0, turned), EncodedImage)
        plain.close()
    finally:
        prep.close()


# ---- the backend decodes a batch's JPEGs ----

@pytest.fixture(scope="module")
def tiny():
    return random_clip(TINY_VIT, seed=7)


def _backend(model, **options) -> ClipBackend:
    return ClipBackend(LoadedModel("tiny", model, PREP, "random"), warmup_images=8,
                       warmup_tokens=8 * 77, **options)


def test_backend_mixes_pixels_and_jpegs_in_order(tiny):
    backend, reference = _backend(tiny, preprocess="device"), _backend(tiny)
    blobs = [jpeg(w, h, seed) for seed, (w, h) in enumerate(SIZES)]
    tf = ImageTransform(PREP)
    pixels = [tf.pixels(open_image(b)) for b in blobs]
    # JPEGs 0, 2, 4 as bytes, 1 and 3 as pixels: rows come back in the payloads' order.
    mixed = [EncodedImage(b, i) if i % 2 == 0 else pixels[i] for i, b in enumerate(blobs)]
    got = np.stack(backend.run("image", mixed))
    want = np.stack(reference.run("image", pixels))
    assert cosines(got, want).min() >= MIN_COSINE
    np.testing.assert_allclose(got[[1, 3]], want[[1, 3]], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="image payload 0 is not a uint8"):
        reference.run("image", [EncodedImage(blobs[0], 0)])  # an exact backend takes pixels


def test_a_jpeg_that_does_not_decode_raises_the_decode_error(tiny):
    backend = _backend(tiny, preprocess="device")
    bad = EncodedImage(corrupt_jpeg(), 5)
    with pytest.raises(ImageDecodeError) as alone:
        backend.run("image", [bad])
    # Alone, it is named by its index in its request, in the exact path's words.
    assert str(alone.value).startswith("image 5: the image data is corrupt")
    assert alone.value.index == 5
    with pytest.raises(ImageDecodeError):  # in a batch: the worker bisects to it
        backend.run("image", [EncodedImage(jpeg(64, 64, 1), 0), bad])


# ---- through the API ----

def test_jpegs_embed_as_on_the_exact_path_and_fallbacks_exactly(exact, device):
    blobs = [jpeg(w, h, seed) for seed, (w, h) in enumerate(SIZES)] + [png()]
    body = {"images": [b64(b) for b in blobs], "normalize": True}
    want = embeddings(exact.post("/embed", json=body))
    got = embeddings(device.post("/embed", json=body))
    assert cosines(got, want).min() >= MIN_COSINE
    # The PNG took the exact path in both servers.
    np.testing.assert_allclose(got[-1], want[-1], rtol=0, atol=1e-5)
    # The JPEGs did not: the tensor path rounds a few values differently.
    assert not np.allclose(got[:-1], want[:-1], rtol=0, atol=1e-6)


def test_a_turned_photo_embeds_upright_as_on_the_exact_path(exact, device):
    body = {"images": [b64(turned_jpeg())]}
    want = embeddings(exact.post("/embed", json=body))
    got = embeddings(device.post("/embed", json=body))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    sideways = embeddings(exact.post("/embed", json={"images": [b64(turned_jpeg(orientation=1))]}))
    assert cosines(got, sideways).min() < MIN_COSINE  # the turn matters to the model


def test_a_corrupt_jpeg_fails_its_request_as_on_the_exact_path(exact, device):
    # The exact path answers 400 invalid_image "image 1: the image data is corrupt or
    # truncated: ..." from the decode pool. The device path finds it in the batch; the
    # worker splits the batch down to it and answers the decode error it raised alone.
    body = {"images": [b64(jpeg(100, 80, 0)), b64(corrupt_jpeg()), b64(jpeg(80, 100, 1))]}
    want = exact.post("/embed", json=body)
    assert want.status_code == 400, want.text
    assert want.json()["error"]["type"] == "invalid_image"
    got = device.post("/embed", json=body)
    assert (got.status_code, got.json()) == (want.status_code, want.json())
    assert device.post("/embed", json={"images": [body["images"][0]]}).status_code == 200


# ---- image buckets ----

def test_warmup_plan_covers_every_bucket_and_a_spread_of_text_lengths():
    cuda = warmup_plan("cuda", 64, 64 * 77, 77)
    images = [n for kind, n, _ in cuda if kind == "image"]
    assert set(default_buckets(64)) <= set(images)
    assert images[0] == 64  # largest first: the allocator's first blocks are the largest
    texts = {tokens: n for kind, n, tokens in cuda if kind == "text" and n > 1}
    assert {8, 16, 32, 77} <= texts.keys() and texts[77] == 64 and texts[8] == 64 * 77 // 8
    cpu = warmup_plan("cpu", 64, 64 * 77, 77)
    assert [n for kind, n, _ in cpu if kind == "image"] == [4]  # CPU start-up stays short
    bucketed = warmup_plan("cpu", 8, 8 * 77, 77, bucketed=True)
    assert [n for kind, n, _ in bucketed if kind == "image"] == [8, 4, 2, 1, 4]


def test_warmup_visits_every_bucket_and_batches_pad_to_them(monkeypatch):
    model = random_clip(TINY_VIT, seed=7)
    plain = _backend(copy.deepcopy(model))
    seen: list[int] = []
    encode = model.encode_image

    def recording(x, *args, **kwargs):
        seen.append(x.shape[0])
        return encode(x, *args, **kwargs)

    monkeypatch.setattr(model, "encode_image", recording)
    backend = _backend(model, cuda_graphs=True)  # on the CPU: EagerRunner, same buckets
    assert backend.buckets == [1, 2, 4, 8]
    before = torch.get_num_threads()
    try:
        backend.warmup()
    finally:
        torch.set_num_threads(before)
    assert set(seen) == {1, 2, 4, 8}
    seen.clear()
    pixels = list(torch.randint(0, 256, (11, 3, 32, 32), dtype=torch.uint8,
                                generator=torch.Generator().manual_seed(1)))
    got = np.stack(backend.run("image", pixels))
    assert seen == [8, 4]  # 11 = a full bucket of 8, then 3 padded to 4
    np.testing.assert_allclose(got, np.stack(plain.run("image", pixels)), rtol=0, atol=1e-5)


# ---- on a GPU ----

def _sync_warnings(fn) -> list[warnings.WarningMessage]:
    """Host syncs during fn, as torch's sync-debug mode reports them; without the one
    warning that says the mode is a prototype (torch/cuda/__init__.py)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [w for w in caught if "prototype feature" not in str(w.message)]


@pytest.mark.gpu
def test_cuda_graphs_give_the_eager_embeddings(tiny):
    cuda = copy.deepcopy(tiny).to("cuda", torch.float16)
    graphs, eager = _backend(cuda, cuda_graphs=True), _backend(cuda)
    graphs.warmup()
    eager.warmup()
    pixels = list(torch.randint(0, 256, (11, 3, 32, 32), dtype=torch.uint8,
                                generator=torch.Generator().manual_seed(2)))
    for n in (1, 3, 8, 11):
        a = np.stack(graphs.run("image", pixels[:n]))
        b = np.stack(eager.run("image", pixels[:n]))
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-2)  # fp16: padding changes nothing
        assert cosines(a, b).min() >= 0.9999


@pytest.mark.gpu
def test_the_backend_runs_on_its_own_stream_and_syncs_only_to_read_the_result(
        tiny, monkeypatch):
    cuda = copy.deepcopy(tiny).to("cuda", torch.float16)
    streams: list[torch.cuda.Stream] = []
    encode = cuda.encode_image

    def recording(x, *args, **kwargs):
        streams.append(torch.cuda.current_stream())
        return encode(x, *args, **kwargs)

    monkeypatch.setattr(cuda, "encode_image", recording)
    backend = _backend(cuda)
    backend.warmup()
    assert streams and all(s != torch.cuda.default_stream() for s in streams)
    pixels = list(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8))
    ids = [[49406, *range(300, 300 + n), 49407] for n in (3, 9, 20)]
    torch.cuda.synchronize()
    for kind, payloads in (("image", pixels), ("text", ids)):
        syncs = _sync_warnings(lambda kind=kind, payloads=payloads: backend.run(kind, payloads))
        # Exactly one: the `.cpu()` that reads the (B, E) result back.
        assert len(syncs) == 1, [f"{w.filename}:{w.lineno} {w.message}" for w in syncs]
        assert Path(syncs[0].filename).name == "backend.py", syncs[0].filename
    assert torch.cuda.current_stream() == torch.cuda.default_stream()


@pytest.mark.gpu
def test_device_preprocessing_on_cuda_matches_the_exact_path(tiny):
    cuda = copy.deepcopy(tiny).to("cuda")  # fp32: only the decoding differs
    backend, reference = _backend(cuda, preprocess="device"), _backend(tiny)
    blobs = [jpeg(w, h, seed) for seed, (w, h) in enumerate(SIZES)]
    tf = ImageTransform(PREP)
    got = np.stack(backend.run("image", [EncodedImage(b, i) for i, b in enumerate(blobs)]))
    want = np.stack(reference.run("image", [tf.pixels(open_image(b)) for b in blobs]))
    # nvJPEG's IDCT and chroma upsampling are not libjpeg-turbo's: the stated CUDA floor
    # (docs/preprocessing.md), measured down to 0.998 on these small, busy test images.
    assert cosines(got, want).min() >= MIN_COSINE_CUDA
    # nvJPEG does not check the entropy-coded data the way libjpeg does: noise behind valid
    # headers may decode to noise. It must then still give a finite embedding, never a 500
    # (docs/preprocessing.md says strict validation needs CLIP_PREPROCESS=exact).
    try:
        (noise,) = backend.run("image", [EncodedImage(corrupt_jpeg(), 0)])
    except ImageDecodeError as err:
        assert str(err).startswith("image 0: ")
    else:
        assert np.isfinite(noise).all() and noise.shape == got[0].shape
