"""Errors in the OpenAI form: `{"error": {"message", "type", "param", "code"}}` with a 4xx status for
anything the client can fix, so clients written for the OpenAI API report them as they would
OpenAI's own. A traceback never reaches a client: unexpected failures become a logged 500."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


class APIError(Exception):
    """A response in OpenAI's error form. `headers` (e.g. Retry-After) are sent with it."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = " ".join(str(message).split())  # one line
        self.param = param
        self.code = code
        self.type = type or _default_type(status)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _default_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_validation(e: ValidationError, prefix: str = "") -> APIError:
    """The first pydantic complaint as one line naming the field: wrong types, missing fields,
    values out of range."""
    err = e.errors(include_url=False)[0]
    loc = [str(p) for p in err.get("loc", ())]
    param = ".".join(loc) or None
    kind = err.get("type", "")
    if kind == "missing":
        message = f"missing required field '{param}'"
    elif kind == "model_attributes_type" and not loc:
        message = "the request body must be a JSON object"
    else:
        got = err.get("input")
        shown = repr(got) if isinstance(got, (int, float, str, bool)) or got is None else type(got).__name__
        message = f"{param or 'body'}: {err.get('msg', 'invalid value')} (got {shown})"
    return APIError(400, prefix + message, param=param, code="invalid_value" if kind != "missing" else "missing_field")
