"""Write an lm-evaluation-harness task over the demo's Rotten Tomatoes test reviews (local
files, no download), to evaluate an emulator directory with lm-eval:

    python bench/lm_eval_task.py TASK_DIR
    python -c "import emloc_kernels; from lm_eval.__main__ import cli_evaluate; cli_evaluate()" \
        --model hf --model_args pretrained=EMULATOR_DIR,dtype=float32 --tasks emloc_rt \
        --include_path TASK_DIR --device cpu --batch_size 16

The prompt and the label words are the demo's (``recipe/demo.py``); lm-eval scores each
choice by the log-likelihood of its whole continuation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from emloc_kernels.recipe.demo import PROMPT, rotten_tomatoes

LABELS = ("negative", "positive")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task_dir", type=Path)
    a = p.parse_args()
    a.task_dir.mkdir(parents=True, exist_ok=True)
    _, test = rotten_tomatoes()
    data = a.task_dir / "emloc_rt_test.jsonl"
    data.write_text("".join(json.dumps({"text": r["text"], "label": LABELS.index(r["label"])}) + "\n" for r in test))
    prompt = json.dumps(PROMPT.replace("{text}", "{{text}}"))
    (a.task_dir / "emloc_rt.yaml").write_text(
        "task: emloc_rt\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data.resolve()))}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        f"doc_to_text: {prompt}\n"
        f"doc_to_choice: {json.dumps([' ' + w for w in LABELS])}\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    print(f"task emloc_rt ({len(test)} reviews) in {a.task_dir}")


if __name__ == "__main__":
    main()
