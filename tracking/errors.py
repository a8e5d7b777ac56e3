"""Errors of the tracking store without credentials: MLflow quotes the whole request URL, password included, in its
errors, and an error reaches logs, summary.json, the CLI's `error:` line and Prefect's database."""

from __future__ import annotations

import functools

from wmtp_core.runtime.redaction import redact_credentials


class TrackingError(RuntimeError):
    """A call to the tracking store failed; the message names the original error, credentials redacted."""


def credentials_redacted(function):
    """function, with an error it raises that quotes credentials re-raised as a TrackingError without them."""

    @functools.wraps(function)
    def call(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except TrackingError:
            raise
        except Exception as error:
            told = _chain_text(error)
            if redact_credentials(told) == told:
                raise  # nothing to hide: the original error, its type and cause kept
            message = redact_credentials(f"{type(error).__name__}: {error}")
            raise TrackingError(message) from None  # no cause: a traceback would quote the URL again

    return call


def _chain_text(error: BaseException | None) -> str:
    """The messages of error and of every error behind it (what a traceback prints)."""
    told = []
    while error is not None:
        told.append(str(error))
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return "\n".join(told)
