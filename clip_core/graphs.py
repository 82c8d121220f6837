"""Image batches in fixed sizes ("buckets"), run eagerly or as captured CUDA graphs.

A CUDA graph replays a whole forward pass with one launch, which saves the per-kernel launch
cost that dominates small batches, but it only replays the shapes it was captured with. So a
batch of n images is padded with zero images up to the smallest bucket >= n, the bucket's graph
runs, and the first n rows of its output are returned; rows of an image encoder do not see each
other, so the padding changes no row. A batch larger than the largest bucket runs in chunks.

`EagerRunner` does the same bucketing without graphs: on the CPU it is what tests check the
padding logic with, and on CUDA it is the baseline graphs are measured against. Both take the
encoder as a callable, (B, 3, S, S) -> (B, E), e.g. `partial(model.encode_image, normalize=True)`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Encoder = Callable[[torch.Tensor], torch.Tensor]


def default_buckets(max_batch: int) -> list[int]:
    """Powers of two up to max_batch, and max_batch itself: 1, 2, 4, ..., max_batch."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, not {max_batch}")
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return [*out, max_batch]


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds n items; ValueError when none does (chunk first)."""
    if n < 1:
        raise ValueError(f"a batch has at least one item, not {n}")
    for b in sorted(buckets):
        if b >= n:
            return b
    raise ValueError(f"{n} items exceed the largest bucket, {max(buckets)}")


def chunks(n: int, buckets: Sequence[int]) -> list[tuple[int, int, int]]:
    """(start, stop, bucket) for each piece of an n-item batch: full pieces of the largest
    bucket, then the rest in the smallest bucket that holds it."""
    largest = max(buckets)
    out = []
    for start in range(0, n, largest):
        stop = min(n, start + largest)
        out.append((start, stop, bucket_for(stop - start, buckets)))
    return out


def pad_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """(n, ...) -> (size, ...) with zero rows after the n real ones."""
    n = images.shape[0]
    if n == size:
        return images
    if n > size:
        raise ValueError(f"cannot pad {n} rows down to {size}")
    pad = images.new_zeros((size - n, *images.shape[1:]))
    return torch.cat([images, pad])


class _Runner:
    def __init__(
        self,
        encoder: Encoder,
        buckets: Sequence[int],
        sample_shape: Sequence[int],
        dtype: torch.dtype,
        device: str | torch.device,
    ):
        if not buckets or min(buckets) < 1:
            raise ValueError(f"buckets must be positive sizes, not {list(buckets)}")
        self.encoder = encoder
        self.buckets = sorted(set(buckets))
        self.sample_shape = tuple(sample_shape)  # (3, S, S)
        self.dtype = dtype
        self.device = torch.device(device)
        self._embed_dim: int | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 3, S, S) -> (n, E), as the encoder would give for these n images."""
        if tuple(images.shape[1:]) != self.sample_shape:
            raise ValueError(f"expected (n, {self.sample_shape}) images, got {tuple(images.shape)}")
        n = images.shape[0]
        with torch.inference_mode():
            if n == 0:
                return torch.empty((0, self.embed_dim), device=self.device)
            parts = [self._run(images[a:b], bucket) for a, b, bucket in chunks(n, self.buckets)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @property
    def embed_dim(self) -> int:
        if self._embed_dim is None:
            with torch.inference_mode():
                self._embed_dim = int(self._run(self._zeros(1), self.buckets[0]).shape[1])
        return self._embed_dim

    def _zeros(self, n: int) -> torch.Tensor:
        return torch.zeros((n, *self.sample_shape), dtype=self.dtype, device=self.device)

    def _run(self, images: torch.Tensor, bucket: int) -> torch.Tensor:
        raise NotImplementedError


class EagerRunner(_Runner):
    """Pads to the bucket and calls the encoder: the same shapes as GraphRunner, no graphs."""

    def warmup(self) -> None:
        """Runs every bucket once, so kernels are chosen and memory is cached before traffic."""
        with torch.inference_mode():
            for bucket in reversed(self.buckets):
                self._run(self._zeros(bucket), bucket)

    def _run(self, images: torch.Tensor, bucket: int) -> torch.Tensor:
        x = pad_to(images.to(device=self.device, dtype=self.dtype), bucket)
        return self.encoder(x)[: images.shape[0]]


class GraphRunner(_Runner):
    """One CUDA graph per bucket, captured at `warmup()` or on the bucket's first batch.

    Each graph reads a static (bucket, 3, S, S) input buffer and writes a static (bucket, E)
    output; a call copies the images into the input, zeroes the padding rows, replays, and
    returns a copy of the real rows (the next replay overwrites the output). All graphs share
    one memory pool: they never run at the same time, so their intermediates can share memory,
    and only the static buffers are kept apart. Replays are ordered on the caller's stream.
    """

    def __init__(self, encoder: Encoder, buckets: Sequence[int], sample_shape: Sequence[int],
                 dtype: torch.dtype, device: str | torch.device, warm_iters: int = 2):
        super().__init__(encoder, buckets, sample_shape, dtype, device)
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {self.device}")
        self.warm_iters = warm_iters
        self._pool = torch.cuda.graph_pool_handle()
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    @property
    def captured(self) -> list[int]:
        return sorted(self._graphs)

    def warmup(self) -> None:
        """Captures every bucket, largest first, so the smaller graphs fit in the pool's blocks."""
        with torch.inference_mode():
            for bucket in reversed(self.buckets):
                self._graph(bucket)

    def _graph(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        if bucket in self._graphs:
            return self._graphs[bucket]
        # Never with autograd: a captured output with a grad_fn would keep every
        # activation of the capture alive (the ViT-L/14 benchmark ran out of memory so).
        with torch.inference_mode():
            return self._capture(bucket)

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        static_in = self._zeros(bucket)  # (bucket, 3, S, S)
        # Warm-up runs on a side stream, as capture does: kernels get chosen, workspaces and
        # lazy state get allocated outside the graph.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warm_iters):
                self.encoder(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (other models' workers) may keep using CUDA meanwhile.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            static_out = self.encoder(static_in)  # (bucket, E)
        self._graphs[bucket] = (graph, static_in, static_out)
        return self._graphs[bucket]

    def _run(self, images: torch.Tensor, bucket: int) -> torch.Tensor:
        graph, static_in, static_out = self._graph(bucket)
        n = images.shape[0]
        static_in[:n].copy_(images, non_blocking=True)
        if n < bucket:
            static_in[n:].zero_()  # stale rows would not change the real ones, zeros are tidier
        graph.replay()
        return static_out[:n].clone()
