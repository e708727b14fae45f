"""The Trainer-based training stage in two processes (CPU, gloo, torchrun) gives the adapter
of one process at the same global batch (tiny random Llama, SmolLM2's tokenizer)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

HELPER = Path(__file__).with_name("distributed_train.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(tokenizer_dir, out: Path, processes: int, batch_size: int, grad_accum: int, steps: int = 4) -> dict:
    args = [str(tokenizer_dir), str(out), str(batch_size), str(grad_accum), str(steps)]
    if processes == 1:
        cmd = [sys.executable, str(HELPER), *args]
    else:
        launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master_addr=127.0.0.1"]
        cmd = [sys.executable, *launcher, f"--master_port={free_port()}", str(HELPER), *args]
    root = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["world_size"] == str(processes)
    return load_file(out)


def test_two_processes_train_the_adapter_of_one_at_the_same_global_batch(smollm2_dir, tmp_path):
    pytest.importorskip("torch.distributed")
    if not torch.distributed.is_gloo_available():
        pytest.skip("torch has no gloo backend")
    two = train(smollm2_dir, tmp_path / "two.safetensors", processes=2, batch_size=2, grad_accum=1)
    one = train(smollm2_dir, tmp_path / "one.safetensors", processes=1, batch_size=4, grad_accum=1)
    accumulated = train(smollm2_dir, tmp_path / "acc.safetensors", processes=1, batch_size=2, grad_accum=2)
    assert two.keys() == one.keys() and any("lora_B" in k for k in one)
    assert any(one[k].abs().max() > 1e-3 for k in one if "lora_B" in k)  # the adapter was trained
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=1e-5)
        torch.testing.assert_close(accumulated[k], one[k], rtol=0, atol=1e-5)
