"""Zero-shot classification: one text embedding per label, averaged over prompts.

As in the CLIP paper: each label is written into every template, the prompts are
embedded and normalised, averaged per label, and the mean is normalised again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from importlib import resources

import torch
import torch.nn.functional as F

from .model import CLIP
from .tokenizer import Tokenizer

# A short default ensemble: cheap to embed, and clearly better than the bare label.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
    "a drawing of a {}.",
)


@cache
def imagenet_templates() -> tuple[str, ...]:
    """The CLIP paper's 80 ImageNet prompts (see data/SOURCES.md)."""
    # `/` twice: Python 3.10's Traversable.joinpath takes a single name.
    text = (resources.files("clip_core") / "data" / "imagenet_templates.json").read_text()
    return tuple(json.loads(text))


def format_prompts(labels: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Label-major: all templates of label 0, then of label 1, ..."""
    for t in templates:
        if t.count("{}") != 1:
            raise ValueError(f"template {t!r} must contain exactly one '{{}}'")
    return [t.replace("{}", label) for label in labels for t in templates]


@torch.no_grad()
def build_classifier(
    model: CLIP,
    tokenizer: Tokenizer,
    labels: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    batch_size: int = 256,
) -> torch.Tensor:
    """(n_labels, E) unit-norm class embeddings."""
    if not labels:
        raise ValueError("at least one label is needed")
    if not templates:
        raise ValueError("at least one template is needed")
    prompts = format_prompts(labels, templates)
    chunks = []
    for i in range(0, len(prompts), batch_size):
        ids = tokenizer(prompts[i : i + batch_size]).ids
        chunks.append(model.encode_text(ids))
    return combine_prompts(torch.cat(chunks), len(labels))


def combine_prompts(prompt_embeddings: torch.Tensor, n_labels: int) -> torch.Tensor:
    """(C*T, E) label-major prompt embeddings -> (C, E) unit-norm class embeddings."""
    emb = F.normalize(prompt_embeddings.float(), dim=-1).view(n_labels, -1, prompt_embeddings.shape[-1])
    return F.normalize(emb.mean(dim=1), dim=-1)  # (C, T, E) -> (C, E)


def classify(
    model: CLIP, image_embeddings: torch.Tensor, classifier: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities (softmax of logit_scale x cosine) and the raw cosines, both (N, C)."""
    return scores(image_embeddings, classifier, float(model.logit_scale.detach().float().exp()))


def scores(
    image_embeddings: torch.Tensor, classifier: torch.Tensor, logit_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, E) image embeddings, (C, E) unit-norm classifier -> probabilities over the C
    labels (softmax of logit_scale x cosine) and the raw cosines, both (N, C) fp32.

    `logit_scale` is the model's temperature already exponentiated (1/0.07 at CLIP's
    initialisation), a float so that a server reads the parameter once, at load.
    """
    img = F.normalize(image_embeddings.float(), dim=-1)
    cosine = img @ classifier.float().t()  # (N, C)
    return (logit_scale * cosine).softmax(dim=-1), cosine


def sigmoid_scores(
    image_embeddings: torch.Tensor, classifier: torch.Tensor, logit_scale: float,
    logit_bias: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """As `scores`, for sigmoid-trained models (SigLIP): each label's probability on its
    own, sigmoid(logit_scale x cosine + logit_bias), both (N, C) fp32. The labels are
    independent: a row need not sum to 1, and adding a label changes no other's score."""
    img = F.normalize(image_embeddings.float(), dim=-1)
    cosine = img @ classifier.float().t()  # (N, C)
    return torch.sigmoid(logit_scale * cosine + logit_bias), cosine
