"""One router per resource; every /v1 router requires an API key."""
