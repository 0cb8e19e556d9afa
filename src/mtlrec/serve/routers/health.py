"""GET /healthz: liveness, without authentication."""

from __future__ import annotations

from fastapi import APIRouter

from mtlrec.serve import schemas as s

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness (no API key needed)")
def healthz() -> s.Health:
    return s.Health(status="ok")
