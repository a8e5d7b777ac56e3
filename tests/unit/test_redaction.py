"""Credentials out of URIs and out of the text that quotes them: the one redaction function, the link without
credentials, MLflow errors re-raised without the password, and the reason a tracking server is unreachable."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException

from benchmarks.servers import free_port
from tracking.errors import TrackingError, credentials_redacted
from tracking.spool import unreachable_reason
from wmtp_core.runtime.redaction import redact_credentials, without_credentials


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("http://user:s3cr3t@host:5000", "http://user:***@host:5000"),
        ("https://user:s3cr3t@host/mlflow/api?x=1", "https://user:***@host/mlflow/api?x=1"),
        ("http://user:p@ss@host:5000/", "http://user:***@host:5000/"),  # an unescaped @ in the password
        ("http://:s3cr3t@host", "http://:***@host"),
        ("postgresql://mlflow:s3cr3t@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
        ("http://host:5000/?token=abc&run=1", "http://host:5000/?token=***&run=1"),
        ("https://h/a?access_token=abc#top", "https://h/a?access_token=***#top"),
        ("s3://b/k?X-Amz-Signature=ff00&X-Amz-Credential=AK%2F1", "s3://b/k?X-Amz-Signature=***&X-Amz-Credential=***"),
        ("https://acct.blob/c?sv=2020&sig=abc%3D", "https://acct.blob/c?sv=2020&sig=***"),
        ("http://h/?password=pw&api_key=k&secret=s", "http://h/?password=***&api_key=***&secret=***"),
    ],
)
def test_passwords_and_secret_query_values_are_masked(text, redacted):
    assert redact_credentials(text) == redacted


@pytest.mark.parametrize(
    "text",
    [
        "http://host:5000/api",
        "http://user@host:5000",  # a user name alone says who, not how
        "sqlite:////home/me/.wmtp/mlflow.db",
        "file:///tmp/x?step=3&key_count=2",
        "run demo: loss 1.5 at 12:30:01, see http://127.0.0.1:5000/#/experiments/1",
    ],
)
def test_text_without_credentials_is_left_as_it_is(text):
    assert redact_credentials(text) == text


def test_every_uri_in_a_message_is_redacted():
    message = (
        "API request to http://user:s3cr3t@127.0.0.1:5000/api/2.0/mlflow/runs/log-batch failed with exception "
        "HTTPConnectionPool(host='127.0.0.1', port=5000) (retried https://u:pw2@other/x?token=t)"
    )
    redacted = redact_credentials(message)
    assert "s3cr3t" not in redacted and "pw2" not in redacted and "token=t" not in redacted
    assert "http://user:***@127.0.0.1:5000/api/2.0/mlflow/runs/log-batch failed" in redacted


def test_a_link_to_open_carries_no_userinfo():
    assert without_credentials("http://user:s3cr3t@host:5000/#/runs/1") == "http://host:5000/#/runs/1"
    assert without_credentials("https://h/x?token=abc") == "https://h/x?token=***"


def test_an_mlflow_error_quoting_the_password_is_re_raised_without_it():
    @credentials_redacted
    def call():
        try:
            raise ConnectionError("to http://user:s3cr3t@h:1/api refused")
        except ConnectionError as error:
            raise MlflowException("API request to http://user:s3cr3t@h:1/api failed") from error

    with pytest.raises(TrackingError) as raised:
        call()
    assert str(raised.value) == "MlflowException: API request to http://user:***@h:1/api failed"
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_an_error_without_credentials_keeps_its_type():
    @credentials_redacted
    def call():
        raise FileNotFoundError("no such checkpoint")

    with pytest.raises(FileNotFoundError):
        call()


def test_a_tracking_server_found_unreachable_is_named_without_its_password():
    port = free_port()  # nothing listens: the connection is refused
    reason = unreachable_reason(f"http://user:s3cr3t@127.0.0.1:{port}")
    assert reason == f"tracking server http://user:***@127.0.0.1:{port} unreachable (Connection refused)"
    assert unreachable_reason("sqlite:////tmp/mlflow.db") is None  # not a server: nothing to reach
