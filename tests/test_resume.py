"""A build killed with SIGKILL resumes when the same command runs again: the blocks it finished
are kept, the rerun fits only the others, and the emulator is bit-identical to an
uninterrupted build."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

BLOCKS = 4
PAUSE = 0.5  # seconds each block's fit is made to take, so that the kill lands mid-build
# `emloc build` with every block's fit slowed down by PAUSE seconds and counted on stderr
SLOW_BUILD = f"""
import sys, time
from emloc_kernels.emulator import build
fit = build._compress_block
def slow(*args, **kwargs):
    print("fitting a block", file=sys.stderr, flush=True)
    time.sleep({PAUSE})
    return fit(*args, **kwargs)
build._compress_block = slow
from emloc_kernels import cli
cli.main(sys.argv[1:])
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, save_tiny_llama, reviews) -> Path:
    """A tiny random Llama of four blocks with SmolLM2's tokenizer, and calibration texts."""
    root = tmp_path_factory.mktemp("resume")
    save_tiny_llama(
        root / "model", hidden_size=32, intermediate_size=64, num_hidden_layers=BLOCKS, tie_word_embeddings=False
    )
    (root / "data.txt").write_text("\n".join(reviews) + "\n")
    return root


def build(root: Path, out: str, *, wait_for: int | None = None) -> str:
    """Run the slowed build to ``root/out``; with ``wait_for``, SIGKILL it once that many
    blocks are kept. Returns its stderr."""
    argv = [sys.executable, "-c", SLOW_BUILD, "build", "model", "--data", "data.txt", "--out", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EMLOC_DISABLE_EXT": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if wait_for is not None:
        kept = root / f".{out}.partial" / f"block{wait_for - 1:05d}.json"
        while not kept.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.perf_counter() - start < 300, "the build did not reach the block"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    if wait_for is None:
        assert proc.returncode == 0, err
    return err


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_killed_build_resumes_bit_identical_and_faster(model_dir):
    assert build(model_dir, "reference").count("fitting a block") == BLOCKS
    build(model_dir, "emu", wait_for=2)
    assert not (model_dir / "emu").exists()
    assert (model_dir / ".emu.partial" / "block00001.json").is_file()
    err = build(model_dir, "emu")
    assert f"resuming the build: 2 of {BLOCKS} blocks kept" in err
    assert err.count("fitting a block") == BLOCKS - 2  # the kept blocks are not fitted again
    assert files(model_dir / "emu") == files(model_dir / "reference")
    assert not (model_dir / ".emu.partial").exists()  # removed once the emulator is written
