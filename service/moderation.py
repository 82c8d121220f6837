"""Content moderation over the served models: the operator's policies, and /moderate.

`Moderation` owns the policies from start-up on. `read` reads every file in
`CLIP_POLICIES` (clip_core.moderation) before the models load, so that an invalid file
fails start-up at once; `start` then checks each against the served models: its
`model` must be one of them, its heads must have been trained on that model (the
fingerprint), and its prompt vectors are computed once, through the model's own text
path (tokenizer, batching, worker), so that they are the vectors a request's texts would
get. Any failure ends start-up, naming the file and the field.

`moderate` scores a request's texts and images against one policy:

- Texts are scored by the prompt categories (a text embedding against the prompt
  vectors: CLIP's shared space), and by a head only when its file says it was trained on
  text embeddings; categories that do not apply to an item's kind are absent from it.
- Images by every category.
- **An image that cannot be used fails only its own item**, not the request (unlike
  /embed): a moderation batch is often a page of user uploads, and one corrupt file must
  not leave the others undecided. The item answers `flagged: null` and an `error` with the
  type and message the request would have failed with (invalid_image, image_too_large,
  unsupported_image_format, invalid_request for bad base64...). Errors that are not the
  image's fault (overload, deadline, a URL that cannot be fetched, a failing model) still
  fail the whole request.

Each item is scored from its own embedding alone (clip_core.moderation.scoring), so its
scores do not depend on the other items of its request or batch beyond the model's own
numerics. The answer carries the policy's version and the model's fingerprint, so that a
stored decision can be audited against the exact policy and weights that made it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from clip_core.errors import PolicyInvalid
from clip_core.moderation import (
    Policy,
    PolicyScorer,
    decide,
    load_policies,
    load_policy_heads,
)
from clip_core.zeroshot import format_prompts

from .core import Engine
from .errors import ModelUnavailable, PolicyNotFound, UnknownCategory, is_callers_fault
from .metrics import Metrics
from .models import ServedModel
from .prepare import ImageSource
from .settings import Settings

log = logging.getLogger(__name__)

# Prompt vectors are computed at start-up, before any request: generous, and in chunks
# that admission never refuses as too large.
_PROMPTS_DEADLINE_S = 600.0
_PROMPTS_PER_CALL = 256


@dataclass(frozen=True)
class CategoryDecision:
    score: float
    threshold: float
    flagged: bool


@dataclass(frozen=True)
class ItemError:
    type: str
    message: str


@dataclass(frozen=True)
class ItemDecision:
    """One item's decision: flagged when any category is; None with `error` when the
    item could not be scored."""

    flagged: bool | None
    categories: dict[str, CategoryDecision] = field(default_factory=dict)
    error: ItemError | None = None


@dataclass(frozen=True)
class Moderated:
    policy: Policy
    model: str
    fingerprint: str
    categories: list[str]  # the ones asked for, in the policy's order
    texts: list[ItemDecision]
    images: list[ItemDecision]


@dataclass(frozen=True)
class LoadedPolicy:
    policy: Policy
    scorer: PolicyScorer
    model: str  # the served model's name
    fingerprint: str

    def applies_to(self, category: str) -> list[str]:
        return [k for k in ("image", "text") if self.scorer.applies(category, k)]


def _lookup(vectors: dict[str, np.ndarray]):
    """`encode_texts` over embeddings already computed: (n, E)."""
    return lambda texts: np.stack([vectors[t] for t in texts])


class Moderation:
    """The loaded policies, by name, and the moderation of requests against them."""

    def __init__(self, settings: Settings, engine: Engine, metrics: Metrics):
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.policies: dict[str, LoadedPolicy] = {}
        # Policies whose model failed to load (on_model_load_failure=serve_others).
        self.unavailable: dict[str, str] = {}
        self._files: dict[str, Policy] | None = None  # read, not yet checked

    def read(self) -> None:
        """Reads and validates every policy file (PolicyInvalid naming the file and the
        field): before the models load, so that a bad file fails start-up at once."""
        if self.settings.policies is not None:
            self._files = load_policies(self.settings.policies)

    async def start(self) -> None:
        """Checks every policy against the served models, loads its heads and computes its
        prompt vectors; raises PolicyInvalid (or the heads' HeadInvalid,
        HeadModelMismatch) naming the file, which ends start-up."""
        if self._files is None:
            self.read()
        models = self.engine.models
        for name, policy in (self._files or {}).items():
            if policy.model in models.unavailable:
                log.error("policy %s is unavailable: its model %s failed to load",
                          name, policy.model)
                self.unavailable[name] = policy.model
                continue
            if policy.model not in models:
                raise PolicyInvalid(policy.source or name, "model",
                                    f"model {policy.model!r} is not served here; served: "
                                    f"{', '.join(models) or 'none'}")
            m = models[policy.model]
            heads = await asyncio.to_thread(load_policy_heads, policy, m.fingerprint)
            vectors = await self._prompt_embeddings(m, policy)
            scorer = PolicyScorer(policy, _lookup(vectors), heads, m.backend.logit_scale)
            self.policies[name] = LoadedPolicy(policy, scorer, m.name, m.fingerprint)
            log.info("policy %s v%d loaded for model %s (%d categories)", name,
                     policy.version, m.name, len(policy.categories))

    async def _prompt_embeddings(self, m: ServedModel, policy: Policy) -> dict[str, np.ndarray]:
        """Every prompt of the policy, embedded by the served model: {text: (E,)}."""
        texts: list[str] = []
        for cat in policy.categories.values():
            if cat.prompts is not None:
                ps = cat.prompts
                texts += format_prompts(ps.positive + ps.negative, ps.templates)
        texts = list(dict.fromkeys(texts))
        deadline = time.monotonic() + _PROMPTS_DEADLINE_S
        chunk = max(1, min(_PROMPTS_PER_CALL, self.settings.max_queue_items))
        out: dict[str, np.ndarray] = {}
        for i in range(0, len(texts), chunk):
            part = texts[i : i + chunk]
            emb = await self.engine.embed_texts(m, part, truncate=True, deadline=deadline,
                                                normalize=True)
            out.update(zip(part, emb.vectors, strict=True))
        return out

    # ---- requests ----

    def policy(self, name: str) -> LoadedPolicy:
        loaded = self.policies.get(name)
        if loaded is None:
            if name in self.unavailable:
                raise ModelUnavailable("the policy's model failed to load and is unavailable")
            # The caller's name is not echoed; the known ones are the operator's.
            raise PolicyNotFound(f"no such policy; known: {', '.join(self.policies) or 'none'}")
        return loaded

    def categories(self, loaded: LoadedPolicy, asked: Sequence[str] | None) -> list[str]:
        """The categories asked for (None: all), in the policy's order."""
        known = list(loaded.policy.categories)
        if asked is None:
            return known
        if not set(asked) <= set(known):
            raise UnknownCategory(f"categories must be among those of policy "
                                  f"{loaded.policy.name!r}: {', '.join(known)}")
        return [c for c in known if c in set(asked)]

    async def moderate(self, name: str, categories: Sequence[str] | None, texts: list[str],
                       images: Sequence[ImageSource], truncate: bool, deadline: float,
                       ) -> Moderated:
        loaded = self.policy(name)
        cats = self.categories(loaded, categories)
        m = self.engine.model(loaded.model)
        text_items: list[ItemDecision] = []
        image_items: list[ItemDecision] = []
        if texts:
            emb = await self.engine.embed_texts(m, texts, truncate, deadline, normalize=True)
            text_items = self._decide(loaded, "text", cats, emb.vectors)
        if images:
            image_items = await self._moderate_images(m, loaded, cats, images, deadline)
        return Moderated(loaded.policy, m.name, loaded.fingerprint, cats, text_items,
                         image_items)

    async def _moderate_images(self, m: ServedModel, loaded: LoadedPolicy, cats: list[str],
                               images: Sequence[ImageSource], deadline: float,
                               ) -> list[ItemDecision]:
        # As Engine.embed_images: under overload refuse before paying for decoding.
        m.worker.check_admission("image", len(images))
        prepared = await m.images.prepare_each(images)
        outcomes: list[np.ndarray | BaseException | None] = [None] * len(images)
        ok = []
        for i, p in enumerate(prepared):
            if isinstance(p, BaseException):
                if not is_callers_fault(p):
                    raise p
                outcomes[i] = p
            else:
                ok.append(i)
        if ok:
            embedded = await self._embed(m, [prepared[i] for i in ok], deadline)
            for i, e in zip(ok, embedded, strict=True):
                outcomes[i] = e
        good = [i for i, o in enumerate(outcomes) if isinstance(o, np.ndarray)]
        decided = (self._decide(loaded, "image", cats, np.stack([outcomes[i] for i in good]))  # type: ignore[misc]
                   if good else [])
        by_index = dict(zip(good, decided, strict=True))
        items = []
        for i, o in enumerate(outcomes):
            if i in by_index:
                items.append(by_index[i])
            else:
                err = o if isinstance(o, BaseException) else None
                items.append(ItemDecision(None, error=ItemError(
                    getattr(type(err), "error_type", "invalid_image"), str(err))))
        return items

    async def _embed(self, m: ServedModel, payloads: list, deadline: float,
                     ) -> list[np.ndarray | BaseException]:
        """One (E,) fp32 embedding per payload; an item the model's own decoder refuses
        (device preprocessing) is found by computing each alone, and is its error."""
        try:
            results = await m.worker.submit_many("image", payloads, deadline=deadline)
        except Exception as e:
            if not is_callers_fault(e):
                raise
            if len(payloads) == 1:
                return [e]
            # Rare: only a JPEG that passed its header check and fails on the device.
            alone = await asyncio.gather(*(self._embed(m, [p], deadline) for p in payloads))
            return [a[0] for a in alone]
        self.engine.observe_waits(m.name, "image", results)
        return [np.asarray(r.value, dtype=np.float32) for r in results]

    def _decide(self, loaded: LoadedPolicy, kind: str, cats: list[str], emb: np.ndarray,
                ) -> list[ItemDecision]:
        """(N, E) embeddings of `kind` -> one decision per row; counted in the metrics."""
        policy = loaded.policy
        scores = loaded.scorer.score(emb, kind, cats)
        flags = decide(scores, policy)
        items = []
        for i in range(emb.shape[0]):
            per = {c: CategoryDecision(float(scores[c][i]), policy.categories[c].threshold,
                                       bool(flags[c][i])) for c in scores}
            items.append(ItemDecision(any(d.flagged for d in per.values()), per))
        counter = self.metrics.moderation_items
        for c in scores:
            n_flagged = int(flags[c].sum())
            if n_flagged:
                counter.labels(policy.name, c, "true").inc(n_flagged)
            if len(flags[c]) - n_flagged:
                counter.labels(policy.name, c, "false").inc(len(flags[c]) - n_flagged)
        return items
