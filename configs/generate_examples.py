"""Writes configs/*.yaml and the recipe-key table of docs/recipes.md from the Recipe schema (tests check both match it).

Run after adding or changing a recipe key: uv run python configs/generate_examples.py
"""

import json
from pathlib import Path

from pydantic import BaseModel

from wmtp_core.config import Recipe
from wmtp_core.recipes import TINY_MODEL, load_recipe

ROOT = Path(__file__).resolve().parents[1]


def scalar(value):
    """JSON text that YAML reads back as the same value: YAML 1.1 takes 2e-05 for a string, 2.0e-05 for a float."""
    text = json.dumps(value)
    return text.replace("e", ".0e", 1) if isinstance(value, float) and "e" in text and "." not in text else text


def one_line(description):
    """A field description on one line (attribute docstrings wrapped in config.py carry newlines and indents)."""
    return " ".join(description.split())


def commented(recipe, header):
    lines = [f"# {h}" for h in header] + [""]
    for name, field in Recipe.model_fields.items():
        value = getattr(recipe, name)
        if isinstance(value, BaseModel):
            lines.append(f"{name}:  # {one_line(field.description)}")
            for sub, subfield in type(value).model_fields.items():
                v = value.model_dump(mode="json")[sub]
                lines.append(f"  {sub}: {scalar(v)}  # {one_line(subfield.description)}")
        else:
            lines.append(f"{name}: {scalar(value)}  # {one_line(field.description)}")
    return "\n".join(lines) + "\n"


def write(path, overrides, header):
    recipe = load_recipe(None, overrides)
    open(path, "w").write(commented(recipe, header))
    assert load_recipe(path) == recipe


write(
    ROOT / "configs" / "baseline-mtp.yaml",
    [],
    [
        "The default recipe (what `wmtp train` runs with no --recipe), written out flat and complete.",
        "Run: uv run wmtp train --recipe configs/baseline-mtp.yaml",
    ],
)
write(
    ROOT / "configs" / "tiny.yaml",
    TINY_MODEL
    + [
        "seed=7",
        "train.warmup_steps=1",
        "train.eval_batches=2",
        "train.max_steps=20",
        "train.save_every=10",
        "train.eval_every=10",
        "train.log_every=5",
    ],
    [
        "A seconds-long smoke run on CPU: the tests' tiny model (2 layers, d_model 32, horizon 2).",
        "Run: uv run wmtp train --recipe configs/tiny.yaml",
    ],
)
write(
    ROOT / "configs" / "critic-wmtp.yaml",
    ["train.algorithm=critic-wmtp"],
    [
        "critic-wmtp on the built-in model and data (CPU, under a minute): Stage 1 pretrains the "
        "value head with the trunk",
        "frozen, Stage 2 weights each head by the softmaxed TD difference of the value head.",
        "Run: uv run wmtp train --recipe configs/critic-wmtp.yaml",
    ],
)
write(
    ROOT / "configs" / "rho1-wmtp.yaml",
    ["train.algorithm=rho1-wmtp"],
    [
        "rho1-wmtp (weighted) on the built-in model and data (CPU, about a minute): with no "
        "rho1.reference_checkpoint the",
        "built-in model is first trained for rho1.reference_steps baseline steps as the reference.",
        "Run: uv run wmtp train --recipe configs/rho1-wmtp.yaml",
    ],
)
write(
    ROOT / "configs" / "rho1-wmtp-token-skip.yaml",
    ["train.algorithm=rho1-wmtp", "rho1.selection_mode=token_skip", "loss.weight_norm=head_softmax"],
    [
        "rho1-wmtp with token_skip: only (token, head) entries whose excess loss is above each sequence's",
        "rho1.skip_threshold_percentile quantile are trained.",
        "Run: uv run wmtp train --recipe configs/rho1-wmtp-token-skip.yaml",
    ],
)

write(
    ROOT / "configs" / "meta-7b-mtp-fsdp.yaml",
    [
        "model.source=hf",
        "model.path=/models/7B_1T_4-hf",
        "model.horizon=4",
        "model.max_seq_len=2048",
        "data.batch_size=2",
        "train.lr=2e-5",
        "train.weight_decay=0.01",
        "train.warmup_steps=30",
        "train.max_steps=1000",
        "train.save_every=250",
        "train.eval_every=250",
        "devices.backend=cuda",
        "devices.precision=bf16",
        "devices.strategy=fsdp",
        "devices.nproc_per_node=8",
    ],
    [
        "Meta's 7B multi-token model (4 heads) fine-tuned with FSDP on one node of 8 GPUs, bf16 "
        "autocast over fp32 master weights.",
        "FSDP2 gathers weights in bf16 and the heads run one at a time (loss.sequential_heads=auto on CUDA): "
        "about 46 GB per GPU;",
        "on 40 GB GPUs add --set train.activation_checkpointing=blocks (about 20 GB; docs/real-models.md).",
        "model.path: the output of `wmtp convert-meta` (docs/real-models.md); data.path: your JSONL.",
        "Run: uv sync --extra hf && uv run wmtp train --recipe configs/meta-7b-mtp-fsdp.yaml --set "
        "data.path=DATA.jsonl",
    ],
)


def recipe_key_table() -> None:
    """Rewrite the rows under the `| key | default | meaning |` header of docs/recipes.md from the schema."""
    page = ROOT / "docs" / "recipes.md"
    lines = page.read_text().splitlines()
    start = lines.index("| key | default | meaning |") + 2
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    recipe = Recipe()
    rows = []
    for name, field in Recipe.model_fields.items():
        value = getattr(recipe, name)
        if isinstance(value, BaseModel):
            dumped = value.model_dump(mode="json")
            for sub, subfield in type(value).model_fields.items():
                rows.append(f"| `{name}.{sub}` | `{_show(dumped[sub])}` | {one_line(subfield.description)} |")
        else:
            rows.append(f"| `{name}` | `{_show(value)}` | {one_line(field.description)} |")
    page.write_text("\n".join(lines[:start] + rows + lines[end:]) + "\n")


def _show(value) -> str:
    """How the table has always shown a default: null for None, Python spelling otherwise."""
    return "null" if value is None else value


recipe_key_table()
print("ok")
