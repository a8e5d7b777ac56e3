"""Generate wmtp_core/data/assets/builtin_mbpp.jsonl, the built-in MBPP-schema training set.

The problems live in builtin_problems.json next to this file: a list of templates, each one
programming problem with these fields:

    names      function names to use, each a string or an object of placeholder values
               (with "name", plus extras such as "k")
    texts      two phrasings of the problem statement
    solutions  one or more correct solutions, each a list of source lines
    bugs       one or more plausible buggy solutions, in the same form
    tests      three assert expressions (without the "assert" keyword)

"{name}", "{k}", ... in any of these are replaced by the variant's values. Every template
yields 6 correct records and 2 incorrect ones (reward 0.0). Labels are checked here: every
correct record must pass all of its asserts and every incorrect record must fail at least
one, or generation stops.

Standard library only and fully deterministic (seeded random.Random(0), sorted JSON keys),
so running it twice gives a byte-identical file:

    python -m wmtp_core.data.assets.generate_builtin_dataset
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PROBLEMS_PATH = Path(__file__).with_name("builtin_problems.json")
OUTPUT_PATH = Path(__file__).with_name("builtin_mbpp.jsonl")
CORRECT_PER_TEMPLATE = 6
INCORRECT_PER_TEMPLATE = 2


def load_templates(path: Path = PROBLEMS_PATH) -> list[dict]:
    """Read the problem templates; names become variant dicts, line lists become source text."""
    templates = []
    for problem in json.loads(path.read_text(encoding="ascii")):
        templates.append(
            {
                "variants": [n if isinstance(n, dict) else {"name": n} for n in problem["names"]],
                "texts": problem["texts"],
                "codes": ["\n".join(lines) for lines in problem["solutions"]],
                "bugs": ["\n".join(lines) for lines in problem["bugs"]],
                "tests": problem["tests"],
            }
        )
    return templates


def fill(template: str, variant: dict) -> str:
    """Substitute {field} placeholders; str.replace keeps dict literals like {} in code intact."""
    for key, value in variant.items():
        template = template.replace("{" + key + "}", value)
    return template


def passes_all(code: str, tests: list[str]) -> list[bool]:
    """Run the code, then each assert, in a fresh namespace; True where the assert held."""
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102 - trusted, generated-here source
    results = []
    for test in tests:
        try:
            exec(test, namespace)  # noqa: S102
            results.append(True)
        except Exception:  # an AssertionError, or a crash such as IndexError, both mean "fails"
            results.append(False)
    return results


def make_record(template: dict, variant: dict, text: str, code: str, correct: bool) -> dict:
    """Build one record and check that its label agrees with its asserts."""
    code = fill(code, variant)
    tests = ["assert " + fill(t, variant) for t in template["tests"]]
    outcome = passes_all(code, tests)
    if correct and not all(outcome):
        raise AssertionError(f"correct solution fails its tests:\n{code}\n{tests}\n{outcome}")
    if not correct and all(outcome):
        raise AssertionError(f"incorrect solution passes all its tests:\n{code}\n{tests}")
    return {
        "text": fill(text, variant),
        "code": code,
        "test_list": tests,
        "is_correct": correct,
        "reward": 1.0 if correct else 0.0,
    }


def records_for(template: dict) -> list[dict]:
    """6 correct records (every name x phrasing pair, cycling solutions) and 2 incorrect ones."""
    variants, texts = template["variants"], template["texts"]
    records = []
    for i in range(CORRECT_PER_TEMPLATE):
        code = template["codes"][(i // len(texts)) % len(template["codes"])]
        records.append(make_record(template, variants[i % len(variants)], texts[i % len(texts)], code, True))
    for j in range(INCORRECT_PER_TEMPLATE):
        bug = template["bugs"][j % len(template["bugs"])]
        records.append(make_record(template, variants[(j + 1) % len(variants)], texts[j % len(texts)], bug, False))
    return records


def build_dataset(templates: list[dict], seed: int = 0) -> list[dict]:
    """All records, shuffled with a seeded RNG and numbered by task_id from 1."""
    records = [record for template in templates for record in records_for(template)]
    random.Random(seed).shuffle(records)
    for task_id, record in enumerate(records, start=1):
        record["task_id"] = task_id
    return records


def write_jsonl(records: list[dict], path: Path) -> None:
    """One sorted-key JSON object per line, ASCII only, newline-terminated."""
    lines = [json.dumps(record, sort_keys=True, ensure_ascii=True) + "\n" for record in records]
    text = "".join(lines)
    if not text.isascii():
        raise ValueError("dataset must be ASCII")
    with path.open("w", encoding="ascii", newline="\n") as handle:
        handle.write(text)


def main() -> None:
    templates = load_templates()
    records = build_dataset(templates)
    write_jsonl(records, OUTPUT_PATH)
    correct = sum(record["is_correct"] for record in records)
    print(
        f"wrote {len(records)} records ({correct} correct, {len(records) - correct} incorrect) "
        f"from {len(templates)} templates to {OUTPUT_PATH}"
    )


if __name__ == "__main__":
    main()
