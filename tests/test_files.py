"""No command may destroy a user's files: ``--out`` that is, contains or lies inside an input,
or that is a file, a symbolic link or a directory the library did not write, is refused
before any work, with ``--overwrite`` too; a sandbox's every file hashes as before."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import transformers

from emloc_kernels import cli
from emloc_kernels.files import MARKER, check_output, write_dir_atomically


def snapshot(root: Path) -> dict[str, str]:
    """Every path below ``root`` with the hash of its content (or its link target)."""
    out = {}
    for p in sorted(root.rglob("*")):
        key = str(p.relative_to(root))
        if p.is_symlink():
            out[key] = "-> " + str(p.readlink())
        elif p.is_file():
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[key] = "dir"
    return out


@pytest.fixture
def sandbox(tmp_path, tiny_model, monkeypatch):
    """``P/a``: a canary model; ``P/b``: an unrelated directory; ``data.txt``; ``note.txt``: a
    user's file; ``link``: a symbolic link to ``P/b``. Loading any model fails the test: every
    refusal must come before the work."""
    parent = tmp_path / "P"
    tiny_model("llama").save_pretrained(parent / "a")
    (parent / "b").mkdir()
    (parent / "b" / "results.csv").write_text("precious\n")
    (tmp_path / "data.txt").write_text("a calibration sample\nanother one\n")
    (tmp_path / "note.txt").write_text("my notes\n")
    (tmp_path / "link").symlink_to(parent / "b")

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(no_loading))
    monkeypatch.chdir(tmp_path)
    return tmp_path


CASES = {
    "build: out is the model": ("build P/a --data data.txt --out P/a --overwrite", "lies inside the input"),
    "build: out is the model's parent": ("build P/a --data data.txt --out P --overwrite", "lies inside the input"),
    "build: out inside the model": ("build P/a --data data.txt --out P/a/emu", "lies inside the input"),
    "build: out is the data file": ("build P/a --data data.txt --out data.txt --overwrite", "lies inside the input"),
    "build: out is a user's file": ("build P/a --data data.txt --out note.txt --overwrite", "is a file"),
    "build: out is a symlink": ("build P/a --data data.txt --out link --overwrite", "is a symbolic link"),
    "build: out is a foreign dir": ("build P/a --data data.txt --out P/b --overwrite", "not written by emloc_kernels"),
    "build: out exists": ("build P/a --data data.txt --out P/b", "exists; choose another directory"),
    "merge: out is the original": ("merge P/b --original P/a --out P/a --overwrite", "lies inside the input"),
    "merge: out is the parent": ("merge P/b --original P/a --out P --overwrite", "lies inside the input"),
    "merge: out is the adapter": ("merge P/b --original P/a --out P/b --overwrite", "lies inside the input"),
    "finetune: out is the model": ("finetune --model P/a --out P/a --overwrite", "lies inside the input"),
    "finetune: out is the parent": ("finetune --model P/a --out P --overwrite", "lies inside the input"),
    "finetune: out is a symlink": ("finetune --model P/a --out link --overwrite", "is a symbolic link"),
    "correct: out is the original": (
        "correct P/b --emulator P/b --original P/a --out P --overwrite",
        "lies inside the input",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_refused_before_work_and_nothing_changes(sandbox, case, capsys):
    argv, message = CASES[case]
    before = snapshot(sandbox)
    with pytest.raises(SystemExit) as e:
        cli.main(argv.split())
    text = str(e.value.code)
    assert text.startswith("emloc ") and message in text and "\n" not in text
    assert snapshot(sandbox) == before


def test_library_directory_is_replaced_and_stale_siblings_removed(tmp_path):
    out = tmp_path / "out"
    write_dir_atomically(out, lambda d: (d / "x.txt").write_text("1"))
    assert (out / MARKER).is_file()
    with pytest.raises(FileExistsError, match="exists"):
        write_dir_atomically(out, lambda d: (d / "x.txt").write_text("2"))
    # a write killed mid-way leaves a hidden sibling; a user's look-alike without the marker stays
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.{int(dead.stdout)}.abc.tmp"
    stale.mkdir()
    (stale / MARKER).write_text("{}")
    foreign = tmp_path / f".out.{int(dead.stdout)}.xyz.tmp"
    foreign.mkdir()
    write_dir_atomically(out, lambda d: (d / "x.txt").write_text("2"), overwrite=True)
    assert (out / "x.txt").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", foreign.name])


def test_failed_write_keeps_the_old_directory(tmp_path):
    out = tmp_path / "out"
    write_dir_atomically(out, lambda d: (d / "x.txt").write_text("1"))

    def broken(d: Path) -> None:
        (d / "x.txt").write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_dir_atomically(out, broken, overwrite=True)
    assert (out / "x.txt").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_check_output_ignores_objects_and_missing_names(tmp_path):
    out = tmp_path / "new" / "out"
    assert check_output(out, [object(), "HuggingFaceTB/SmolLM2-135M", None]) == out
    with pytest.raises(ValueError, match="--out .* lies inside the input"):
        check_output(tmp_path, [out.parent.parent])


def test_a_users_folder_in_place_of_the_build_checkpoint_is_refused(sandbox):
    from emloc_kernels.emulator.checkpoint import SETTINGS_FILE, BlockCheckpoint

    partial = sandbox / ".emu.partial"
    partial.mkdir()
    (partial / "precious.txt").write_text("mine\n")
    before = snapshot(sandbox)
    with pytest.raises(SystemExit, match="is not a block checkpoint of emloc_kernels"):
        cli.main("build P/a --data data.txt --out emu".split())
    (sandbox / ".emu2.partial").symlink_to(sandbox / "P" / "b")
    with pytest.raises(SystemExit, match="is a symbolic link"):
        cli.main("build P/a --data data.txt --out emu2".split())
    (partial / SETTINGS_FILE).write_text('{"tool": "make"}')  # someone else's build.json
    before = snapshot(sandbox)
    with pytest.raises(FileExistsError, match="not a block checkpoint"):
        BlockCheckpoint(partial, "settings of a build")
    assert snapshot(sandbox) == before


@pytest.mark.parametrize(
    "argv, message",
    [
        ("finetune --steps 0", "--steps must be an integer from 1"),
        ("finetune --batch-size -1", "--batch-size must be an integer from 1"),
        ("finetune --lora-rank 1000000000000", "--lora-rank must be an integer from 1 to 4096"),
        ("finetune --calibration-samples -1", "--calibration-samples must be an integer from 1"),
        ("finetune --eval-samples 0", "--eval-samples must be an integer from 1"),
        ("finetune --lr inf", "--lr must be a positive finite number"),
        ("finetune --device bogus", "--device 'bogus' is not a device"),
        ("finetune --device cuda:9", "CUDA device"),
        ("finetune --distill-lr 0", "--distill-lr must be a positive finite number"),
        ("finetune --anchor-rounds 0", "--anchor-rounds must be an integer from 1"),
        ("build P/a --data data.txt --out e --samples -1", "--samples must be an integer from 1"),
        ("build P/a --data data.txt --out e --distill-lr nan", "--distill-lr must be a positive finite number"),
        ("build P/a --data data.txt --out e --distill-rank 0", "--distill-rank must be an integer from 1"),
        ("build P/a --data data.txt --out e --device meta", "--device 'meta': use cpu"),
    ],
)
def test_out_of_range_numbers_and_devices_are_refused(sandbox, argv, message):
    with pytest.raises(SystemExit) as e:
        cli.main(argv.split())
    assert message in str(e.value.code) and "\n" not in str(e.value.code)
