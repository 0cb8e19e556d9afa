"""Print the API's OpenAPI document: `python -m mtlrec.serve.openapi > docs/openapi.json`."""

from __future__ import annotations

import json
from typing import Any

from mtlrec.serve.app import build_app
from mtlrec.serve.settings import ServeSettings


def openapi_schema() -> dict[str, Any]:
    """The OpenAPI document of the routes (it does not depend on a run or on settings)."""
    return build_app(ServeSettings(insecure_no_auth=True)).openapi()


def openapi_text() -> str:
    """The document as committed in docs/openapi.json."""
    return json.dumps(openapi_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(openapi_text(), end="")
