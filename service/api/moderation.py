"""The moderation endpoints: `POST /moderate` and `GET /v1/policies`.

/moderate reads JSON or multipart/form-data like /embed (image files in `images`,
repeated `texts` and `categories`), with the same limits and errors; the work is
`service.moderation.Moderation`'s. See its docstring for what a failed image does.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from ..moderation import ItemDecision, Moderated, Moderation
from .errors import OPENAPI_ERRORS
from .inputs import JsonOrRaw, load_images, read_body
from .routes import EngineDep, TimeoutHeader, _InferenceRoute
from .schemas import (
    MODERATE_FORM,
    CategoryResult,
    ErrorDetail,
    ModerateRequest,
    ModerateResponse,
    ModerationItem,
    PolicyCard,
    PolicyCategory,
    PolicyList,
)


async def get_moderation(request: Request) -> Moderation:
    return request.app.state.moderation


ModerationDep = Annotated[Moderation, Depends(get_moderation)]

moderation = APIRouter(responses=OPENAPI_ERRORS, route_class=_InferenceRoute)


@moderation.post("/moderate", response_model=ModerateResponse,
                 openapi_extra=MODERATE_FORM.openapi())
async def moderate(raw: JsonOrRaw[ModerateRequest], engine: EngineDep, mod: ModerationDep,
                   request: Request, timeout: TimeoutHeader = None) -> ModerateResponse:
    """Texts and images scored against a policy's categories, each flagged at its
    threshold; an item is flagged when any category is. An image that cannot be decoded
    fails only its own item (`flagged: null` and `error`), not the request.

    JSON, or multipart/form-data with image files in `images`, repeated `texts` and
    `categories`."""
    decoded = await read_body(request, raw, ModerateRequest, MODERATE_FORM)
    body, sources = decoded.body, decoded.images["images"]
    engine.limits.check_count(len(body.texts) + len(sources))
    engine.limits.check_texts("text", body.texts)
    loaded = mod.policy(body.policy)
    request.state.model = loaded.model
    deadline = engine.deadline(timeout)
    images = await load_images(engine, sources) if sources else []
    result = await mod.moderate(body.policy, body.categories, body.texts, images,
                                body.truncate, deadline)
    return _response(result)


def _item(d: ItemDecision) -> ModerationItem:
    return ModerationItem(
        flagged=d.flagged,
        categories={c: CategoryResult(score=v.score, threshold=v.threshold, flagged=v.flagged)
                    for c, v in d.categories.items()},
        error=ErrorDetail(type=d.error.type, message=d.error.message) if d.error else None,
    )


def _response(r: Moderated) -> ModerateResponse:
    return ModerateResponse(
        policy=r.policy.name, version=r.policy.version, model=r.model,
        fingerprint=r.fingerprint, categories=r.categories,
        texts=[_item(d) for d in r.texts], images=[_item(d) for d in r.images])


@moderation.get("/v1/policies", response_model=PolicyList)
async def policies(mod: ModerationDep) -> PolicyList:
    """The loaded moderation policies (CLIP_POLICIES), with their categories."""
    cards = []
    for lp in mod.policies.values():
        p = lp.policy
        cards.append(PolicyCard(
            name=p.name, version=p.version, model=p.model, description=p.description,
            categories={c: PolicyCategory(kind=cat.kind,  # type: ignore[arg-type]
                                          threshold=cat.threshold,
                                          description=cat.description,
                                          applies_to=lp.applies_to(c))  # type: ignore[arg-type]
                        for c, cat in p.categories.items()}))
    return PolicyList(data=cards)
