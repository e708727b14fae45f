"""The emulator as a transformers quantization method (``emloc_kernels.emulator.hf``):
``from_pretrained`` of an emulator directory, ``save_pretrained`` round trips, building on
load, the loud failure without the package, and the tokenizer in every written directory."""

import hashlib
import json
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from emloc_kernels import (
    EmlocConfig,
    add_lora,
    build_emulator,
    correct_adapter,
    load_emulator,
    save_emulator,
    save_lora,
)
from emloc_kernels.conventions import load_model
from emloc_kernels.emulator import hf
from emloc_kernels.files import TOKENIZER_FILES
from emloc_kernels.modules import LowRankLinear, QuantLowRankLinear
from emloc_kernels.transfer import correct_adapter_aware, transfer_adapter

RATIO = 0.4
TEXTS = [
    "The film is a quiet triumph of patience and craft.",
    "A tedious, overlong mess that never finds its footing.",
    "Funny, warm and surprisingly sharp about families.",
    "The plot twists arrive on schedule and land with a thud.",
    "An actor at the top of his game carries a thin script.",
    "Gorgeous to look at, empty to think about.",
    "It starts slow but the final act is genuinely moving.",
    "A sequel nobody asked for, made with nobody in mind.",
    "Every frame is packed with jokes that mostly work.",
    "The documentary asks hard questions and answers few.",
    "Charming leads cannot rescue a script this lazy.",
    "A small, honest story told with real affection.",
    "The soundtrack does more work than the screenplay.",
    "By the end I cared about every one of these people.",
]
QUANTS = [None, "int8", "int4"]  # int4 with group size 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, smollm2_dir):
    """A tiny random Llama (hidden 64, two blocks) with SmolLM2's tokenizer, saved as a
    transformers directory with tokenizer files and generation_config.json."""
    import transformers
    from conftest import TINY  # the shared tiny configs

    root = tmp_path_factory.mktemp("hf") / "model"
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    config_cls, _, kwargs = TINY["llama"]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**kwargs, "vocab_size": len(tok)})
    LlamaForCausalLM(config).eval().save_pretrained(root)
    tok.save_pretrained(root)
    return root


def fresh(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir)


def emulate(model_dir, quant=None):
    tok = AutoTokenizer.from_pretrained(model_dir)
    return build_emulator(fresh(model_dir), TEXTS, RATIO, tokenizer=tok, quant=quant, group_size=64, progress=False)


def ids(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok(["A film about a dog.", "Not my kind of movie at all."], return_tensors="pt", padding=True)


@torch.no_grad()
def logits(model, batch):
    return model(**batch).logits


def layers(model):
    return {name: type(m) for name, m in model.named_modules()}


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- loading an emulator directory


@pytest.mark.parametrize("quant", QUANTS)
def test_from_pretrained_is_the_emulator(model_dir, tmp_path, quant):
    emulator = emulate(model_dir, quant)
    save_emulator(emulator, tmp_path / "emu")
    config = json.loads((tmp_path / "emu" / "config.json").read_text())
    metadata = json.loads((tmp_path / "emu" / "emloc.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "emloc",
        **{k: metadata[k] for k in metadata if k != "files"},
    }

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "emu")
    reference = load_emulator(tmp_path / "emu")
    assert layers(loaded) == layers(emulator) == layers(reference)
    kind = QuantLowRankLinear if quant else LowRankLinear
    assert isinstance(loaded.get_submodule("model.layers.1.mlp.down_proj"), kind)
    batch = ids(model_dir)
    out = logits(loaded, batch)
    assert torch.equal(out, logits(reference, batch))
    assert torch.equal(out, logits(emulator, batch))
    assert same_state(loaded, emulator)
    assert loaded.emloc_metadata == emulator.emloc_metadata
    assert isinstance(loaded.config.quantization_config, EmlocConfig)
    # the factors stay frozen (transformers' loader makes every float tensor trainable)
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if n.endswith((".u", ".v")))


