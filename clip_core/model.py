"""CLIP: an image tower and a text tower projected into one embedding space.

The text tower's parameters sit at the model's root (`token_embedding`, `transformer`,
`ln_final`, `text_projection`) and the image tower under `visual.`, as in OpenAI's release,
so OpenAI and open_clip state dicts load without renaming.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import Activation, CLIPConfig, TextConfig, VisionConfig
from .layers import LayerNorm, Packing, Transformer, to_device
from .resnet import ModifiedResNet
from .vit import VisionTransformer

# Packing has a fixed cost (two index copies per layer); it pays once padding would be more
# than about a tenth of the work.
_PACK_BELOW = 0.9


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        t = cfg.text
        self.visual: VisionTransformer | ModifiedResNet = (
            VisionTransformer(cfg) if cfg.vision.kind == "vit" else ModifiedResNet(cfg)
        )
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.transformer = Transformer(
            t.width, t.layers, t.heads, cfg.act, cfg.ln_eps, t.mlp_hidden)
        self.ln_final = LayerNorm(t.width, eps=cfg.ln_eps)
        self.text_projection = nn.Parameter(torch.empty(t.width, cfg.embed_dim))
        # Stored as a log so the learned temperature stays positive; CLIP starts at 1/0.07.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer.init_weights()
        nn.init.normal_(self.text_projection, std=self.config.text.width**-0.5)
        if isinstance(self.visual, ModifiedResNet):
            self.visual.init_weights()
        else:
            self.visual.transformer.init_weights()

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    @property
    def embed_dim(self) -> int:
        return self.config.embed_dim

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, S, S) preprocessed pixels -> (B, E) fp32 embeddings."""
        x = self.visual(images.to(device=self.device, dtype=self.dtype)).float()
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(
        self, tokens: torch.Tensor, normalize: bool = False,
        lengths: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """(B, L) token ids, L <= context length -> (B, E) fp32 embeddings.

        Attention is causal, so the positions after a text's end-of-text token never reach
        its embedding. The tower therefore runs on each text's real tokens only: the batch
        is trimmed to its longest text and, when the lengths differ enough, the dense layers
        run on the packed real tokens. Results equal the 77-padded computation.

        Trimming and packing need the lengths on the host. `lengths` (each text's tokens,
        sot and eot included: its eot position + 1) saves reading them, and then the host
        never waits for the device. Tokens given on the CPU have theirs read there, before
        the copy; only tokens already on a GPU without `lengths` cost a read (one host sync).
        """
        b = tokens.shape[0]
        if b == 0:
            return torch.empty(0, self.embed_dim, device=self.device)
        if lengths is None:
            # End-of-text has the largest id in CLIP's vocabulary, as the reference relies on.
            lengths = (tokens.argmax(dim=-1) + 1).tolist()
        if len(lengths) != b:
            raise ValueError(f"{len(lengths)} lengths for {b} texts")
        length = max(lengths)
        tokens = to_device(tokens[:, :length], self.device)  # (B, L)
        eot = tokens.argmax(dim=-1)  # (B,), computed on the device and never read back
        packing = None
        if sum(lengths) < _PACK_BELOW * b * length:
            packing = Packing.from_lengths(lengths, length, self.device)
        x = self.token_embedding(tokens) + self.positional_embedding[:length]  # (B, L, D)
        x = x.to(self.dtype)
        if packing is not None:
            x = packing.pack(x)  # (T, D)
        x = self.transformer(x, causal=True, packing=packing, pool=eot)  # EOT tokens: (B, D)
        # LayerNorm is per token, so normalising only the pooled tokens is exact.
        x = (self.ln_final(x) @ self.text_projection).float()  # (B, E)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled cosine logits, (B_img, B_txt) and its transpose, as CLIP defines them."""
        img = self.encode_image(images, normalize=True)
        txt = self.encode_text(tokens, normalize=True)
        logits = self.logit_scale.exp().float() * img @ txt.t()
        return logits, logits.t()


def _count_blocks(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    ids = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    return len(ids)


def _mlp_width(state_dict: dict[str, torch.Tensor], c_fc: str) -> int:
    """The MLP's hidden width from c_fc's (hidden, width) weight; 0 when it is 4 * width."""
    if c_fc not in state_dict:
        return 0
    hidden, width = state_dict[c_fc].shape
    return 0 if hidden == 4 * width else int(hidden)


def infer_config(
    state_dict: dict[str, torch.Tensor], act: Activation = "quick_gelu"
) -> CLIPConfig:
    """Reads every hyperparameter off the tensor shapes of an OpenAI-layout state dict.

    The activation cannot be seen in the weights; OpenAI's models use QuickGELU.
    """
    sd = state_dict
    if "visual.proj" in sd:
        width = sd["visual.conv1.weight"].shape[0]
        patch = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = VisionConfig(
            kind="vit",
            image_size=patch * grid,
            width=width,
            layers=_count_blocks(sd, "visual.transformer.resblocks."),
            patch_size=patch,
            mlp_width=_mlp_width(sd, "visual.transformer.resblocks.0.mlp.c_fc.weight"),
        )
    elif "visual.attnpool.positional_embedding" in sd:
        spatial = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = VisionConfig(
            kind="resnet",
            image_size=spatial * 32,
            width=sd["visual.layer1.0.conv1.weight"].shape[0],
            layers=tuple(_count_blocks(sd, f"visual.layer{i}.") for i in range(1, 5)),
        )
    else:
        raise ValueError("state dict has neither a ViT nor a ResNet image tower")
    text_width = sd["ln_final.weight"].shape[0]
    text = TextConfig(
        context_length=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        width=text_width,
        heads=text_width // 64,
        layers=_count_blocks(sd, "transformer.resblocks."),
        mlp_width=_mlp_width(sd, "transformer.resblocks.0.mlp.c_fc.weight"),
    )
    return CLIPConfig(embed_dim=sd["text_projection"].shape[1], vision=vision, text=text, act=act)
