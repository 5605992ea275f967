"""OpenAI's error object, and the one place where a failure becomes an HTTP status.

Every error the gateway answers has OpenAI's shape, so OpenAI clients raise their usual exceptions:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": "..."}}

| cause                                             | status | type                  | code                      |
|---------------------------------------------------|--------|-----------------------|---------------------------|
| body is not JSON                                  | 400    | invalid_request_error | `invalid_json`            |
| a field missing or of the wrong type or range     | 400    | invalid_request_error | `invalid_value` (`param`) |
| a feature the gateway does not implement          | 400    | invalid_request_error | `unsupported_parameter`   |
| messages the model's chat template refuses        | 400    | invalid_request_error | `invalid_value`           |
| prompt + max_tokens above the model's context     | 400    | invalid_request_error | `context_length_exceeded` |
| missing or wrong API key (with `--api-key`)       | 401    | invalid_request_error | `invalid_api_key`         |
| a model this gateway does not serve               | 404    | invalid_request_error | `model_not_found`         |
| some blocks have no live peer                     | 503    | service_unavailable   | `missing_blocks`          |
| the swarm failed otherwise (peers kept failing)   | 503    | service_unavailable   | `swarm_unavailable`       |
| a bug                                             | 500    | server_error          | `internal_error`          |

An error after a stream has started cannot change the status any more: it arrives as one last
`data: {"error": {...}}` event before `data: [DONE]`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from swarm.errors import ConfigError, InvalidRequest, MissingBlocksError, SwarmError
from swarm.gateway.chat_template import ChatTemplateError
from swarm.gateway.generation import ContextLengthExceeded

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"


class GatewayError(Exception):
    """An answer in OpenAI's error format, with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,  # OpenAI's field name
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def invalid_value(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, message, code="invalid_value", param=param)


def unsupported(param: str, detail: str) -> GatewayError:
    return GatewayError(400, f"{param}: {detail}", code="unsupported_parameter", param=param)


def model_not_found(model: str, served: str) -> GatewayError:
    return GatewayError(
        404, f"The model {model!r} does not exist here; this gateway serves {served!r}", code="model_not_found",
        param="model",
    )  # fmt: skip


def invalid_api_key() -> GatewayError:
    return GatewayError(
        401, "Missing or incorrect API key: send `Authorization: Bearer KEY` with the gateway's --api-key",
        code="invalid_api_key",
    )  # fmt: skip


def from_exception(error: Exception) -> GatewayError:
    """The answer for any error raised while serving a request."""
    if isinstance(error, GatewayError):
        return error
    if isinstance(error, ContextLengthExceeded):
        return GatewayError(400, str(error), code="context_length_exceeded", param="max_tokens")
    if isinstance(error, ChatTemplateError):
        return invalid_value(str(error), "messages")
    if isinstance(error, MissingBlocksError):
        return GatewayError(503, str(error), type="service_unavailable", code="missing_blocks")
    if isinstance(error, ConfigError | InvalidRequest):
        return invalid_value(str(error))
    if isinstance(error, SwarmError):
        return GatewayError(503, f"the swarm could not serve this request: {error}", type="service_unavailable",
                            code="swarm_unavailable")  # fmt: skip
    logger.error("Internal error while serving a request", exc_info=error)
    return GatewayError(500, "internal error; the gateway's log has the details", type="server_error",
                        code="internal_error")  # fmt: skip


def from_validation_error(error: RequestValidationError) -> GatewayError:
    """FastAPI's 422 for a body that is not JSON or does not fit the schema, as OpenAI's 400."""
    first = error.errors()[0] if error.errors() else {}
    if first.get("type") == "json_invalid":
        return GatewayError(400, "The request body is not valid JSON", code="invalid_json")
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    if first.get("type") == "missing":
        message = f"Missing required parameter: {param!r}" if param else "The request body is missing"
    else:
        message = f"Invalid value for {param!r}: {first.get('msg', 'invalid')}" if param else str(first.get("msg"))
    return invalid_value(message, param)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of `app` in OpenAI's format."""

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        return from_validation_error(error).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:  # unknown path, wrong method
        return GatewayError(error.status_code, str(error.detail)).response()

    async def any_error(request: Request, error: Exception) -> JSONResponse:
        return from_exception(error).response()

    for error_type in (GatewayError, ContextLengthExceeded, ChatTemplateError, SwarmError, Exception):
        app.add_exception_handler(error_type, any_error)
