"""The HTTP API of a trained run (FastAPI).

    from mtlrec.serve.app import create_app
    from mtlrec.serve.settings import ServeSettings
    app = create_app("runs/a", ServeSettings.from_env())

Importing this package imports neither FastAPI nor uvicorn: `mtlrec.serve.integrity` is usable by
the trainer without the extra, and `serve_command` imports uvicorn only when it runs.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from mtlrec.errors import ConfigError

__all__ = ["serve_command"]

FACTORY = "mtlrec.serve.app:create_app_from_env"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def serve_command(run: Path, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
                  ssl_certfile: Path | None = None, ssl_keyfile: Path | None = None,
                  api_keys_file: Path | None = None, insecure_no_auth: bool = False) -> None:
    """Serve a run over HTTP (HTTPS when a certificate is given) with uvicorn; blocks until stopped.

    Settings come from `MTLREC_*` variables (see `ServeSettings`); keys from `MTLREC_API_KEYS`
    and/or `api_keys_file`. With `workers > 1` each worker process builds its own app through
    the factory `mtlrec.serve.app:create_app_from_env` (the run and key file travel as
    `MTLREC_RUN` / `MTLREC_API_KEYS_FILE`); limits then apply per worker.

    Raises:
        ConfigError: no API keys (without `insecure_no_auth`), half a TLS pair, a missing file.
        ArtifactError: the run is incomplete, damaged or fails its manifest.
    """
    import uvicorn

    from mtlrec.serve.app import create_app, load_artifact
    from mtlrec.serve.settings import RUN_ENV, ServeSettings

    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise ConfigError("give both --ssl-certfile and --ssl-keyfile for TLS, or neither")
    for option, path in (("--ssl-certfile", ssl_certfile), ("--ssl-keyfile", ssl_keyfile),
                         ("--api-keys-file", api_keys_file)):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{option} '{path}' is not a file")
    overrides: dict[str, Any] = {"insecure_no_auth": True} if insecure_no_auth else {}
    settings = ServeSettings.from_env(None, api_keys_file, **overrides)
    settings.check_startable()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.insecure_no_auth:
        where = "on a non-loopback interface, " if host not in LOOPBACK else ""
        print(f"WARNING: serving WITHOUT AUTHENTICATION {where}because of --insecure-no-auth; "
              "anyone who can reach the port can use the API. Use it on your own machine only.", file=sys.stderr)
    if ssl_certfile is None and host not in LOOPBACK:
        print("WARNING: serving plain HTTP on a non-loopback interface; API keys cross the network in clear. "
              "Give --ssl-certfile/--ssl-keyfile or put a TLS proxy in front.", file=sys.stderr)
    tls = {"ssl_certfile": str(ssl_certfile), "ssl_keyfile": str(ssl_keyfile)} if ssl_certfile else {}
    proxy = {"proxy_headers": settings.forwarded_allow_ips is not None,
             "forwarded_allow_ips": settings.forwarded_allow_ips}
    common = {"host": host, "port": port, "server_header": False, "log_level": "info", **tls, **proxy}
    if workers == 1:
        uvicorn.run(create_app(Path(run), settings), **common)  # type: ignore[arg-type]
        return
    load_artifact(run, settings)  # fail here, with one clear error, rather than in every worker
    os.environ[RUN_ENV] = str(Path(run).resolve())
    if api_keys_file is not None:
        os.environ["MTLREC_API_KEYS_FILE"] = str(Path(api_keys_file).resolve())
    if settings.insecure_no_auth:
        os.environ["MTLREC_INSECURE_NO_AUTH"] = "true"
    uvicorn.run(FACTORY, factory=True, workers=workers, **common)  # type: ignore[arg-type]
