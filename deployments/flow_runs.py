"""Running wmtp-train and wmtp-evaluate from the CLI: Prefect's environment and temporary server, the flow run, and
what it reports."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from deployments.cli_options import FAILURE, INTERRUPTED
from flows.temporary_server import default_prefect_environment, start_temporary_server, watch_live_hint
from wmtp_core.config import EvaluationConfig
from wmtp_core.layout import RunLayout
from wmtp_core.run.summary import RunSummary, read_summary
from wmtp_core.runtime.redaction import redact_credentials
from wmtp_core.runtime.run_lock import RunLockedError, run_lock
from wmtp_core.runtime.stopping import EXIT_STATUS

if TYPE_CHECKING:
    from wmtp_core.run.plan import PlannedRun


def run_flow(planned: PlannedRun, *, resume: bool, as_json: bool) -> None:
    """Write the plan, run wmtp-train on it and print its summary; exit 1 on failure (130 after Ctrl-C), and at once,
    with nothing of the run touched, while another process trains the run."""
    with held_or_refused(planned.plan.run_dir):  # before the plan is written; the flow's own hold nests in it
        _run_train_flow(planned, resume=resume, as_json=as_json)


@contextmanager
def held_or_refused(run_dir: Path) -> Iterator[None]:
    """The run's lock held for the block; held by another process: its name on one error line, exit 1."""
    with ExitStack() as held:
        try:
            held.enter_context(run_lock(run_dir))
        except RunLockedError as refusal:
            print(f"error: {refusal}", file=sys.stderr)
            raise typer.Exit(FAILURE) from None
        yield


def _run_train_flow(planned: PlannedRun, *, resume: bool, as_json: bool) -> None:
    default_prefect_environment()  # before prefect is first imported: it reads its settings then
    server_ready = start_temporary_server()
    from flows.train import wmtp_train
    from wmtp_core.run.plan import write_plan

    run_plan = planned.plan
    plan_file = write_plan(planned)
    if run_plan.launcher == "in-process":
        import wmtp_core.training.loop  # noqa: F401  (torch: the in-process training task loads it; now, while the server starts)
    wait_for_server(server_ready)
    from prefect import tags

    before = _summary_stamp(run_plan.layout)
    try:
        with tags("wmtp-cli", "resume" if resume else "train"):  # CLI runs are told apart from served ones in the UI
            state = wmtp_train(plan_file=str(plan_file), return_state=True)
    except KeyboardInterrupt:
        _report_abort(run_plan.recipe.run.name)
        raise typer.Exit(INTERRUPTED) from None
    # a summary.json this flow run did not write (its write failed: a full disk) is an earlier run's
    summary = read_summary(run_plan.layout) if _summary_stamp(run_plan.layout) != before else None
    if summary is None:
        told = redact_credentials(f"flow run ended {state.name} before writing a summary: {state.message}")
        print(f"error: {told}", file=sys.stderr)
        raise typer.Exit(FAILURE)
    print_summary(summary, as_json=as_json)
    print(watch_live_hint(str(state.state_details.flow_run_id)), file=sys.stderr)
    if summary.status == "stopped" and summary.stop_reason in EXIT_STATUS:  # 130 Ctrl-C, 143 SIGTERM
        raise typer.Exit(EXIT_STATUS[summary.stop_reason])
    if summary.status != "completed":
        raise typer.Exit(FAILURE)


def _summary_stamp(layout: RunLayout) -> tuple[int, int] | None:
    """Tells one summary.json from the next: each is a new file renamed into place (write_atomically)."""
    if not layout.summary.is_file():
        return None
    stat = layout.summary.stat()
    return stat.st_ino, stat.st_mtime_ns


def _report_abort(run_name: str) -> None:
    """A second Ctrl-C ended the run without saving: say what is left on disk and how to go on."""
    from wmtp_core.run.start import choose_checkpoint

    latest = choose_checkpoint(RunLayout.of_run(run_name), "latest", continuing=False, fresh_if_none=True)
    kept = f"the newest checkpoint is step {latest.step}" if not latest.fresh else "no checkpoint was saved yet"
    go_on = (
        f"continue with: wmtp resume {run_name}" if not latest.fresh else f"start again with: wmtp train -n {run_name}"
    )
    print(f"run {run_name} aborted by a second Ctrl-C: {kept}\n{go_on}", file=sys.stderr)


def run_evaluation_flow(run_name: str, *, step: int | None, evaluation: EvaluationConfig) -> dict:
    """Run wmtp-evaluate on run_name's checkpoint and return its report; exit 1 when the flow run failed."""
    default_prefect_environment()
    server_ready = start_temporary_server()
    import wmtp_core.evaluation.checkpoint_evaluation  # noqa: F401  (torch loads now, while the server starts)
    from flows.evaluate import wmtp_evaluate

    wait_for_server(server_ready)
    from prefect import tags

    try:
        with tags("wmtp-cli", "evaluate"):
            state = wmtp_evaluate(run_name=run_name, step=step, evaluation=evaluation, return_state=True)
    except KeyboardInterrupt:
        print(f"evaluation of {run_name} aborted by Ctrl-C", file=sys.stderr)
        raise typer.Exit(INTERRUPTED) from None
    report = state.result(raise_on_failure=False)
    if not isinstance(report, dict):
        print(f"error: {redact_credentials(f'wmtp-evaluate ended {state.name}: {state.message}')}", file=sys.stderr)
        raise typer.Exit(FAILURE)
    print(watch_live_hint(str(state.state_details.flow_run_id)), file=sys.stderr)
    return report


def wait_for_server(server_ready: Callable[[], None]) -> None:
    """Wait for the temporary server started ahead of the flow run; exit 1 when it did not start."""
    try:
        server_ready()
    except Exception as error:
        print(
            f"error: Prefect's temporary server did not start ({error}); set PREFECT_API_URL to use a running "
            "server instead (e.g. the one `uv run wmtp ui` starts: PREFECT_API_URL=http://127.0.0.1:4200/api)",
            file=sys.stderr,
        )
        raise typer.Exit(FAILURE) from None


def print_summary(summary: RunSummary, *, as_json: bool) -> None:
    """The run's outcome for people (stdout, or stderr under --json), then the JSON summary under --json."""
    from flows.train import stopped_by
    from tracking.client import ui_command

    if summary.status == "stopped":
        print(
            f"run {summary.run_name} stopped by {stopped_by(summary.stop_reason)} at step {summary.steps}\n"
            f"checkpoint: {summary.latest_checkpoint}\ncontinue with: wmtp resume {summary.run_name}",
            file=sys.stderr,
        )
    elif summary.status != "completed":
        # a reason quotes an error, which may quote any URI of the environment
        print(f"error: run {summary.run_name} failed: {redact_credentials(str(summary.reason))}", file=sys.stderr)
    else:
        print(
            f"run {summary.run_name} completed {summary.steps} steps: eval loss "
            f"{summary.initial_eval_loss:.4f} -> {summary.final_eval_loss:.4f}\n"
            f"checkpoint: {summary.latest_checkpoint}\nMLflow UI: {ui_command()}",
            file=sys.stderr if as_json else sys.stdout,
        )
    if summary.uploads == "pending":
        print(
            f"MLflow: uploads pending ({summary.uploads_reason}); send them with: wmtp upload {summary.run_name}",
            file=sys.stderr,
        )
    if as_json:
        print(summary.model_dump_json(), flush=True)
