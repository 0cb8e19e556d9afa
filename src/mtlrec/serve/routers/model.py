"""GET /v1/model: what the served run is."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from mtlrec.serve import schemas as s
from mtlrec.serve.deps import Service
from mtlrec.serve.errors import ERROR_RESPONSES
from mtlrec.serve.security import require_api_key

router = APIRouter(prefix="/v1", tags=["model"], dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)


@router.get("/model", summary="Model info: tasks, backbone, user and item counts, version")
def model_info(service: Service) -> s.ModelInfo:
    return service.info
