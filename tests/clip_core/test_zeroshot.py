from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clip_core.tokenizer import Tokenizer
from clip_core.zeroshot import (
    DEFAULT_TEMPLATES,
    build_classifier,
    classify,
    format_prompts,
    imagenet_templates,
)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer()


def test_imagenet_ensemble_is_the_papers_80_templates():
    import open_clip.zero_shot_metadata as ref

    ours = imagenet_templates()
    assert len(ours) == 80
    assert list(ours) == [t("{}") for t in ref.OPENAI_IMAGENET_TEMPLATES]


def test_format_prompts_is_label_major():
    assert format_prompts(["cat", "dog"], ["a {}.", "my {}"]) == ["a cat.", "my cat", "a dog.", "my dog"]
    with pytest.raises(ValueError, match="exactly one"):
        format_prompts(["cat"], ["no placeholder"])


def test_classifier_is_the_renormalised_mean_of_prompt_embeddings(vit_b32, tokenizer):
    labels = ["red circle", "blue square", "green star"]
    templates = ["a photo of a {}.", "a drawing of a {}.", "{}"]
    with torch.no_grad():
        clf = build_classifier(vit_b32, tokenizer, labels, templates, batch_size=4)
        for i, label in enumerate(labels):
            ids = tokenizer([t.replace("{}", label) for t in templates]).ids
            expected = F.normalize(vit_b32.encode_text(ids, normalize=True).mean(0), dim=-1)
            torch.testing.assert_close(clf[i], expected, atol=1e-6, rtol=0)
    assert clf.shape == (3, vit_b32.embed_dim)
    torch.testing.assert_close(clf.norm(dim=-1), torch.ones(3))


def test_classify_is_softmax_of_scaled_cosine(vit_b32, tokenizer):
    with torch.no_grad():
        clf = build_classifier(vit_b32, tokenizer, ["a", "b"], DEFAULT_TEMPLATES)
        img = vit_b32.encode_image(torch.randn(3, 3, 224, 224))
        probs, cosine = classify(vit_b32, img, clf)
    torch.testing.assert_close(cosine, F.normalize(img, dim=-1) @ clf.t())
    torch.testing.assert_close(probs, (vit_b32.logit_scale.exp() * cosine).softmax(-1))
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))


def test_empty_labels_or_templates_refused(vit_b32, tokenizer):
    with pytest.raises(ValueError):
        build_classifier(vit_b32, tokenizer, [], DEFAULT_TEMPLATES)
    with pytest.raises(ValueError):
        build_classifier(vit_b32, tokenizer, ["a"], [])
