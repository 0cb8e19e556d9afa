"""Dependencies shared by the routers: the serving service."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request

from mtlrec.serve.service import ServingService


def get_service(request: Request) -> ServingService:
    """The app's `ServingService` (503 while none is loaded, e.g. on a schema-only app)."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise HTTPException(503, "no model is loaded")
    return service


Service = Annotated[ServingService, Depends(get_service)]
