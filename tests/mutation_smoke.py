"""Mutation smoke check: each deliberate bug below must make the tests that guard it fail.

For each mutant the package (with csrc/ and tests/) is copied to a temporary directory, one
line is changed there, and the guarding tests run against the copy.  The check fails if a
mutant survives (its tests pass), if the change no longer applies, or if the tests did not
run.  ``python tests/mutation_smoke.py`` (part of ``make test``; about a minute).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (what, file, original text, mutated text, pytest arguments, extra environment)
MUTANTS = [
    (
        "wrong scaling in the fused LoRA path",
        "emloc_kernels/modules/fused.py",
        "lora_a, lora_b, scaling, base.bias)",
        "lora_a, lora_b, 1.5 * scaling, base.bias)",
        ["tests/test_lora.py", "-k", "fused_layer_matches or plain_adapter_takes"],
        {},
    ),
    (
        "fused path ignores its allow-list (dropout, lora_bias, DoRA)",
        "emloc_kernels/modules/peft_layers.py",
        "return name if plain else None",
        "return name",
        ["tests/test_lora.py", "-k", "excluded_features and (lora_bias or dropout or dora)"],
        {},
    ),
    (
        "kernel store drops the last output column",
        "emloc_kernels/ops/_triton_gemm.py",
        "mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))",
        "mask=(offs_m[:, None] < M) & (offs_n[None, :] < N - 1))",
        ["tests/kernels/test_lowrank_lora.py", "-k", "matches_fp64 and cpu and float32-lora_float32-bias-contig-train"],
        {"TRITON_INTERPRET": "1"},
    ),
]


def run_mutant(what: str, file: str, old: str, new: str, args: list[str], env: dict[str, str]) -> str | None:
    """None if the tests caught the mutant, else why not."""
    with tempfile.TemporaryDirectory(prefix="emloc-mutant-") as tmp:
        for part in ("emloc_kernels", "csrc", "tests"):
            shutil.copytree(ROOT / part, Path(tmp) / part, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "pyproject.toml", tmp)
        target = Path(tmp) / file
        text = target.read_text()
        if text.count(old) < 1:
            return f"the mutation no longer applies: {old!r} is not in {file}"
        target.write_text(text.replace(old, new))
        run_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        run_env.update(PYTHONPATH=tmp, OMP_NUM_THREADS="1", **env)
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args],
            cwd=tmp,
            env=run_env,
            capture_output=True,
            text=True,
        )
        last = (done.stdout.strip().splitlines() or [""])[-1]
        if done.returncode == 1 and "failed" in last:
            print(f"caught: {what} ({last})")
            return None
        return f"{what}: pytest exit {done.returncode}, {last!r}\n{done.stdout[-3000:]}{done.stderr[-2000:]}"


def main() -> int:
    problems = [p for m in MUTANTS if (p := run_mutant(*m)) is not None]
    for p in problems:
        print(f"NOT CAUGHT: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
