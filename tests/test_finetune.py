"""Smoke runs of the main job on a tiny model (the real default run lives in bench/)."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from emloc_kernels import cli
from emloc_kernels.recipe import demo
from emloc_kernels.recipe.finetune import TRANSFERS, anchor_rounds, batch_schedule, refined_variant, rows_of
from emloc_kernels.recipe.task import LabelTask, accuracy, read_jsonl


@pytest.fixture(scope="module")
def material(tmp_path_factory, save_tiny_llama):
    """A tiny random Llama with SmolLM2's tokenizer, and a small slice of Rotten Tomatoes
    (skipped when the demo material is not installed)."""
    root = tmp_path_factory.mktemp("material")
    save_tiny_llama(root / "model")
    try:
        train, test = demo.rotten_tomatoes()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    for name, rows in (("train", train[:48]), ("test", test[:16])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def run(material, out, *extra, model="model", build=("--distill-steps", "2")):
    cli.main(
        [
            "finetune",
            "--model",
            str(material / model),
            "--data",
            str(material / "train.jsonl"),
            "--eval-data",
            str(material / "test.jsonl"),
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--calibration-samples",
            "8",
            *build,
            "--validation-samples",
            "12",
            "--out",
            str(out),
            "--no-progress",
            *extra,
        ]
    )
    return json.loads((out / "report.json").read_text())


def test_finetune_smoke_writes_report_and_adapters(material, tmp_path, capsys, recwarn):
    report = run(material, tmp_path / "run", "--transfer", "auto")
    assert not [w for w in recwarn if "is_gradient_checkpointing" in str(w.message)]  # PEFT's, not the user's
    tok = AutoTokenizer.from_pretrained(material / "model")
    table = capsys.readouterr().out
    assert "original, zero-shot" in table and "← delivered" in table and "peak memory" in table
    # the peaks hold at least the weights that were loaded after the baseline
    assert report["peak_mem_inference"] >= report["bytes"]["original_total"]
    assert report["peak_mem_finetune"] >= report["bytes"]["emulator_total"]
    assert set(report["variants"]) == set(TRANSFERS) | {refined_variant(1)}  # refined by default: label data
    assert report["corrected"] == report["variants"][report["chosen"]]["test"]
    best = max(v["validation"] for v in report["variants"].values())
    assert report["variants"][report["chosen"]]["validation"] == best
    for d in (
        "emulator",
        "adapter",
        "corrected-L1",
        "corrected-L3",
        "corrected-unclamped",
        "aware-1",
        "stream-0",
        "stream-0.5",
        "refined-top1",
    ):
        assert (tmp_path / "run" / d).is_dir()
        # every model and adapter directory carries the original's tokenizer
        assert AutoTokenizer.from_pretrained(tmp_path / "run" / d)("a film")["input_ids"] == tok("a film")["input_ids"]
    adapter_config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(material / "model")  # the original, not the emulator
    # the reported accuracies are those of the models as saved, recomputed here
    original = AutoModelForCausalLM.from_pretrained(material / "model")
    test_rows = read_jsonl(material / "test.jsonl", "test")
    task = LabelTask.create(
        AutoTokenizer.from_pretrained(material / "model"), demo.PROMPT, [r["label"] for r in test_rows]
    )
    assert accuracy(original, task, test_rows) == report["zero_shot"]
    delivered = PeftModel.from_pretrained(original, tmp_path / "run" / report["delivered_adapter"])
    assert accuracy(delivered, task, test_rows) == report["corrected"]


def test_same_seed_same_numbers(material, tmp_path):
    a = run(material, tmp_path / "a", "--clamp", "3")
    b = run(material, tmp_path / "b", "--clamp", "3")
    assert a["losses"] == b["losses"]
    assert [a[k] for k in ("zero_shot", "emulator", "uncorrected", "corrected")] == [
        b[k] for k in ("zero_shot", "emulator", "uncorrected", "corrected")
    ]
    assert a["variants"] == b["variants"]
    assert set(a["variants"]) == {"L=3", refined_variant(1)}
    assert a["delivered_adapter"] == a["variants"][a["chosen"]]["dir"]
    corrected = load_file(tmp_path / "a" / "corrected-L3" / "adapter_model.safetensors")
    trained = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    assert any(not torch.equal(corrected[k], trained[k]) for k in trained if "lora_B" in k)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--clamp", "sometimes"], r"clamp\) must be one of"),
        (["--transfer", "stream:2"], "0 ≤ λ ≤ 1"),
        (["--prompt", "no placeholder"], "placeholder"),
        (["--ratio", "1.5"], "ratio"),
        (
            ["--dense-top-blocks", "1"],
            r"--dense-top-blocks must be less than --ratio × the model's blocks \(0.4 × 2 = 0.8\), got 1",
        ),
        (["--baseline-top-blocks", "3"], "--baseline-top-blocks must be at most the model's 2 blocks, got 3"),
        (["--baseline-top-blocks", "0"], "--baseline-top-blocks must be an integer from 1"),
        (["--refine-top-blocks", "3"], "--refine-top-blocks must be at most the model's 2 blocks, got 3"),
        (["--refine-top-blocks", "-1"], "--refine-top-blocks must be an integer from 0"),
    ],
)
def test_bad_options_exit_with_a_clear_message(material, tmp_path, extra, message):
    with pytest.raises(SystemExit, match=message):
        run(material, tmp_path / "bad", *extra)
    assert not (tmp_path / "bad").exists()


def test_existing_out_dir_is_refused(material, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("user file")
    with pytest.raises(SystemExit, match="exists"):
        run(material, tmp_path / "mine")
    assert (tmp_path / "mine" / "keep.txt").read_text() == "user file"


def test_data_without_eval_data_is_refused(material, tmp_path):
    with pytest.raises(SystemExit, match="eval-data"):
        cli.main(
            [
                "finetune",
                "--model",
                str(material / "model"),
                "--data",
                str(material / "train.jsonl"),
                "--out",
                str(tmp_path / "x"),
            ]
        )


def test_upper_bound_and_build_options_reach_the_report(material, tmp_path):
    report = run(
        material,
        tmp_path / "ub",
        "--clamp",
        "uncorrected",
        "--upper-bound",
        "--propagate",
        "--shrinkage",
        "auto",
        "--allocate",
        "block",
        "--anchor-rounds",
        "2",
        "--baseline-top-blocks",
        "1",
    )
    gain = report["lora_original"] - report["zero_shot"]
    if gain != 0:
        assert report["recovery"] == pytest.approx((report["corrected"] - report["zero_shot"]) / gain)
    assert "train_original" in report["timings_s"]
    # the baseline: LoRA on the original's last block, trained and measured like the others
    assert 0 <= report["lora_top_blocks"] <= 1 and "train_top_blocks" in report["timings_s"]
    assert 0 < report["memory"]["finetune_top_blocks"]
    table = (tmp_path / "ub" / "table.md").read_text()
    assert "original + LoRA on its last 1 block only (baseline)" in table
    assert "| original, LoRA on its last 1 block |" in table
    meta = json.loads((tmp_path / "ub" / "emulator" / "emloc.json").read_text())
    build = {k: meta["build"][k] for k in ("propagate", "shrinkage", "allocate", "reserve_rank")}
    assert build == {"propagate": True, "shrinkage": "auto", "allocate": "block", "reserve_rank": 8}
    assert meta["build"]["distill"]["steps"] == 2  # the default distillation, shortened by run()
    assert all(m["heldout_error"] is not None for m in meta["modules"].values())
    assert report["settings"]["upper_bound"] is True
    # anchored by default on label data, here in two rounds: the file holds the first round's anchor
    assert report["settings"]["anchor"] is True and "anchor_original" in report["timings_s"]
    assert report["settings"]["anchor_rounds"] == 2 and len(report["losses"]) == 3
    states = torch.load(tmp_path / "ub" / "anchor_original.pt")  # the original's, one row per example trained on
    assert states.shape == (len(rows_of(anchor_rounds(batch_schedule(36, 3, 4, 0), 2)[0])), 64)
    with pytest.raises(SystemExit, match="--anchor-rounds 2: rounds of anchored training need --anchor"):
        run(material, tmp_path / "no", "--anchor-rounds", "2", "--no-anchor")


def test_refinement_on_the_top_blocks_trains_only_them(material, tmp_path):
    """--refine-top-blocks 1: the chosen adapter trains further on the original's last block
    only (the block below keeps its LoRA as transferred); a variant chosen on validation like
    the others, with its own peak memory, which the fine-tuning peak covers."""
    report = run(material, tmp_path / "rf", "--clamp", "uncorrected", "--refine-top-blocks", "1")
    name = "refined on the last 1 block"
    assert set(report["variants"]) == {"uncorrected", name}
    assert report["variants"][name]["dir"] == "refined-top1"
    best = max(report["variants"], key=lambda n: report["variants"][n]["validation"])
    assert report["variants"][report["chosen"]]["validation"] == report["variants"][best]["validation"]
    refined = load_file(tmp_path / "rf" / "refined-top1" / "adapter_model.safetensors")
    trained = load_file(tmp_path / "rf" / "adapter" / "adapter_model.safetensors")
    assert set(refined) == set(trained)
    below, top = [k for k in trained if ".layers.0." in k], [k for k in trained if ".layers.1." in k]
    assert below and top
    assert all(torch.equal(refined[k], trained[k]) for k in below)
    assert any(not torch.equal(refined[k], trained[k]) for k in top)
    assert 0 < report["memory"]["finetune_refine"] <= report["peak_mem_finetune"]
    assert report["peak_mem_finetune"] == max(report["memory"]["finetune"], report["memory"]["finetune_refine"])
    assert "refine_top_blocks" in report["timings_s"]
    table = (tmp_path / "rf" / "table.md").read_text()
    assert "original + adapter refined on the last 1 block" in table
    assert "| original + adapter, refined on its last 1 block |" in table


def test_distilled_quantised_emulator_keeps_the_ranks_of_the_plain_build(material, tmp_path):
    run(material, tmp_path / "plain", "--clamp", "uncorrected", "--allocate", "uniform")
    run(
        material,
        tmp_path / "distilled",
        "--clamp",
        "uncorrected",
        "--allocate",
        "uniform",
        "--distill-steps",
        "3",
        "--distill-rank",
        "2",
        "--distill-lr",
        "0.003",
        "--quant",
        "int8",
        "--no-anchor",
    )
    plain, distilled = (
        json.loads((tmp_path / d / "emulator" / "emloc.json").read_text()) for d in ("plain", "distilled")
    )
    assert distilled["build"]["reserve_rank"] == 2 and distilled["build"]["distill"]["steps"] == 3
    assert distilled["build"]["distill"]["lr"] == 0.003
    assert {n: m["rank"] for n, m in distilled["modules"].items()} == {
        n: m["rank"] for n, m in plain["modules"].items()
    }
    assert {m["quant"] for m in distilled["modules"].values()} == {"int8"}
    report = json.loads((tmp_path / "distilled" / "report.json").read_text())
    assert report["settings"]["anchor"] is False and "anchor_original" not in report["timings_s"]
    assert not (tmp_path / "distilled" / "anchor_original.pt").exists()


def test_dense_top_blocks_keep_the_last_block_and_its_adapter_through_the_corrections(material, tmp_path):
    report = run(material, tmp_path / "dense", "--ratio", "0.6", "--dense-top-blocks", "1")
    meta = json.loads((tmp_path / "dense" / "emulator" / "emloc.json").read_text())
    assert meta["modules"] and all(n.startswith("model.layers.0.") for n in meta["modules"])
    assert [m["ratio"] for m in meta["modules"].values()] == [pytest.approx(0.2)] * 7  # 2 × 0.6 − 1
    b = report["bytes"]  # the dense block counts at its stored size: fp32, twice its fp16 bytes
    assert b["original_linears_fp16"] == 2 * sum(
        2 * m["in_features"] * m["out_features"] for m in meta["modules"].values()
    )
    assert 0.5 * 2 < (b["emulator_linears"] / b["original_linears_fp16"]) / 0.6 <= 2
    # every transfer keeps the trained LoRA of the dense block as it is (the emulator is exact there)
    trained = load_file(tmp_path / "dense" / "adapter" / "adapter_model.safetensors")
    assert any("layers.1." in k for k in trained)
    corrected = sorted((tmp_path / "dense").glob("corrected-*"))
    assert [d.name for d in corrected] == ["corrected-L1", "corrected-L3", "corrected-unclamped"]
    for directory in corrected:
        weights = load_file(directory / "adapter_model.safetensors")
        assert all(torch.equal(weights[k], trained[k]) for k in trained if "layers.1." in k), directory.name
    assert report["settings"]["dense_top_blocks"] == 1


def test_interrupted_run_resumes_at_the_first_unfinished_stage(material, tmp_path, monkeypatch):
    from emloc_kernels.recipe import finetune

    reference = run(material, tmp_path / "reference")
    real_peak = finetune.peak_in_fresh_process

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands for a kill in the memory stage

    monkeypatch.setattr(finetune, "peak_in_fresh_process", killed)
    with pytest.raises(SystemExit, match="130"):  # the CLI's exit on an interrupt
        run(material, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    kept = json.loads((tmp_path / ".run.partial" / "stages.json").read_text())
    assert {"eval_zero_shot", "build_emulator", "train", "evaluate_variants"} <= set(kept)

    calls = []
    monkeypatch.setattr(finetune, "peak_in_fresh_process", real_peak)
    for name in ("build_emulator", "train_as_set"):
        real = getattr(finetune, name)
        monkeypatch.setattr(
            finetune, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k)
        )
    report = run(material, tmp_path / "run")
    assert calls == []  # neither the emulator nor the LoRA was made again
    for key in ("accuracy", "losses", "variants", "chosen", "bytes"):
        assert report[key] == reference[key], key
    assert not (tmp_path / ".run.partial").exists()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted(
        p.name for p in (tmp_path / "reference").iterdir()
    )


def test_a_given_emulator_is_fine_tuned_on_and_must_come_from_the_model(material, tmp_path, save_tiny_llama):
    built = run(material, tmp_path / "built", "--clamp", "uncorrected")
    emulator = str(tmp_path / "built" / "emulator")
    given = run(material, tmp_path / "given", "--clamp", "uncorrected", "--emulator", emulator, build=())
    # the same emulator, seed and data: the same training and scores as the run that built it
    for key in ("emulator", "uncorrected", "losses", "bytes", "emulator_build"):
        assert given[key] == built[key], key
    assert given["emulator_build"]["build"]["distill"]["steps"] == 2
    assert "build_emulator" in given["timings_s"] and given["settings"]["emulator"] == emulator
    assert given["settings"]["ratio"] is None and given["settings"]["distill_steps"] is None  # not used
    assert (
        json.loads((tmp_path / "given" / "emulator" / "emloc.json").read_text())["modules"]
        == json.loads((tmp_path / "built" / "emulator" / "emloc.json").read_text())["modules"]
    )

    save_tiny_llama(material / "other", initializer_range=0.05)  # same shapes, other weights
    with pytest.raises(SystemExit, match="--emulator .*: the original is not the model the emulator was built from"):
        run(material, tmp_path / "other", "--emulator", emulator, model="other", build=())
    with pytest.raises(SystemExit, match="--ratio, --distill-steps: options of the emulator's build"):
        run(material, tmp_path / "ratio", "--emulator", emulator, "--ratio", "0.3")
    with pytest.raises(SystemExit, match="not an emulator directory"):
        run(material, tmp_path / "plain", "--emulator", str(material / "model"), build=())
    assert not any((tmp_path / d).exists() for d in ("other", "ratio", "plain"))
