"""Settings of the HTTP API, from the environment (`MTLREC_*`) or from code.

API keys are hashed (SHA-256) as soon as they are read: the settings never hold a key in clear.
Nothing here is read at import time; `ServeSettings.from_env()` reads the environment when asked.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mtlrec.errors import ConfigError

logger = logging.getLogger("mtlrec.serve")

K_LIMIT = 1000
"""The largest `k` any request schema accepts; `ServeSettings.max_k` may lower it."""
BATCH_LIMIT = 10000
"""The most rows (pairs, ids) any request schema accepts; `ServeSettings.max_batch` may lower it."""
CANDIDATES_LIMIT = 100000
"""The longest candidate list any request schema accepts; `ServeSettings.max_candidates` may lower it."""
MIN_KEY_LENGTH = 16
ENV_PREFIX = "MTLREC_"
RUN_ENV = "MTLREC_RUN"
"""The run directory that `create_app_from_env` (the uvicorn factory for several workers) serves."""


def hash_key(key: str) -> str:
    """SHA-256 hex digest of an API key (what the server keeps in memory)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _check_keys(keys: Iterable[str], origin: str) -> list[str]:
    out = []
    for i, key in enumerate(keys, start=1):
        key = key.strip()
        if not key:
            continue
        if len(key) < MIN_KEY_LENGTH or any(c.isspace() for c in key):
            # The key itself is never echoed: only where it came from and its position.
            raise ConfigError(f"API key #{i} of {origin} is shorter than {MIN_KEY_LENGTH} characters or contains "
                              "whitespace; generate one with "
                              "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
        out.append(key)
    return out


def read_keys_file(path: Path) -> list[str]:
    """API keys of a file: one per line; blank lines and lines starting with '#' are ignored."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the API keys file '{path}': {exc.strerror or exc}") from None
    if os.name == "posix" and path.stat().st_mode & 0o077:
        logger.warning("the API keys file '%s' is readable by other users; chmod 600 it", path)
    lines = [line.strip() for line in text.splitlines()]
    return _check_keys((line for line in lines if line and not line.startswith("#")), f"'{path}'")


class ServeSettings(BaseModel):
    """How the API authenticates, limits and answers. Every field has an `MTLREC_<FIELD>` variable.

    Limits (rate, body size, k, batch sizes) are per worker process.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    api_key_hashes: tuple[str, ...] = Field((), description="SHA-256 hex digests of the accepted API keys.")
    insecure_no_auth: bool = Field(False, description="Serve without API keys (local use only).")
    rate_limit_per_second: float = Field(50.0, gt=0, description="Tokens added per second to each key's bucket.")
    rate_limit_burst: int = Field(100, ge=1, description="Capacity of each key's token bucket.")
    auth_failure_window_s: float = Field(600.0, gt=0, description="Failed authentications are counted over this.")
    auth_slowdown_after: int = Field(3, ge=1, description="Failures from one address before answers slow down.")
    auth_slowdown_base_s: float = Field(0.25, ge=0, description="First delay; it doubles with each failure.")
    auth_slowdown_max_s: float = Field(4.0, ge=0, description="Longest delay of a failed authentication.")
    auth_block_after: int = Field(10, ge=1, description="Failures from one address before it is blocked.")
    auth_block_s: float = Field(900.0, gt=0, description="How long a blocked address stays blocked.")
    max_tracked_clients: int = Field(10000, ge=1, description="Most addresses whose failures are remembered.")
    max_body_bytes: int = Field(1 << 20, ge=1, description="Largest request body (413 above it).")
    max_k: int = Field(K_LIMIT, ge=1, le=K_LIMIT, description="Largest k of recommend and related.")
    max_batch: int = Field(1000, ge=1, le=BATCH_LIMIT, description="Most pairs or ids in one request.")
    max_candidates: int = Field(10000, ge=1, le=CANDIDATES_LIMIT, description="Longest candidate list.")
    retrieval_candidates: int | None = Field(
        None, ge=0, description="Two-stage recommend and related items: how many items retrieval hands to the "
        "multi-task heads when more pass the filters. Unset: the run's recommend.candidates if it has a retrieval "
        "task, else every item is ranked; 0 ranks every allowed item; a positive value needs a retrieval task.")
    inference_slots: int | None = Field(None, ge=1, description="Requests computing at once in a worker (default: "
                                        "the CPU count); the others wait their turn.")
    category_feature: str | None = Field(None, description="Categorical item feature that include/exclude_categories "
                                         "filter on (default: an item feature named 'category', if any).")
    cors_origins: tuple[str, ...] = Field((), description="Origins allowed by CORS; empty turns CORS off.")
    require_manifest: bool = Field(False, description="Refuse a run without a valid manifest.json.")
    manifest_key: str | None = Field(None, description="HMAC key the run's manifest must be signed with.")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads of each worker.")
    forwarded_allow_ips: str | None = Field(None, description="Proxies trusted for X-Forwarded-For (uvicorn); "
                                            "unset: the socket's address identifies a client.")

    @classmethod
    def from_keys(cls, keys: Iterable[str], **fields: Any) -> ServeSettings:
        """Settings accepting `keys` (hashed at once), other fields as given."""
        return cls(api_key_hashes=tuple(hash_key(k) for k in _check_keys(keys, "the given keys")), **fields)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, api_keys_file: Path | None = None,
                 **overrides: Any) -> ServeSettings:
        """Settings from `MTLREC_*` variables (`environ`, default `os.environ`), then `overrides`.

        Keys: `MTLREC_API_KEYS` (comma-separated) and the file `api_keys_file` or `MTLREC_API_KEYS_FILE`
        (one key per line); both may be given. List fields (`MTLREC_CORS_ORIGINS`) are comma-separated.
        """
        env = os.environ if environ is None else environ
        keys = _check_keys(env.get("MTLREC_API_KEYS", "").split(","), "MTLREC_API_KEYS")
        keys_file = api_keys_file or (Path(env["MTLREC_API_KEYS_FILE"]) if env.get("MTLREC_API_KEYS_FILE") else None)
        if keys_file is not None:
            keys += read_keys_file(keys_file)
        values: dict[str, Any] = {}
        for name, info in cls.model_fields.items():
            var = ENV_PREFIX + name.upper()
            if name == "api_key_hashes" or var not in env:
                continue
            raw = env[var]
            values[name] = tuple(p.strip() for p in raw.split(",") if p.strip()) if "tuple" in str(info.annotation) \
                else (raw if raw != "" else None)
        values.update(overrides)
        values["api_key_hashes"] = tuple(dict.fromkeys(hash_key(k) for k in keys))
        try:
            return cls(**values)
        except ValidationError as exc:
            first = exc.errors()[0]
            name = str(first["loc"][0]) if first["loc"] else "?"
            raise ConfigError(f"{ENV_PREFIX}{name.upper()}: {first['msg']}") from None

    def check_startable(self) -> None:
        """Refuse to serve with no API keys unless `insecure_no_auth` says so explicitly."""
        if not self.api_key_hashes and not self.insecure_no_auth:
            raise ConfigError("no API keys: set MTLREC_API_KEYS (comma-separated) or pass --api-keys-file; "
                              "for local use only, --insecure-no-auth serves without authentication")
        if self.api_key_hashes and self.insecure_no_auth:
            raise ConfigError("API keys are given together with --insecure-no-auth; drop one of them")
