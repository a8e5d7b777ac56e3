"""What a run owes MLflow, noted in its run directory: uploads that failed (pending_uploads.json), and tracking
spooled at the start, when the tracking server was unreachable as the run started: no MLflow run exists yet, the
metrics go to the pending file, and the next flow run of the run, or `wmtp upload RUN`, opens the MLflow run and
sends everything.

No mlflow here: the training task and the flows read it without importing the client.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import requests

from wmtp_core.layout import RunLayout
from wmtp_core.runtime.atomic_files import write_atomically
from wmtp_core.runtime.redaction import redact_credentials, without_credentials

PENDING_UPLOADS_FILE = "pending_uploads.json"
_REACH_TIMEOUT_S = 5  # connecting to the tracking server at the start of a run; past it, tracking is spooled


def unreachable_reason(uri: str) -> str | None:
    """Why the tracking server at uri cannot be reached now (a refused connection, an unknown host, a timeout);
    None when it answers, whatever it answers, and for a store that is not a server."""
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        requests.get(without_credentials(uri), timeout=_REACH_TIMEOUT_S, stream=True).close()
    except requests.exceptions.SSLError:
        return None  # it answered: a TLS setting to fix, which opening the run reports
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as error:
        cause = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(error))
        return f"tracking server {redact_credentials(uri)} unreachable ({cause[1] if cause else type(error).__name__})"
    return None


def record_pending_uploads(run_dir: Path, reason: str, *, spooled_tags: dict[str, str] | None = None) -> None:
    """Note in the run directory that uploads are owed (the next flow run or `wmtp upload` completes them);
    spooled_tags: the tags of the MLflow run still to open, for a run whose tracking is spooled."""
    # The tags of an MLflow run still to open stay noted until it is opened.
    spooled_tags = spooled_tags or (pending_uploads(run_dir) or {}).get("spooled_tags")
    record = {"reason": reason, "at": time.time(), **({"spooled_tags": spooled_tags} if spooled_tags else {})}
    write_atomically(run_dir / PENDING_UPLOADS_FILE, json.dumps(record))


def pending_uploads(run_dir: Path) -> dict | None:
    """The run's note of owed uploads, None when it owes none."""
    path = run_dir / PENDING_UPLOADS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def tracking_spooled(run_dir: Path) -> bool:
    """Whether the run owes MLflow its whole run: uploads are owed and no MLflow run was opened for it yet."""
    return (run_dir / PENDING_UPLOADS_FILE).is_file() and not RunLayout(run_dir).tracking.is_file()
