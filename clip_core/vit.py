"""The Vision Transformer image tower."""

from __future__ import annotations

import torch
from torch import nn

from .config import CLIPConfig
from .layers import LayerNorm, Transformer


class VisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        v = cfg.vision
        if v.image_size % v.patch_size:
            raise ValueError(f"image size {v.image_size} is not a multiple of patch {v.patch_size}")
        self.image_size = v.image_size
        grid = v.image_size // v.patch_size
        scale = v.width**-0.5
        self.conv1 = nn.Conv2d(3, v.width, v.patch_size, stride=v.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(v.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, v.width))
        self.ln_pre = LayerNorm(v.width, eps=cfg.ln_eps)
        assert isinstance(v.layers, int)  # a ViT's depth is one number; a ResNet's is four
        self.transformer = Transformer(
            v.width, v.layers, v.n_heads, cfg.act, cfg.ln_eps, v.mlp_hidden)
        self.ln_post = LayerNorm(v.width, eps=cfg.ln_eps)
        self.proj = nn.Parameter(scale * torch.randn(v.width, cfg.embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # (B, 3, S, S) -> (B, D, G, G)
        x = x.flatten(2).transpose(1, 2)  # (B, G*G, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        cls_at = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        x = self.transformer(self.ln_pre(x), pool=cls_at)  # the class token's output: (B, D)
        return self.ln_post(x) @ self.proj  # (B, E)
