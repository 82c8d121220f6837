"""Content moderation over CLIP embeddings: policies (files), trained heads, scoring.

No HTTP here: the service (`service.moderation`) and the offline tools (clip-train-head,
clip-calibrate) both build on these.
"""

from ..errors import HeadInvalid, HeadModelMismatch, PolicyInvalid
from .fingerprint import model_fingerprint
from .heads import Head, load_head, load_policy_heads, save_head
from .policy import (
    Category,
    HeadRef,
    Policy,
    PromptSet,
    dump_policy,
    load_policies,
    load_policy,
    parse_policy,
    policy_dict,
)
from .scoring import PolicyScorer, decide, prompt_vectors

__all__ = [
    "Category", "Head", "HeadInvalid", "HeadModelMismatch", "HeadRef", "Policy",
    "PolicyInvalid", "PolicyScorer", "PromptSet", "decide", "dump_policy", "load_head",
    "load_policies", "load_policy", "load_policy_heads", "model_fingerprint",
    "parse_policy", "policy_dict", "prompt_vectors", "save_head",
]
