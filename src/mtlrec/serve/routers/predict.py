"""POST /v1/predict: every interaction task's answer for user-item pairs."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from mtlrec.serve import schemas as s
from mtlrec.serve.deps import Service
from mtlrec.serve.errors import ERROR_RESPONSES
from mtlrec.serve.security import require_api_key

router = APIRouter(prefix="/v1", tags=["predict"], dependencies=[Depends(require_api_key)],
                   responses=ERROR_RESPONSES)


@router.post("/predict", response_model_exclude_none=True,
             summary="Every interaction task's probability for user-item pairs")
def predict(body: s.PredictRequest, service: Service) -> s.PredictResponse:
    """Unknown users are scored from missing features (`known_user: false`); an unknown item is a 404."""
    return service.predict(body)
