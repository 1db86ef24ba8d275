"""Errors that reach a caller. Each carries the HTTP status it maps to, so every layer raises the
same type and the server turns it into `{"error": "..."}` without guessing."""

from __future__ import annotations


class BedsideError(Exception):
    status = 500

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidInput(BedsideError):
    status = 400


class NonFiniteOutput(InvalidInput):
    """The model answered NaN or Infinity for this input (e.g. an overflow on extreme values): no
    number to give, and JSON has none to carry it; the input is what drove the model there."""

    status = 422


class Unauthenticated(BedsideError):
    """No credentials, or credentials that name no caller (401)."""

    status = 401

    def __init__(self, message: str) -> None:
        super().__init__(message, {"WWW-Authenticate": 'Bearer realm="bedside"'})


class Forbidden(BedsideError):
    """An authenticated caller without the role this needs (403). A model of another tenant is a
    NotFound instead, worded as for a model that does not exist."""

    status = 403


class NotFound(BedsideError):
    status = 404


class MethodNotAllowed(BedsideError):
    status = 405


class TooLarge(BedsideError):
    status = 413


class Overloaded(BedsideError):
    status = 429


class Unavailable(BedsideError):
    status = 503


class DeadlineExceeded(Unavailable):
    """The request's deadline passed (or could not be met) before the model ran it."""


class ModelLoadError(BedsideError):
    """A model that cannot be served: bad config, missing or corrupt file, graph mismatch."""

    status = 400


class InferenceFailed(BedsideError):
    """The model itself raised while running a well-formed request."""

    status = 500


class Retired(Unavailable):
    """The queue was replaced or removed by a reload or unload after the request was routed to it."""


def model_not_found(name: str) -> NotFound:
    """The one answer for a model that does not exist and for one the caller's tenant may not see,
    word for word, so a 404 never tells one from the other."""
    return NotFound(f"model {name[:64]!r} is not in the repository")


class Conflict(BedsideError):
    """The request cannot be carried out in this server's current arrangement (409), e.g. a
    repository load or unload sent to a cluster, whose placement is decided by its deployment."""

    status = 409
