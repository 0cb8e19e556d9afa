"""POST /v1/recommend: the top-K items for a user."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from mtlrec.serve import schemas as s
from mtlrec.serve.deps import Service
from mtlrec.serve.errors import ERROR_RESPONSES
from mtlrec.serve.security import require_api_key

router = APIRouter(prefix="/v1", tags=["recommend"], dependencies=[Depends(require_api_key)],
                   responses=ERROR_RESPONSES)


@router.post("/recommend", response_model_exclude_none=True,
             summary="Top-K items for a user, each with every task's probability and the fused score")
def recommend(body: s.RecommendRequest, service: Service) -> s.RecommendResponse:
    """Two-stage (retrieval, then the heads) when the run has a retrieval task. An unknown user is ranked
    from the request's `features` (`cold_start: true`, `strategy: features`), or else gets the most popular
    items (`strategy: popularity`)."""
    return service.recommend(body)
