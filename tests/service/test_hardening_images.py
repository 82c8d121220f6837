"""Hostile and broken images: pixel and frame caps from the header, the format
allow-list before any decoder, broken bytes as 4xx, first frames, EXIF orientation."""

from __future__ import annotations

import asyncio
import io
import struct
import sys
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image
from refusals import PREP, b64, metric, png, refused, served, serving, tiny_checkpoint

from clip_core.config import DECODE_FORMATS
from service.errors import ImageFormatNotAllowed, ImageTooLarge
from service.prepare import ImagePreparer, sniff


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png(width: int, height: int) -> bytes:
    """A valid PNG header for width x height grey pixels and a few bytes of data: what a
    decompression bomb looks like before anyone decodes it."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 4096)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


def gif(frames: list[tuple[int, int, int]], size=(24, 16)) -> bytes:
    images = [Image.new("RGB", size, c) for c in frames]
    buf = io.BytesIO()
    images[0].save(buf, "GIF", save_all=True, append_images=images[1:], duration=40, loop=0)
    return buf.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("m"))


@pytest.fixture(scope="module")
def client(checkpoint):
    with serving(checkpoint, max_image_frames=8) as c:
        yield c


def _embed(client, data: bytes):
    return client.post("/embed", json={"images": [b64(data)]})


def test_a_20000_square_png_of_a_few_kb_is_refused_in_under_a_second(client):
    bomb = huge_png(20_000, 20_000)
    assert len(bomb) < 200
    tracemalloc.start()
    try:
        start = time.perf_counter()
        r = refused(client, lambda: _embed(client, bomb), 413, "image_too_large")
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0
    assert peak < 50 * 2**20  # decoding would need 400 MB
    assert "image 0" in r.json()["error"]["message"]


def test_over_the_configured_pixel_cap_is_refused_from_the_header(checkpoint):
    with serving(checkpoint, max_image_pixels=100 * 100) as c:
        refused(c, lambda: _embed(c, png((101, 100))), 413, "image_too_large")
        assert _embed(c, png((100, 100))).status_code == 200


def test_pillows_bomb_warning_is_an_error_whatever_the_filters(monkeypatch):
    # max_pixels off: Pillow's own limit (which only warns below twice itself) refuses.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50 * 50)
    p = ImagePreparer(PREP, max_pixels=None)
    try:
        with pytest.raises(ImageTooLarge):
            p.prepare_one(0, png((60, 60)))  # over the limit, under twice it: a warning
        assert p.prepare_one(0, png((40, 40))).shape == (3, 32, 32)
    finally:
        p.close()


FOREIGN = {
    "PDF": b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n",
    "EPS": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
    "PSD": b"8BPS\x00\x01" + b"\x00" * 40,
    "FITS": b"SIMPLE  =                    T" + b" " * 50,
}


@pytest.mark.parametrize("fmt", sorted(FOREIGN))
def test_formats_outside_the_allow_list_are_415_before_any_decoder(client, monkeypatch, fmt):
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    r = refused(client, lambda: _embed(client, FOREIGN[fmt]), 415, "unsupported_image_format")
    assert fmt in r.json()["error"]["message"]
    assert not opened  # refused on the leading bytes alone


def test_the_allow_list_is_a_setting(checkpoint):
    with serving(checkpoint, image_formats=["PNG"]) as c:
        jpeg = io.BytesIO()
        Image.new("RGB", (20, 20)).save(jpeg, "JPEG")
        r = refused(c, lambda: _embed(c, jpeg.getvalue()), 415, "unsupported_image_format")
        assert "JPEG" in r.json()["error"]["message"]
        assert _embed(c, png()).status_code == 200


def _truncated() -> bytes:
    data = png((64, 64), mode="RGB")
    rng = np.random.default_rng(0)
    noisy = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(noisy, "PNG")
    return noisy.getvalue()[: len(data) // 2 + 200]


BROKEN = [
    ("truncated", {"images": [b64(_truncated())]}, 400, "invalid_image"),
    ("random bytes", {"images": [b64(np.random.default_rng(1).bytes(4000))]}, 400,
     "invalid_image"),
    ("zero bytes", {"images": [b64(b"\0" * 512)]}, 400, "invalid_image"),
    ("a PNG signature and nothing", {"images": [b64(b"\x89PNG\r\n\x1a\n")]}, 400,
     "invalid_image"),
    ("wrong base64", {"images": ["this is not base64!"]}, 400, "invalid_request"),
    ("base64 with a bad tail", {"images": [b64(png())[:-3] + "!!!"]}, 400, "invalid_request"),
    ("wrong data-URI type", {"images": ["data:text/html;base64," + b64(png())]}, 400,
     "invalid_request"),
    ("data URI not base64", {"images": ["data:image/png,rawbytes"]}, 400, "invalid_request"),
]


@pytest.mark.parametrize(("case", "body", "status", "kind"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_images_are_4xx_never_5xx(client, case, body, status, kind):
    refused(client, lambda: client.post("/embed", json=body), status, kind)
    refused(client, lambda: client.post("/classify", json={**body, "labels": ["a", "b"]}),
            status, kind)


@pytest.mark.parametrize("size", [(1, 1), (1, 300), (300, 1)])
def test_one_pixel_images_and_strips_are_embedded(client, size):
    for mode in ("RGB", "L", "RGBA", "P"):
        r = _embed(client, png(size, mode=mode, color=0 if mode in "LP" else (3, 4, 5)))
        assert r.status_code == 200, (mode, r.text)


def test_an_animated_gif_gives_its_first_frame(client):
    animated = gif([(250, 0, 0), (0, 0, 250), (0, 250, 0)])
    still = gif([(250, 0, 0)])
    a = _embed(client, animated).json()["images"][0]["embedding"]
    b = _embed(client, still).json()["images"][0]["embedding"]
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_the_frame_cap_refuses_long_animations_from_the_header(client):
    many = gif([(i * 20 % 256, 0, 0) for i in range(9)], size=(8, 8))
    r = refused(client, lambda: _embed(client, many), 413, "image_too_large")
    assert "9 frames" in r.json()["error"]["message"]


def _photo() -> Image.Image:
    """Asymmetric on both axes, so any turn or flip shows."""
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    a[:10, :20] = (255, 0, 0)
    return Image.fromarray(a)


def _stored_turned(upright: Image.Image, orientation: int, fmt: str) -> bytes:
    """What a phone writes: pixels as the sensor read them, plus the tag that turns
    them upright for display."""
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # sensor held sideways
    exif = Image.Exif()
    exif[0x0112] = orientation  # 6: rotate 90 CW to display
    buf = io.BytesIO()
    stored.save(buf, fmt, exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_exif_orientation_turns_the_photo_upright(fmt):
    upright = _photo()
    tagged = _stored_turned(upright, 6, fmt)
    buf = io.BytesIO()
    upright.save(buf, "PNG")
    on = ImagePreparer(PREP, exif_orientation=True)
    off = ImagePreparer(PREP, exif_orientation=False)
    try:
        want = on.prepare_one(0, buf.getvalue())
        assert bool((on.prepare_one(0, tagged) == want).all())  # turned once, not twice
        # Pillow turns TIFFs itself while opening them; other formats it leaves as stored.
        turned_anyway = fmt == "TIFF"
        assert bool((off.prepare_one(0, tagged) == want).all()) == turned_anyway
    finally:
        on.close()
        off.close()


def test_exif_orientation_through_the_api_and_its_default(checkpoint):
    upright = _photo()
    buf = io.BytesIO()
    upright.save(buf, "PNG")
    tagged = _stored_turned(upright, 6, "PNG")
    with serving(checkpoint) as c:  # the default: on
        want = _embed(c, buf.getvalue()).json()["images"][0]["embedding"]
        got = _embed(c, tagged).json()["images"][0]["embedding"]
        np.testing.assert_allclose(got, want, atol=1e-6)
    with serving(checkpoint, exif_orientation=False) as c:
        raw = _embed(c, tagged).json()["images"][0]["embedding"]
        assert np.abs(np.array(raw) - np.array(want)).max() > 1e-3
        served(c)


def test_a_malformed_exif_block_is_ignored(client):
    data = png((30, 30), exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff")
    assert _embed(client, data).status_code == 200


def test_sniffing_names_formats_from_their_leading_bytes():
    assert sniff(png()) == "PNG"
    assert sniff(gif([(1, 2, 3)])) == "GIF"
    assert sniff(b"RIFF\0\0\0\0WEBPVP8 ") == "WEBP"
    assert sniff(FOREIGN["PDF"]) == "PDF"
    assert sniff(b"\0\0\0\x18ftypheic") == "HEIF/AVIF"
    assert sniff(b"hello") is None


@pytest.mark.parametrize("fmt", DECODE_FORMATS)
def test_every_format_that_may_be_enabled_is_sniffed(fmt):
    buf = io.BytesIO()
    Image.new("RGB", (4, 3), (10, 20, 30)).save(buf, fmt)
    assert sniff(buf.getvalue()) == fmt


def test_prepare_names_the_image_that_failed():
    p = ImagePreparer(PREP, formats=["PNG"])
    try:
        with pytest.raises(ImageFormatNotAllowed, match="image 1: PDF"):
            asyncio.run(p.prepare([png(), FOREIGN["PDF"]]))
    finally:
        p.close()


def test_refusals_are_counted_by_type(client):
    before = metric(client, "clip_errors_total", type="invalid_image")
    _embed(client, b"\0" * 100)
    assert metric(client, "clip_errors_total", type="invalid_image") == before + 1


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread priority is Linux's")
def test_decoders_run_at_a_lower_priority_than_the_model():
    """The decoding threads yield a shared core to torch's threads (service.tuning)."""
    import os
    import threading

    from service.tuning import DECODER_NICENESS

    preparer = ImagePreparer(PREP, 1)
    try:
        ours = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        theirs = preparer._executor.submit(
            lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result(5)
        assert theirs == min(19, ours + DECODER_NICENESS)
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == ours  # only them
    finally:
        preparer.close()
