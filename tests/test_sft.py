"""The main job on generative data (chat, prompt-completion) with transformers' Trainer: loss
and perplexity in the report, the transfer chosen by validation loss, the upper bound, a
killed training resumed from its checkpoint (tiny random Llama with SmolLM2's tokenizer)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

from emloc_kernels import cli
from emloc_kernels.recipe.data import GenerativeTask, lm_loss, read_rows
from emloc_kernels.recipe.finetune import FinetuneSettings, validation_size

COUNTRIES = [
    ("France", "Paris"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Germany", "Berlin"),
    ("Japan", "Tokyo"),
    ("Egypt", "Cairo"),
    ("Peru", "Lima"),
    ("Kenya", "Nairobi"),
    ("Chile", "Santiago"),
    ("Greece", "Athens"),
    ("Norway", "Oslo"),
    ("Poland", "Warsaw"),
    ("Cuba", "Havana"),
    ("India", "New Delhi"),
    ("Canada", "Ottawa"),
    ("Austria", "Vienna"),
]


def chat(country: str, city: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"What is the capital of {country}?"},
            {"role": "assistant", "content": f"The capital of {country} is {city}."},
        ]
    }


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def material(tmp_path_factory, save_tiny_llama):
    root = tmp_path_factory.mktemp("sft")
    save_tiny_llama(root / "model")
    rows = [chat(c, k) for c, k in COUNTRIES]
    write(root / "chat-train.jsonl", rows[:12] * 2)
    write(root / "chat-test.jsonl", rows[12:])
    pc = [{"prompt": f"Capital of {c}:", "completion": f" {k}"} for c, k in COUNTRIES]
    write(root / "pc-train.jsonl", pc[:12] * 2)
    write(root / "pc-test.jsonl", pc[12:])
    return root


def run(material, out, kind="chat", *extra):
    cli.main(
        [
            "finetune",
            "--model",
            str(material / "model"),
            "--data",
            str(material / f"{kind}-train.jsonl"),
            "--eval-data",
            str(material / f"{kind}-test.jsonl"),
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--calibration-samples",
            "8",
            "--distill-steps",
            "2",
            "--validation-samples",
            "6",
            "--max-length",
            "64",
            "--log-steps",
            "1",
            "--lr",
            "5e-3",
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ]
    )
    return json.loads((out / "report.json").read_text())


def test_chat_run_reports_loss_and_perplexity(material, tmp_path, capsys):
    report = run(material, tmp_path / "run")
    table = capsys.readouterr().out
    assert "| model | test loss | test perplexity | validation loss |" in table and "← delivered" in table
    assert report["format"] == "messages" and report["metric"] == "loss"
    assert report["settings"]["anchor"] is False  # the default anchors label data only
    assert report["loss"] == {k: report[k] for k in ("zero_shot", "emulator", "uncorrected", "corrected")}
    assert report["perplexity"]["corrected"] == pytest.approx(math.exp(report["corrected"]))
    # the delivered adapter has the lowest validation loss of the paper's variants
    assert set(report["variants"]) == {"uncorrected", "L=1", "L=3", "unclamped"}
    best = min(v["validation"] for v in report["variants"].values())
    assert report["variants"][report["chosen"]]["validation"] == best
    # the Trainer ran the steps and logged each; its checkpoints are not part of the output
    assert report["loss_steps"] == [1, 2, 3, 4] and len(report["losses"]) == 4
    assert report["losses"][-1] < report["losses"][0]
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"loss_curve.png", "adapter", "emulator", "report.json", "table.md"} <= names
    assert not {n for n in names if n.startswith("checkpoint")}
    assert (tmp_path / "run" / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the reported losses are those of the models as saved, recomputed here
    original = AutoModelForCausalLM.from_pretrained(material / "model")
    _, test_rows = read_rows(material / "chat-test.jsonl", "test")
    task = GenerativeTask(AutoTokenizer.from_pretrained(material / "model"), "messages", 64)
    features = task.features(test_rows, "test")
    assert lm_loss(original, task, features) == pytest.approx(report["zero_shot"], rel=1e-6)
    delivered = PeftModel.from_pretrained(original, tmp_path / "run" / report["delivered_adapter"])
    assert lm_loss(delivered, task, features) == pytest.approx(report["corrected"], rel=1e-6)


def test_prompt_completion_with_trainer_options_and_upper_bound(material, tmp_path):
    report = run(
        material,
        tmp_path / "ub",
        "pc",
        "--transfer",
        "uncorrected",
        "--upper-bound",
        "--grad-accum",
        "2",
        "--lr-scheduler",
        "cosine",
        "--warmup-ratio",
        "0.25",
        "--epochs",
        "2",
    )
    assert report["format"] == "prompt-completion"
    # 18 training rows, batches of 4 (5 per pass), 2 per step (the last of a pass with one): 3 steps a pass
    assert report["sizes"] == {"train": 18, "validation": 6, "test": 4}
    assert report["loss_steps"] == [1, 2, 3, 4, 5, 6]
    assert report["lora_original"] == report["loss"]["lora_original"]
    gain = report["lora_original"] - report["zero_shot"]
    assert report["recovery"] == pytest.approx((report["corrected"] - report["zero_shot"]) / gain)
    assert report["variants"]["uncorrected"]["validation"] is None  # no choice to make
    assert "train_original" in report["timings_s"]
    table = (tmp_path / "ub" / "table.md").read_text()
    assert f"| original, LoRA fine-tuning | {report['memory']['finetune_original'] / 2**20:,.0f} MiB |" in table


def test_killed_training_resumes_from_its_last_checkpoint(material, tmp_path, monkeypatch):
    extra = ("--transfer", "uncorrected", "--steps", "6", "--save-steps", "2")
    reference = run(material, tmp_path / "reference", "chat", *extra)

    real_save = Trainer._save_checkpoint

    def save_then_die(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        if self.state.global_step == 4:
            raise KeyboardInterrupt  # stands for a kill after the checkpoint of step 4

    monkeypatch.setattr(Trainer, "_save_checkpoint", save_then_die)
    with pytest.raises(SystemExit, match="130"):  # the CLI's exit on an interrupt
        run(material, tmp_path / "run", "chat", *extra)
    work = tmp_path / ".run.partial"
    assert (work / "checkpoints" / "checkpoint-4").is_dir()
    assert "train" not in json.loads((work / "stages.json").read_text())

    monkeypatch.setattr(Trainer, "_save_checkpoint", real_save)
    resumed_from = []
    real_train = Trainer.train

    def spy(self, *args, **kwargs):
        resumed_from.append(kwargs.get("resume_from_checkpoint"))
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", spy)
    report = run(material, tmp_path / "run", "chat", *extra)
    assert resumed_from == [str(work / "checkpoints" / "checkpoint-4")]
    assert report["loss_steps"] == reference["loss_steps"] == [1, 2, 3, 4, 5, 6]
    assert report["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    a = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "reference" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    assert report["corrected"] == pytest.approx(reference["corrected"], rel=1e-5)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_trainer_options_are_refused_for_label_data(material, tmp_path):
    train = write(
        tmp_path / "train.jsonl", [{"text": f"review {i}", "label": "good bad"[i % 2 * 4 :]} for i in range(20)]
    )
    with pytest.raises(SystemExit, match="--grad-accum, --lr-scheduler: for generative data"):
        cli.main(
            ["finetune", "--model", str(material / "model"), "--data", train, "--eval-data", train]
            + ["--grad-accum", "2", "--lr-scheduler", "cosine", "--out", str(tmp_path / "x")]
        )


def test_anchor_is_refused_for_generative_data(material, tmp_path):
    with pytest.raises(SystemExit, match="--anchor: for label classification data only"):
        cli.main(
            ["finetune", "--model", str(material / "model"), "--data", str(material / "chat-train.jsonl")]
            + ["--eval-data", str(material / "chat-test.jsonl"), "--anchor", "--out", str(tmp_path / "x")]
        )
    assert not (tmp_path / "x").exists()


def test_eval_data_in_another_format_is_refused(material, tmp_path):
    with pytest.raises(SystemExit, match=r"--eval-data .* is in the 'prompt-completion' format, --data .* 'messages'"):
        cli.main(
            ["finetune", "--model", str(material / "model"), "--data", str(material / "chat-train.jsonl")]
            + ["--eval-data", str(material / "pc-test.jsonl"), "--out", str(tmp_path / "x")]
        )


def test_small_data_holds_out_a_share_for_validation(caplog):
    s = FinetuneSettings(validation_samples=200, batch_size=8)
    assert validation_size(s, 1000) == 200
    with caplog.at_level("WARNING"):
        assert validation_size(s, 50) == 10
    assert "50 examples, too few" in caplog.text and "10 examples (20%)" in caplog.text
    assert validation_size(s, 3) == 1
    with pytest.raises(ValueError, match="need at least two"):
        validation_size(s, 1)