@pytest.mark.parametrize("quant", QUANTS)
def test_from_pretrained_with_dtype_and_device_map(model_dir, tmp_path, quant):
    save_emulator(emulate(model_dir, quant), tmp_path / "emu")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "emu", dtype=torch.bfloat16, device_map="cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    down = loaded.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(down, QuantLowRankLinear if quant else LowRankLinear)
    if quant:
        assert down.u_scale.dtype == torch.bfloat16 and down.u_qweight.dtype in (torch.int8, torch.uint8)
    # the same tensors as the fp32 emulator cast (the rotary buffers of the two differ, as for a dense model)
    assert same_state(loaded, load_emulator(tmp_path / "emu").to(torch.bfloat16))
    assert logits(loaded, ids(model_dir)).dtype == torch.bfloat16


def test_save_pretrained_round_trips(model_dir, tmp_path):
    built = emulate(model_dir, "int4")
    built.save_pretrained(tmp_path / "build_emulator")  # straight from build_emulator, before save_emulator
    save_emulator(built, tmp_path / "emu")
    batch = ids(model_dir)
    expected = logits(built, batch)
    AutoModelForCausalLM.from_pretrained(tmp_path / "emu").save_pretrained(tmp_path / "from_pretrained")
    load_emulator(tmp_path / "emu").save_pretrained(tmp_path / "load_emulator")
    for name in ("build_emulator", "from_pretrained", "load_emulator"):
        again = AutoModelForCausalLM.from_pretrained(tmp_path / name)
        assert layers(again) == layers(built), name
        assert torch.equal(logits(again, batch), expected), name
        assert again.emloc_metadata == built.emloc_metadata, name
        # load_emulator takes a directory save_pretrained wrote (no emloc.json) as well
        assert torch.equal(logits(load_emulator(tmp_path / name), batch), expected), name
        # and the copy round-trips again
        again.save_pretrained(tmp_path / f"{name}-2")
        assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / f"{name}-2"), batch), expected)


def test_emulator_directory_of_the_earlier_format_still_loads(model_dir, tmp_path):
    """Written before config.json carried the quantization config (and without the empty weights)."""
    emulator = emulate(model_dir)
    save_emulator(emulator, tmp_path / "emu")
    config_file, metadata_file = tmp_path / "emu" / "config.json", tmp_path / "emu" / "emloc.json"
    config = json.loads(config_file.read_text())
    del config["quantization_config"]
    config_file.write_text(json.dumps(config))
    weights = tmp_path / "emu" / "model.safetensors"
    state = {k: v for k, v in safetensors.torch.load_file(weights).items() if v.numel()}
    safetensors.torch.save_file(state, weights, metadata={"format": "pt"})
    metadata = json.loads(metadata_file.read_text())
    metadata["files"] = {"model.safetensors": hashlib.sha256(weights.read_bytes()).hexdigest()}
    metadata_file.write_text(json.dumps(metadata))
    loaded = load_emulator(tmp_path / "emu")
    batch = ids(model_dir)
    assert layers(loaded) == layers(emulator)
    assert torch.equal(logits(loaded, batch), logits(emulator, batch))


def test_packed_tensors_of_another_dtype_are_refused(model_dir, tmp_path):
    save_emulator(emulate(model_dir, "int8"), tmp_path / "emu")
    weights = tmp_path / "emu" / "model.safetensors"
    state = safetensors.torch.load_file(weights)
    key = "model.layers.0.mlp.up_proj.u_qweight"
    state[key] = state[key].view(torch.uint8)  # the bytes of int8 codes taken for uint8 ones
    safetensors.torch.save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="u_qweight: this int8 layer stores torch.int8"):
        load_emulator(tmp_path / "emu", verify=False)


def test_an_emulator_config_on_a_dense_checkpoint_is_refused(model_dir, tmp_path):
    config = EmlocConfig.from_metadata(emulate(model_dir).emloc_metadata)
    with pytest.raises(ValueError, match="the checkpoint has no tensors for .* low-rank layers"):
        AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config)


def test_lora_on_a_loaded_emulator_trains_only_the_lora(model_dir, tmp_path):
    save_emulator(emulate(model_dir, "int8"), tmp_path / "emu")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "emu")
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules="all-linear"))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    batch = ids(model_dir)
    peft_model(**batch, labels=batch["input_ids"]).loss.backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if p.requires_grad)


