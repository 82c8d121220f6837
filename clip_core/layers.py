"""Transformer building blocks shared by the ViT image tower and the text tower.

Parameter names follow OpenAI's release (`attn.in_proj_weight`, `mlp.c_fc`, `ln_1`, ...)
because that layout is what OpenAI and open_clip checkpoints use: they load unchanged.
Tensors are batch-first throughout: (B, L, D).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the activations' dtype.

    fp16/bf16 variance over 768-1024 channels loses enough precision to move embeddings
    visibly, and the op is cheap, so it always runs in fp32 and casts back.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        y = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        return y.to(x.dtype)


class QuickGELU(nn.Module):
    """The sigmoid approximation of GELU that OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu":
        return nn.GELU()
    raise ValueError(f"unknown activation {name!r}")


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`. To CUDA through pinned memory with `non_blocking`: a copy
    from pageable memory makes the host wait for the stream (cudaMemcpy + synchronize). The
    caching host allocator keeps the pinned block until the copy has run."""
    if x.device == device:
        return x
    if device.type != "cuda" or x.device.type != "cpu":
        return x.to(device)
    pinned = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    return pinned.copy_(x).to(device, non_blocking=True)


@dataclass(frozen=True)
class Packing:
    """Where the real tokens of a padded (B, L) batch sit.

    With it, the dense layers run on the T real tokens alone, packed as (T, D), and only
    attention goes back to the padded (B, L) layout it needs. A batch of texts with
    lengths 4..16 then costs its 10-token average, not its 16-token maximum.
    """

    index: torch.Tensor  # (T,) positions of real tokens in the flattened (B * L)
    batch: int
    length: int

    @classmethod
    def from_lengths(cls, lengths: Sequence[int] | torch.Tensor, length: int,
                     device: torch.device | str = "cpu") -> Packing:
        """From each sequence's length, known on the host. The index is built on the CPU
        (`nonzero` on a GPU would wait for it: its output size depends on the data) and
        copied to `device` from pinned memory without blocking."""
        mask = torch.arange(length) < torch.as_tensor(lengths, device="cpu")[:, None]  # (B, L)
        index = mask.flatten().nonzero().squeeze(1)  # (T,)
        return cls(to_device(index, torch.device(device)), len(lengths), length)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) -> (T, ...)"""
        return x.flatten(0, 1).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(T, ...) -> (B, L, ...), zeros at padded positions."""
        out = x.new_zeros(self.batch * self.length, *x.shape[1:])
        return out.index_copy_(0, self.index, x).unflatten(0, (self.batch, self.length))

    def rows(self, positions: torch.Tensor) -> torch.Tensor:
        """(B,) one position in each sequence -> (B,) its row in the packed (T, ...)."""
        flat = torch.arange(self.batch, device=positions.device) * self.length + positions
        return torch.searchsorted(self.index, flat)


def pick(x: torch.Tensor, positions: torch.Tensor, packing: Packing | None) -> torch.Tensor:
    """One token per sequence: (B, L, D) or packed (T, D), (B,) positions -> (B, D)."""
    if packing is not None:
        return x[packing.rows(positions)]
    return x[torch.arange(x.shape[0], device=x.device), positions]


class SelfAttention(nn.Module):
    """Multi-head self-attention through `scaled_dot_product_attention`.

    One fused input projection, stored as nn.MultiheadAttention stores it, so the weights
    are interchangeable with the reference models.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(
        self, x: torch.Tensor, causal: bool = False, packing: Packing | None = None
    ) -> torch.Tensor:
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3D) or (T, 3D)
        if packing is not None:
            # Padded positions get zero q/k/v; under a causal mask no real token sees them.
            qkv = packing.unpack(qkv)
        b, n, d3 = qkv.shape
        d = d3 // 3
        # (B, L, 3D) -> (3, B, H, L, D/H)
        q, k, v = qkv.view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H, L, D/H)
        y = y.transpose(1, 2).reshape(b, n, d)
        return self.out_proj(packing.pack(y) if packing is not None else y)

    def one_query(
        self, x: torch.Tensor, positions: torch.Tensor, causal: bool, packing: Packing | None
    ) -> torch.Tensor:
        """The attention output at one position per sequence only: (B, D).

        Every token is still a key and a value; only the queries are cut to the (B,)
        `positions`. Under `causal`, a query at position p sees keys 0..p, as it would in
        the full (L, L) causal pattern.
        """
        d = x.shape[-1]
        w, b = self.in_proj_weight, self.in_proj_bias
        q = F.linear(pick(x, positions, packing), w[:d], b[:d])  # (B, D)
        kv = F.linear(x, w[d:], b[d:])  # (B, L, 2D) or (T, 2D)
        if packing is not None:
            kv = packing.unpack(kv)
        n, hd = kv.shape[1], d // self.heads
        # q.shape[0], not len(q): the ONNX tracer keeps the one symbolic and freezes the
        # other to the example's batch.
        k, v = kv.view(q.shape[0], n, 2, self.heads, hd).permute(2, 0, 3, 1, 4)  # (B, H, L, hd)
        mask = None
        if causal:
            mask = (torch.arange(n, device=x.device) <= positions[:, None]).view(-1, 1, 1, n)
        y = F.scaled_dot_product_attention(q.view(-1, self.heads, 1, hd), k, v, attn_mask=mask)
        return self.out_proj(y.reshape(-1, d))  # (B, H, 1, hd) -> (B, D)


class MLP(nn.Sequential):
    def __init__(self, width: int, act: str, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = activation(act)
        self.c_proj = nn.Linear(hidden, width)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, act: str, ln_eps: float, mlp_width: int):
        super().__init__()
        self.ln_1 = LayerNorm(width, eps=ln_eps)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = LayerNorm(width, eps=ln_eps)
        self.mlp = MLP(width, act, mlp_width)

    def forward(
        self, x: torch.Tensor, causal: bool = False, packing: Packing | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal, packing=packing)
        return x + self.mlp(self.ln_2(x))

    def pooled(
        self, x: torch.Tensor, positions: torch.Tensor, causal: bool, packing: Packing | None
    ) -> torch.Tensor:
        """`forward`'s output at one position per sequence only: (B, D)."""
        x = pick(x, positions, packing) + self.attn.one_query(
            self.ln_1(x), positions, causal, packing)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, act: str, ln_eps: float,
                 mlp_width: int = 0):
        super().__init__()
        self.width = width
        mlp_width = mlp_width or 4 * width  # (B, L, D) -> (B, L, mlp_width) -> (B, L, D)
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, act, ln_eps, mlp_width) for _ in range(layers)
        )

    def forward(
        self,
        x: torch.Tensor,
        causal: bool = False,
        packing: Packing | None = None,
        pool: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L, D) -> (B, L, D); or packed (T, D) -> (T, D) when `packing` is given.

        With `pool`, (B,) one position per sequence, the output is that token's alone:
        (B, D). CLIP reads nothing else from the last block, so its projections and MLP
        run on B rows instead of every token: about 5/6 of one block saved, ~7% of a
        12-layer tower. Earlier blocks still run on every token.
        """
        last = len(self.resblocks) - 1 if pool is not None else len(self.resblocks)
        for block in self.resblocks[:last]:
            x = block(x, causal=causal, packing=packing)
        if pool is not None:
            final = self.resblocks[last]
            assert isinstance(final, ResidualAttentionBlock)  # the ModuleList holds only these
            x = final.pooled(x, pool, causal, packing)
        return x

    def init_weights(self) -> None:
        # Scaled normal init, as in the CLIP paper's code: deeper stacks get smaller
        # output projections so the residual stream keeps its scale.
        n = len(self.resblocks)
        proj_std = self.width**-0.5 * (2 * n) ** -0.5
        attn_std = self.width**-0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            assert isinstance(block, ResidualAttentionBlock)
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
