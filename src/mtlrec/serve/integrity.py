"""A SHA-256 manifest of a run's artifact files: written after training, checked before serving.

`manifest.json` lists every artifact file with its size and SHA-256; `verify_manifest` refuses a
run whose files were truncated, replaced or modified since. With a key (`MTLREC_MANIFEST_KEY`),
the manifest also carries an HMAC-SHA256 over its file list, so that whoever can rewrite the
weights cannot simply rewrite the manifest too.

Standard library only: the trainer imports it without loading FastAPI.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mtlrec.atomic import atomic_write_text
from mtlrec.errors import ArtifactError

MANIFEST_FILE = "manifest.json"
FORMAT = "mtlrec.manifest"
VERSION = 1
ARTIFACT_FILES = ("config.yaml", "schema.json", "weights.safetensors", "serving.safetensors")
"""What a Predictor reads; each must be listed in a manifest."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _signature(files: dict[str, Any], key: str) -> str:
    canonical = json.dumps(files, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hmac.new(key.encode("utf-8"), canonical, hashlib.sha256).hexdigest()


def write_manifest(run_dir: str | Path, files: Iterable[str] = ARTIFACT_FILES, key: str | None = None) -> Path:
    """Write `run_dir/manifest.json` (atomically) with the size and SHA-256 of each file present."""
    run = Path(run_dir)
    entries = {name: {"bytes": (run / name).stat().st_size, "sha256": sha256_file(run / name)}
               for name in files if (run / name).is_file()}
    doc: dict[str, Any] = {"format": FORMAT, "version": VERSION, "algorithm": "sha256", "files": entries}
    if key is not None:
        doc["hmac_sha256"] = _signature(entries, key)
    path = run / MANIFEST_FILE
    atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=True))
    return path


def verify_manifest(run_dir: str | Path, required: bool = False, key: str | None = None) -> bool:
    """Check every file of `run_dir/manifest.json`; True when checked, False when absent and not required.

    Raises:
        ArtifactError: the manifest is required and missing, malformed, unsigned or wrongly signed
            when a key is given, lacks an artifact file, or a file's size or SHA-256 differs.
    """
    run = Path(run_dir)
    path = run / MANIFEST_FILE
    if not path.is_file():
        if required or key is not None:
            raise ArtifactError(f"'{path}' is missing; this server requires a manifest (write one with "
                                "mtlrec.serve.integrity.write_manifest after training)")
        return False
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        files = doc["files"]
        if doc.get("format") != FORMAT or doc.get("algorithm") != "sha256" or not isinstance(files, dict):
            raise ValueError("not an mtlrec sha256 manifest")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(f"'{path}' is malformed ({exc}); re-run training") from None
    if key is not None:
        signature = doc.get("hmac_sha256")
        if not isinstance(signature, str) or not hmac.compare_digest(signature, _signature(files, key)):
            raise ArtifactError(f"'{path}' is not signed with this server's manifest key; the run was modified "
                                "or signed with another key")
    missing = [name for name in ARTIFACT_FILES if (run / name).is_file() and name not in files]
    if missing:
        raise ArtifactError(f"'{path}' does not list {missing}; re-run training")
    for name, entry in files.items():
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ArtifactError(f"'{path}' names a file outside the run directory: {name!r}")
        target = run / name
        if not target.is_file():
            raise ArtifactError(f"'{target}' is listed in the manifest but missing")
        if not isinstance(entry, dict) or target.stat().st_size != entry.get("bytes"):
            raise ArtifactError(f"'{target}' has {target.stat().st_size} bytes, the manifest says "
                                f"{entry.get('bytes') if isinstance(entry, dict) else '?'}: it is truncated or was "
                                "replaced; restore it or re-run training")
        if not hmac.compare_digest(sha256_file(target), str(entry.get("sha256"))):
            raise ArtifactError(f"'{target}' does not match its SHA-256 in the manifest: it was modified; restore "
                                "it or re-run training")
    return True