def test_trl_sft_trainer_takes_an_emulator_directory(model_dir, tmp_path):
    """TRL's SFTTrainer given the emulator *directory* (model and tokenizer by path) and a LoRA
    config trains the LoRA on the int4 emulator: the loss falls, the factors stay as they were,
    and the adapter it saves is corrected for the original like any other."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    save_emulator(emulate(model_dir, "int4"), tmp_path / "emu")
    args = SFTConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=6,
        per_device_train_batch_size=7,
        learning_rate=2e-2,
        logging_steps=1,
        max_length=32,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
    )
    trainer = SFTTrainer(
        model=str(tmp_path / "emu"),
        args=args,
        train_dataset=Dataset.from_dict({"text": TEXTS}),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    model = trainer.model
    assert isinstance(
        model.get_submodule("base_model.model.model.layers.1.mlp.down_proj").base_layer, QuantLowRankLinear
    )
    frozen = {n: t.clone() for n, t in model.state_dict().items() if "lora_" not in n}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1  # 10.81 → 10.49 after 6 steps (tiny random model)
    assert all(torch.equal(t, model.state_dict()[n]) for n, t in frozen.items())
    trainer.save_model(str(tmp_path / "adapter"))
    report = correct_adapter(tmp_path / "adapter", tmp_path / "emu", model_dir, tmp_path / "corrected", progress=False)
    assert report["modules"]


# ---------------------------------------------------------------- without emloc_kernels


def test_without_the_package_loading_fails_loudly(model_dir, tmp_path):
    save_emulator(emulate(model_dir), tmp_path / "emu")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["emloc_kernels"] = None  # as if it were not installed
        try:
            import emloc_kernels
        except ImportError:
            pass
        else:
            raise SystemExit("emloc_kernels is importable")
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained({str(tmp_path / "emu")!r})
        print("LOADED")
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    output = run.stdout + run.stderr
    assert run.returncode != 0 and "LOADED" not in output, output[-3000:]
    assert "ignore_mismatched_sizes" in output  # transformers' own error
    assert "emloc_kernels is needed" in output  # the load report right above it names the package
    assert "Unknown quantization type, got emloc" in output


# ---------------------------------------------------------------- building on load


@pytest.mark.parametrize("quant", QUANTS)
def test_build_on_load_equals_build_emulator(model_dir, tmp_path, quant):
    config = EmlocConfig(ratio=RATIO, dataset=TEXTS, quant=quant, group_size=64, progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config)
    built = emulate(model_dir, quant)
    assert layers(loaded) == layers(built)
    assert same_state(loaded, built)  # bit for bit
    assert loaded.emloc_metadata == built.emloc_metadata
    batch = ids(model_dir)
    assert torch.equal(logits(loaded, batch), logits(built, batch))
    # the config now describes the built emulator (no calibration texts in config.json)
    saved = loaded.config.quantization_config
    assert saved.built and "dataset" not in saved.to_dict()
    loaded.save_pretrained(tmp_path / "saved")
    assert "dataset" not in json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "saved"), batch), logits(built, batch))


def test_build_on_load_with_token_tensors_and_a_given_tokenizer(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    tensors = [tok(t, return_tensors="pt")["input_ids"] for t in TEXTS]
    by_tensors = AutoModelForCausalLM.from_pretrained(  # a generator is read once, into the config
        model_dir, quantization_config=EmlocConfig(ratio=RATIO, dataset=iter(tensors), progress=False)
    )
    by_object = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=EmlocConfig(ratio=RATIO, dataset=TEXTS, tokenizer=tok, progress=False)
    )
    reference = build_emulator(fresh(model_dir), tensors, RATIO, progress=False)
    assert same_state(by_tensors, reference)
    assert by_object.emloc_metadata["modules"].keys() == reference.emloc_metadata["modules"].keys()


def test_config_needs_ratio_and_data_or_modules():
    with pytest.raises(ValueError, match="needs ratio= and dataset="):
        EmlocConfig(ratio=RATIO)
    with pytest.raises(ValueError, match="quant must be one of"):
        EmlocConfig(ratio=RATIO, dataset=TEXTS, quant="int3")
    with pytest.raises(TypeError, match="unexpected arguments"):
        EmlocConfig(ratio=RATIO, dataset=TEXTS, rank=3)


# ---------------------------------------------------------------- registration


def test_registration_leaves_other_models_alone(model_dir, tmp_path):
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    assert AUTO_QUANTIZATION_CONFIG_MAPPING["emloc"] is EmlocConfig
    assert AUTO_QUANTIZER_MAPPING["emloc"] is hf.EmlocHfQuantizer
    hf.register()  # a second time: nothing changes, nothing raises
    dense = fresh(model_dir)
    assert getattr(dense, "hf_quantizer", None) is None
    assert not any(isinstance(m, LowRankLinear) for m in dense.modules())
    assert getattr(AutoConfig.from_pretrained(model_dir), "quantization_config", None) is None


def test_an_emulator_directory_is_refused_where_the_original_is_expected(model_dir, tmp_path):
    emulate(model_dir).save_pretrained(tmp_path / "emu")  # no emloc.json, only the quantization config
    with pytest.raises(ValueError, match="is an emulator"):
        load_model(tmp_path / "emu")


# ---------------------------------------------------------------- tokenizers in written directories


def assert_tokenizer(directory, model_dir):
    names = {p.name for p in directory.iterdir()}
    assert "generation_config.json" in names
    assert names & set(TOKENIZER_FILES)
    text = "Movie review: a film about a dog."
    assert AutoTokenizer.from_pretrained(directory)(text) == AutoTokenizer.from_pretrained(model_dir)(text)


def test_written_directories_carry_the_tokenizer(model_dir, tmp_path):
    from emloc_kernels import cli

    emulator = emulate(model_dir)
    save_emulator(emulator, tmp_path / "emu")
    assert_tokenizer(tmp_path / "emu", model_dir)
    peft_model = get_peft_model(emulator, LoraConfig(r=4, lora_alpha=4, target_modules="all-linear"))
    torch.manual_seed(0)
    for _, p in peft_model.named_parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.02)
    peft_model.save_pretrained(tmp_path / "adapter")
    correct_adapter(tmp_path / "adapter", tmp_path / "emu", model_dir, tmp_path / "corrected", progress=False)
    assert_tokenizer(tmp_path / "corrected", model_dir)
    original = fresh(model_dir)
    for fn, out in ((correct_adapter_aware, "aware"), (transfer_adapter, "stream")):
        fn(
            tmp_path / "adapter",
            tmp_path / "emu",
            original,
            TEXTS[:4],
            tmp_path / out,
            tokenizer=AutoTokenizer.from_pretrained(model_dir),
            progress=False,
        )
        assert_tokenizer(tmp_path / out, model_dir)
    cli.main(["merge", str(tmp_path / "corrected"), "--original", str(model_dir), "--out", str(tmp_path / "merged")])
    assert_tokenizer(tmp_path / "merged", model_dir)
    save_lora(add_lora(emulate(model_dir), r=4, alpha=4, targets=["q_proj"]), tmp_path / "lora")
    assert_tokenizer(tmp_path / "lora", model_dir)


def test_no_tokenizer_to_copy_from_a_hub_name_or_a_model(tmp_path):
    from emloc_kernels.files import copy_tokenizer

    tmp_path.joinpath("out").mkdir()
    assert copy_tokenizer("HuggingFaceTB/SmolLM2-135M", tmp_path / "out") == []
    assert copy_tokenizer(torch.nn.Linear(2, 2), tmp_path / "out") == []
    assert copy_tokenizer("", tmp_path / "out") == []


def test_build_on_load_distils(model_dir, tmp_path):
    """EmlocConfig(distill_steps=...): the distilled emulator of build_emulator(distill=...)."""
    from emloc_kernels.emulator.distill import Distillation

    config = EmlocConfig(ratio=RATIO, dataset=TEXTS, distill_steps=2, distill_rank=2, distill_lr=3e-3, progress=False)
    loaded = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=config)
    tok = AutoTokenizer.from_pretrained(model_dir)
    distill = Distillation(2, 2, lr=3e-3)
    built = build_emulator(fresh(model_dir), TEXTS, RATIO, tokenizer=tok, distill=distill, progress=False)
    assert loaded.emloc_metadata["build"]["distill"]["steps"] == 2
    assert loaded.emloc_metadata["build"]["distill"]["lr"] == 3e-3
    assert same_state(loaded, built)
    loaded.save_pretrained(tmp_path / "saved")
    batch = ids(model_dir)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "saved"), batch), logits(built, batch))
