"""POST /v1/classify/user and /v1/classify/item: every user or item task's classes."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from mtlrec.serve import schemas as s
from mtlrec.serve.deps import Service
from mtlrec.serve.errors import ERROR_RESPONSES
from mtlrec.serve.security import require_api_key

router = APIRouter(prefix="/v1/classify", tags=["classify"], dependencies=[Depends(require_api_key)],
                   responses=ERROR_RESPONSES)


@router.post("/user", response_model_exclude_none=True,
             summary="Every user task's predicted class with probabilities")
def classify_user(body: s.ClassifyUsersRequest, service: Service) -> s.ClassifyResponse:
    """Unknown users are answered from missing features (`known: false`)."""
    return service.classify_users(body)


@router.post("/item", response_model_exclude_none=True,
             summary="Every item task's predicted class with probabilities")
def classify_item(body: s.ClassifyItemsRequest, service: Service) -> s.ClassifyResponse:
    """An unknown item is a 404 naming it."""
    return service.classify_items(body)
