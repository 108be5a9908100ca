"""Errors in the OpenAI shape: {"error": {"message", "type", "param", "code"}} with the right status."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from loadstar.engine.errors import first_problem


def error_body(message: str, type_: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, type_, param=param, code=code)
        self.headers = headers


def error_response(status: int, message: str, type_: str, *, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param=param, code=code), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body, status_code=error.status, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        where, message = first_problem(error, skip=("body",))
        return error_response(400, f"{where}: {message}" if where else message, "invalid_request_error",
                              param=where or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kinds = {404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error"}
        return error_response(error.status_code, str(error.detail), kinds.get(error.status_code, "server_error"))

    @app.exception_handler(ValidationError)
    async def invalid_value(request: Request, error: ValidationError) -> JSONResponse:
        # A value the endpoint's own models refuse (e.g. a message that is not valid Unicode).
        where, message = first_problem(error)
        return error_response(400, f"{where}: {message}" if where else message, "invalid_request_error",
                              param=where or None)

    @app.exception_handler(RecursionError)
    async def too_deep(request: Request, error: RecursionError) -> JSONResponse:
        return error_response(400, "the request body is nested too deeply", "invalid_request_error")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        return error_response(500, "internal error (see the server log)", "server_error")
