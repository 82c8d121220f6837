"""The registry: names and aliases, the activation each set of weights needs, close
matches for unknown names, and its open_clip facts against the installed open_clip."""

from __future__ import annotations

import pytest

from clip_core.config import OPENAI_MEAN, OPENAI_STD, CLIPConfig
from clip_core.errors import ModelNotFound
from clip_core.registry import OPEN_CLIP_FILES, REGISTRY, close_matches, get_entry


@pytest.mark.parametrize(("alias", "canonical"), [
    ("ViT-B-32/laion2b_s34b_b79k", "ViT-B-32/laion2b_s34b_b79k"),
    ("vit-b-32:LAION2B_S34B_B79K", "ViT-B-32/laion2b_s34b_b79k"),
    ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "ViT-B-32/laion2b_s34b_b79k"),
    # open_clip spells QuickGELU weights ARCH-quickgelu/TAG; ARCH/TAG finds them too.
    ("ViT-B-32/metaclip_fullcc", "ViT-B-32-quickgelu/metaclip_fullcc"),
    ("ViT-H-14/dfn5b", "ViT-H-14-quickgelu/dfn5b"),
    ("ViT-B-32/openai", "openai/ViT-B-32"),
    ("ViT-L-14-336-quickgelu/openai", "openai/ViT-L-14-336"),
    ("ViT-B/32", "openai/ViT-B-32"),
])
def test_aliases(alias, canonical):
    assert get_entry(alias).name == canonical


def test_the_same_architecture_with_each_weights_activation():
    assert get_entry("ViT-B-32/laion2b_s34b_b79k").config().act == "gelu"
    assert get_entry("ViT-B-32/metaclip_fullcc").config().act == "quick_gelu"
    assert get_entry("openai/ViT-B-32").config().act == "quick_gelu"
    assert get_entry("ViT-H-14/metaclip_altogether").config().act == "gelu"
    laion, meta = get_entry("ViT-B-32/laion2b_s34b_b79k"), get_entry("ViT-B-32/metaclip_400m")
    assert laion.config().vision == meta.config().vision


def test_every_alias_names_one_model():
    seen: dict[str, str] = {}
    for entry in REGISTRY.values():
        for alias in (entry.name, *entry.aliases):
            assert seen.setdefault(alias.lower(), entry.name) == entry.name, alias


def test_unknown_names_list_close_matches_not_every_name():
    with pytest.raises(ModelNotFound) as err:
        get_entry("ViT-B-32/laion2b")
    message = str(err.value)
    assert "did you mean" in message and "ViT-B-32/laion2b_s34b_b79k" in message
    assert "ViT-bigG-14/laion2b_s39b_b160k" not in message
    assert message.count(",") < 5
    assert close_matches("ViT-bigG-14/laion2b")[0] == "ViT-bigG-14/laion2b_s39b_b160k"


def test_an_unknown_name_with_no_close_match():
    with pytest.raises(ModelNotFound, match=r"none of the .* registry models is close"):
        get_entry("resnet-9000")


def test_open_clip_entries_match_open_clips_pretrained_configs():
    """Every open_clip entry's facts against open_clip's own tables, in the installed
    package: hub repository, QuickGELU flag, mean, std, interpolation, resize mode, and the
    architecture against open_clip's model config."""
    open_clip = pytest.importorskip("open_clip")
    entries = [e for e in REGISTRY.values() if e.hf_repo]
    families = {e.family for e in entries}
    assert families == {"LAION-2B", "DataComp", "DFN", "MetaCLIP"}
    for entry in entries:
        arch, tag = entry.name.split("/")
        p = open_clip.get_pretrained_cfg(arch, tag)
        assert p, entry.name
        assert p["hf_hub"].rstrip("/") == entry.hf_repo, entry.name
        assert entry.hf_files == OPEN_CLIP_FILES
        assert (entry.act == "quick_gelu") == p.get("quick_gelu", False), entry.name
        pre = entry.preprocess
        assert (pre.mean, pre.std) == (tuple(p["mean"]), tuple(p["std"])), entry.name
        assert (pre.interpolation, pre.resize_mode) == (p["interpolation"], p["resize_mode"])
        oc_cfg = open_clip.get_model_config(arch)
        assert CLIPConfig.from_open_clip(oc_cfg) == entry.config(), entry.name
        assert pre.image_size == oc_cfg["vision_cfg"]["image_size"]
        assert entry.sha256 == ""  # not published: recorded at the first download
    # The facts that matter most, stated: LAION's L/14 is the one with 0.5 mean/std.
    assert get_entry("ViT-L-14/laion2b_s32b_b82k").preprocess.mean == (0.5, 0.5, 0.5)
    assert get_entry("ViT-H-14/laion2b_s32b_b79k").preprocess.mean == OPENAI_MEAN
    assert get_entry("ViT-H-14/laion2b_s32b_b79k").preprocess.std == OPENAI_STD
