"""Every HTTP error as JSON, in OpenAI's shape.

`{"error": {"message", "type", "code"}}` for every endpoint, the page's and
OpenAI's alike (docs/http-api.md): a handler raises `ApiError`; the middleware
here also turns aiohttp's own errors (404, 405, 413...) and unexpected
exceptions into that shape, so no client ever sees an HTML error page.
"""

import logging
from typing import Any, Dict, Optional

from aiohttp import web
from aiohttp.typedefs import Handler

_LOGGER = logging.getLogger(__name__)

# OpenAI's error types by status.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
}


class ApiError(Exception):
    """An answer other than success; the message is written for the user."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str,
        param: Optional[str] = None,
        headers: Optional[Dict[str, str]] = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> Dict[str, Any]:
        error: Dict[str, Any] = {
            "message": self.message,
            "type": _TYPES.get(self.status, "server_error"),
            "code": self.code,
        }
        if self.param is not None:
            error["param"] = self.param
        return {"error": error}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """ApiError, aiohttp's HTTP errors and crashes -> a JSON error answer."""
    try:
        return await handler(request)
    except ApiError as err:
        return err.response()
    except web.HTTPException as err:
        if err.status < 400:
            raise
        code = err.reason.lower().replace(" ", "_")
        return ApiError(err.status, f"{err.status} {err.reason}", code).response()
    except Exception:  # pylint: disable=broad-except
        _LOGGER.exception("HTTP %s %s failed", request.method, request.path)
        return ApiError(
            500, "The server failed on this request; see its log", "internal_error"
        ).response()
