"""CLIP's modified ResNet image tower.

Three changes from torchvision's ResNet, all from the CLIP paper: a stem of three 3x3
convolutions with an average pool instead of one 7x7 convolution and a max pool;
anti-aliased downsampling (an average pool before the stride-1 convolution instead of a
strided convolution); and a final attention pooling layer instead of global average
pooling. Module names match OpenAI's release so its checkpoints load unchanged.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPConfig


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        # Stride is applied by pooling, so every convolution sees full-resolution input.
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride > 1 or inplanes != planes * self.expansion:
            # The "-1" name keeps the pool parameter-free and the conv/bn at keys 0 and 1.
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """One query, the mean of the feature map, attends over every position."""

    def __init__(self, spatial: int, width: int, heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(
            torch.randn(spatial * spatial + 1, width) / width**0.5
        )
        self.k_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, output_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (B, 1 + HW, C)
        x = x + self.positional_embedding.to(x.dtype)
        h, hd = self.heads, c // self.heads
        # (B, L, C) -> (B, H, L, C/H); the query is the mean token alone.
        q = self.q_proj(x[:, :1]).view(b, 1, h, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, -1, h, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, -1, h, hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, 1, C/H)
        return self.c_proj(y.reshape(b, c))  # (B, E)


class ModifiedResNet(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        v = cfg.vision
        width = v.width
        self.image_size = v.image_size
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        self._inplanes = width
        assert isinstance(v.layers, tuple)  # VisionConfig checks a ResNet has four depths
        self.layer1 = self._stage(width, v.layers[0])
        self.layer2 = self._stage(width * 2, v.layers[1], stride=2)
        self.layer3 = self._stage(width * 4, v.layers[2], stride=2)
        self.layer4 = self._stage(width * 8, v.layers[3], stride=2)

        out_width = width * 32  # stage 4 channels: width * 8 planes * expansion 4
        self.attnpool = AttentionPool2d(v.image_size // 32, out_width, v.n_heads, cfg.embed_dim)

    def _stage(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def init_weights(self) -> None:
        std = self.attnpool.c_proj.in_features**-0.5
        for proj in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj):
            nn.init.normal_(proj.weight, std=std)
        nn.init.normal_(self.attnpool.c_proj.weight, std=std)
        # Zero the last BN gain of each block so every residual branch starts as identity.
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                assert isinstance(block, Bottleneck)  # _stage builds nothing else
                nn.init.zeros_(block.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.conv1.weight.dtype)
        x = self.relu1(self.bn1(self.conv1(x)))  # (B, W/2, S/2, S/2)
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.avgpool(x)  # (B, W, S/4, S/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 32W, S/32, S/32)
        return self.attnpool(x)  # (B, E)
