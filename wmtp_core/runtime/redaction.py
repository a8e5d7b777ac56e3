"""Credentials out of URIs and out of any text that quotes one (log lines, error messages, files, MLflow records).

`redact_credentials` is the one function every URI from the environment passes through before it is shown or
stored: the password of a URI's userinfo and the values of secret-looking query parameters become ***. A user name
alone (`http://user@host`) is kept: it says who logged in, not how.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

MASK = "***"

# scheme://user:password@ ; the password runs to the last @ before the path (an unescaped @ in it is common).
_USERINFO_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s:@'\"]*:)[^/?#\s'\"]*@")
# ?token=... &access_token=... &password=... &X-Amz-Signature=... &sig=... (Azure SAS) &api_key=...
_SECRET_QUERY_VALUE = re.compile(
    r"(?P<head>[?&;](?:[\w.-]*(?:token|password|passwd|pwd|secret|signature|credential|api[_-]?key)|sig|key|auth)=)"
    r"[^&#;\s'\"]*",
    re.IGNORECASE,
)


def redact_credentials(text: str) -> str:
    """text with every URI's password and secret query values replaced by ***
    (`http://user:s3cr3t@host:5000/?token=abc` -> `http://user:***@host:5000/?token=***`)."""
    text = _USERINFO_PASSWORD.sub(lambda match: f"{match['head']}{MASK}@", text)
    return _SECRET_QUERY_VALUE.sub(lambda match: f"{match['head']}{MASK}", text)


def without_credentials(uri: str) -> str:
    """uri as an address to open in a browser: no userinfo at all (the browser asks for the login), secret query
    values redacted."""
    parts = urlsplit(uri)
    if "@" in parts.netloc:
        parts = parts._replace(netloc=parts.netloc.rpartition("@")[2])
    return redact_credentials(urlunsplit(parts))
