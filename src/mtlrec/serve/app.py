"""The FastAPI application: `create_app(artifact, settings)`; nothing is built at import time.

For several uvicorn workers, `create_app_from_env` is the factory each worker calls
(`uvicorn mtlrec.serve.app:create_app_from_env --factory`): it serves the run named by
`MTLREC_RUN` with `ServeSettings.from_env()`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from fastapi import FastAPI
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

import mtlrec
from mtlrec.errors import ConfigError
from mtlrec.predict import Predictor
from mtlrec.serve.errors import install_error_handlers
from mtlrec.serve.integrity import sha256_file, verify_manifest
from mtlrec.serve.routers import classify, health, model, predict, recommend, relations
from mtlrec.serve.security import BodyLimitMiddleware, ErrorIdMiddleware, Guard, GuardMiddleware
from mtlrec.serve.service import ServingService
from mtlrec.serve.settings import RUN_ENV, ServeSettings

logger = logging.getLogger("mtlrec.serve")

DESCRIPTION = """Answers of a trained mtlrec run: recommendations, task probabilities, classes and item relations.

Every route but `/healthz` needs an API key: `Authorization: Bearer <key>`. Errors are
`{"error": "<slug>", "detail": ...}`; a 500 carries only an `id` that the server log holds.
"""


def load_artifact(run_dir: str | Path, settings: ServeSettings) -> Predictor:
    """Verify the run's manifest (when present or required) and load it, without unpickling anything."""
    verify_manifest(run_dir, required=settings.require_manifest, key=settings.manifest_key)
    return Predictor.load(run_dir)


def build_app(settings: ServeSettings, service: ServingService | None = None) -> FastAPI:
    """The app around a service (None: routes and OpenAPI schema only; /v1 routes answer 503)."""
    middleware = [Middleware(ErrorIdMiddleware)]
    if settings.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                                     allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"]))
    middleware += [Middleware(GuardMiddleware, guard=Guard(settings)),
                   Middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)]
    app = FastAPI(title="mtlrec", version=mtlrec.__version__, description=DESCRIPTION, docs_url=None,
                  redoc_url=None, middleware=middleware)
    install_error_handlers(app)
    for router in (health.router, model.router, recommend.router, predict.router, classify.router,
                   relations.router):
        app.include_router(router)
    app.state.service = service
    app.state.settings = settings
    return app


def create_app(artifact: Predictor | str | Path, settings: ServeSettings) -> FastAPI:
    """The HTTP API of a trained run.

    Args:
        artifact: a loaded `Predictor`, or a run directory (its manifest is checked, then it is loaded).
        settings: keys, limits and filters; `settings.check_startable()` must pass.

    Raises:
        ConfigError: no API keys without `insecure_no_auth`, or an invalid setting for this run.
        ArtifactError: the run is incomplete, damaged or fails its manifest.
    """
    settings.check_startable()
    if settings.insecure_no_auth:
        logger.warning("SERVING WITHOUT AUTHENTICATION (--insecure-no-auth): anyone who can reach this port can "
                       "use the API; for local use only")
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    if isinstance(artifact, Predictor):
        predictor, run_name, fingerprint = artifact, "in-memory", "unknown"
    else:
        run = Path(artifact)
        predictor = load_artifact(run, settings)
        run_name, fingerprint = run.resolve().name, sha256_file(run / "weights.safetensors")
    return build_app(settings, ServingService(predictor, settings, run_name, fingerprint))


def create_app_from_env() -> FastAPI:
    """The uvicorn factory of a worker: serves `MTLREC_RUN` with `ServeSettings.from_env()`."""
    run = os.environ.get(RUN_ENV)
    if not run:
        raise ConfigError(f"{RUN_ENV} is not set: it names the run directory to serve")
    return create_app(Path(run), ServeSettings.from_env())
