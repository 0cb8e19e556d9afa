"""POST /v1/relate (two items) and /v1/related (the items most related to one)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from mtlrec.serve import schemas as s
from mtlrec.serve.deps import Service
from mtlrec.serve.errors import ERROR_RESPONSES
from mtlrec.serve.security import require_api_key

router = APIRouter(prefix="/v1", tags=["relations"], dependencies=[Depends(require_api_key)],
                   responses=ERROR_RESPONSES)


@router.post("/relate", response_model_exclude_none=True,
             summary="Every item-pair task's relation probabilities for two items")
def relate(body: s.RelateRequest, service: Service) -> s.RelateResponse:
    return service.relate(body)


@router.post("/related", response_model_exclude_none=True,
             summary="The K items most likely in a relation (e.g. substitute) with an item")
def related(body: s.RelatedRequest, service: Service) -> s.RelatedResponse:
    return service.related(body)
