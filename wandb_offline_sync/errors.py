"""The package's exceptions.

Low-level errors (ssl, socket, subprocess, json) are turned into one of
these where they cross a module boundary, so callers catch one tree.
Errors that a farm answers with carry the HTTP status they map to.
"""

__all__ = [
    "WandbSyncError", "ConfigError", "RequestError", "BadRequest",
    "Forbidden", "RunNotFound", "FarmBusy", "FarmUnreachable",
]


class WandbSyncError(Exception):
    """Base class of every error this package raises."""


class ConfigError(WandbSyncError):
    """The farm cannot start as configured (certificate, wandb, API key)."""


class RequestError(WandbSyncError):
    """A request the farm refuses; ``status`` is the HTTP answer."""

    status = 400


class BadRequest(RequestError):
    """The body or its fields make no sense."""

    status = 400


class Forbidden(RequestError):
    """The run directory is one the farm may not touch."""

    status = 403


class RunNotFound(RequestError):
    """The run directory does not exist or holds no run."""

    status = 404


class FarmBusy(RequestError):
    """The farm tracks as many runs as it may; try again later."""

    status = 503


class FarmUnreachable(WandbSyncError):
    """The agent could not deliver a request to the farm."""
