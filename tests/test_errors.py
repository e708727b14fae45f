"""Hostile inputs get a one-line error naming the argument, what was wrong and what is allowed
(``emloc <command>: error: ...`` on the command line, a ``ValueError`` in the library), never a
traceback from deep inside torch, transformers or PEFT; property tests over the argument
parsing and the JSONL readers."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from emloc_kernels import LowRankLinear, build_emulator, cli
from emloc_kernels.correction import merge_adapter
from emloc_kernels.datafiles import read_text_lines
from emloc_kernels.emulator.build import check_modules, select_modules
from emloc_kernels.emulator.calibration import find_blocks
from emloc_kernels.recipe.finetune import FinetuneSettings, calibration_texts, transfer_variants
from emloc_kernels.recipe.models import check_model_source
from emloc_kernels.recipe.task import LabelTask, fill_prompt, read_jsonl
from emloc_kernels.transfer import collect_grams

WORDS = ["<unk>", "<s>", "</s>", "positive", "negative", "good", "bad", "film", "review", "{", "}", '"', ":", "a", "1"]
LLAMA = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=len(WORDS),
    max_position_embeddings=64,
    bos_token_id=1,
    eos_token_id=2,
)
GPT2 = dict(
    n_embd=32, n_layer=2, n_head=4, n_inner=48, vocab_size=len(WORDS), n_positions=16, bos_token_id=1, eos_token_id=2
)


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``WORDS`` (no download, no demo material)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**LLAMA, **overrides})).eval()


def tokens(n: int = 2, length: int = 9, vocab: int = len(WORDS)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, vocab, (1, length), generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama with its tokenizer, saved as a transformers directory."""
    root = tmp_path_factory.mktemp("model")
    llama().save_pretrained(root)
    tokenizer().save_pretrained(root)
    return root


def exits(argv: list[str], match: str) -> str:
    """``emloc argv`` exits with a one-line ``emloc <command>: error: ...`` matching ``match``."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    message = str(info.value.code)
    assert message.startswith(f"emloc {argv[0]}: error: ") and len(message.splitlines()) == 1, message
    assert re.search(match, message), message
    return message


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))
    return path


# ---------------------------------------------------------------- 1. --ratio


@pytest.mark.parametrize(
    "text, match",
    [
        ("q_proj=0.3,q_proj", r"--ratio pair 'q_proj' has no '='"),
        ("q_proj=0.3,,v_proj=0.2", r"--ratio pair '' has no '='"),
        ("(=0.3", r"--ratio pattern '\(' is not a valid regular expression"),
        ("abc", r"--ratio must be a number in \(0, 1\) or regex=ratio pairs"),
        ("q_proj=x", r"--ratio of 'q_proj' must be a number"),
        ("1.5", r"--ratio must be in \(0, 1\)"),
        ("nan", r"--ratio must be in \(0, 1\)"),
        ("q_proj=0.3,q_proj=0.4", "twice"),
    ],
)
def test_bad_ratio_text(text, match):
    with pytest.raises(ValueError, match=match):
        cli._ratio(text)


def test_ratio_text_forms():
    assert cli._ratio("0.4") == 0.4
    assert cli._ratio("mlp=0.3,self_attn=0.5") == {"mlp": 0.3, "self_attn": 0.5}
    assert cli._ratio("layers\\.[01]\\..*=0.25") == {"layers\\.[01]\\..*": 0.25}


def test_bad_ratio_on_the_command_line(model_dir, tmp_path):
    data = write(tmp_path / "data.txt", "good film\n")
    exits(["build", str(model_dir), "--data", str(data), "--ratio", "(=0.3", "--out", str(tmp_path / "e")], "regular")
    exits(["build", str(model_dir), "--data", str(data), "--ratio", "q_proj", "--out", str(tmp_path / "e")], "ratio")
    # a ratio that rounds to rank 0 is refused, naming the module and the smallest ratio that works
    exits(
        ["build", str(model_dir), "--data", str(data), "--ratio", "1e-9", "--out", str(tmp_path / "e")],
        r"ratio 1e-09 keeps less than one rank of model\.layers\.0\.self_attn\.q_proj .*at least 0\.0",
    )
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("kwargs", [dict(ratio={"(": 0.3}), dict(ratio=0.4, targets="q_proj|(")])
def test_invalid_regex_in_the_library(kwargs):
    model = llama()
    with pytest.raises(ValueError, match=r"pattern '.*\(' is not a valid regular expression"):
        build_emulator(model, tokens(), progress=False, **kwargs)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_ratio_below_rank_one_is_refused_with_the_smallest_that_works():
    model = llama()
    with pytest.raises(ValueError, match=r"ratio 1e-09 keeps less than one rank of .*q_proj \(and \d+ other") as info:
        build_emulator(model, tokens(), 1e-9, progress=False)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    smallest = float(re.search(r"at least ([0-9.e-]+)$", str(info.value)).group(1))
    blocks_name, blocks = find_blocks(model)
    check_modules(select_modules(blocks_name, blocks, smallest, None))  # every linear keeps rank 1
    with pytest.raises(ValueError, match="less than one rank"):
        check_modules(select_modules(blocks_name, blocks, smallest * 0.99, None))


# ---------------------------------------------------------------- 2, 3. JSONL rows


BAD_ROWS = [
    ('{"label": "good"}', 'has no field "text"'),
    ('{"text": 3, "label": "good"}', 'field "text" must be a string, got 3'),
    ('{"text": null, "label": "good"}', 'field "text" must be a string, got null'),
    ('["good film"]', "must be a JSON object"),
    ('{"text": "good film"', "is not JSON"),
]


@pytest.mark.parametrize("row, match", BAD_ROWS)
def test_bad_jsonl_row_for_build(model_dir, tmp_path, row, match):
    data = write(tmp_path / "data.jsonl", '{"text": "good film"}\n\n' + row + "\n")
    exits(
        ["build", str(model_dir), "--data", str(data), "--out", str(tmp_path / "e")],
        f"--data {re.escape(str(data))}:3 {re.escape(match)}",
    )


@pytest.mark.parametrize(
    "row, match",
    [*BAD_ROWS, ('{"text": "good film"}', 'has no field "label"'), ('{"text": "a", "label": 1}', 'field "label"')],
)
def test_bad_jsonl_row_for_finetune(tmp_path, row, match):
    data = write(tmp_path / "train.jsonl", '{"text": "good film", "label": "positive"}\n' + row + "\n")
    with pytest.raises(ValueError, match=f"--eval-data {re.escape(str(data))}:2 {re.escape(match)}"):
        read_jsonl(data, "--eval-data")


def test_line_separators_inside_json_strings_do_not_split_lines(tmp_path):
    texts = ["good\u2028film", "bad\u2029film\x85", "a\x0bb\x0cc"]  # str.splitlines splits at each of these
    rows = [{"text": t, "label": "positive"} for t in texts]
    body = "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows)  # and Windows line ends
    data = write(tmp_path / "data.jsonl", body)
    assert read_jsonl(data, "--data") == rows
    assert cli._texts(str(data), 10) == texts
    plain = write(tmp_path / "data.txt", "good\u2028film\nbad film\r\n\n")
    assert cli._texts(str(plain), 10) == ["good\u2028film", "bad film"]


def test_unreadable_data_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"--data .*nope\.jsonl does not exist"):
        cli._texts(str(tmp_path / "nope.jsonl"), 4)
    with pytest.raises(ValueError, match="is a directory"):
        read_text_lines(tmp_path, "--data")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:1 is not UTF-8"):
        cli._texts(str(tmp_path / "latin1.jsonl"), 4)


# ---------------------------------------------------------------- 4. missing model directory


def test_missing_model_is_named_not_looked_up(model_dir, tmp_path):
    data = write(tmp_path / "data.txt", "good film\n")
    out = ["--out", str(tmp_path / "e")]
    exits(["build", str(tmp_path / "nope"), "--data", str(data), *out], r"model .*nope: no such directory")
    # a Hub-shaped name that is not in the local cache is refused at once, not downloaded
    exits(["build", "no-such-org/no-such-model", "--data", str(data), *out], "nor a model in the local Hugging Face")
    exits(["finetune", "--model", str(tmp_path / "nope"), *out], r"--model .*nope: no such directory")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--model .*empty has no config.json"):
        check_model_source(tmp_path / "empty")
    with pytest.raises(ValueError, match="is a file"):
        check_model_source(data)
    assert check_model_source(model_dir) == str(model_dir)


def test_hub_id_in_the_local_cache_is_accepted(tmp_path, monkeypatch):
    import huggingface_hub.constants

    snapshot = tmp_path / "models--some-org--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--some-org--tiny" / "refs").mkdir()
    (tmp_path / "models--some-org--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # no local directory of that name
    assert check_model_source("some-org/tiny") == "some-org/tiny"
    with pytest.raises(FileNotFoundError, match="nor a model in the local Hugging Face cache"):
        check_model_source("some-org/other")


# ---------------------------------------------------------------- 5. NaN/inf weights


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_is_refused_before_any_decomposition(value):
    model = llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = value  # the last linear: its inputs are finite
    with pytest.raises(ValueError, match=r"the weight of model\.layers\.1\.mlp\.down_proj contains NaN or inf"):
        build_emulator(model, tokens(), 0.4, progress=False)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_non_finite_bias_is_refused():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**GPT2)).eval()
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.bias[0] = float("inf")
    with pytest.raises(ValueError, match=r"the bias of transformer\.h\.1\.mlp\.c_proj contains NaN or inf"):
        build_emulator(model, tokens(), 0.4, progress=False)


# ---------------------------------------------------------------- 6. merge with another model's adapter


def test_merge_refuses_an_adapter_of_another_model(tmp_path):
    peft_model = get_peft_model(llama(), LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    for name, other in (("wider", llama(hidden_size=48)), ("shorter", llama(num_hidden_layers=1))):
        other.save_pretrained(tmp_path / name)
    with pytest.raises(
        ValueError,
        match=r"does not fit the original: its LoRA for model\.layers\.0\.\S+ is out×in = \(64, \d+\), the original's linear is \(48, ",
    ):
        merge_adapter(llama(hidden_size=48), tmp_path / "adapter")
    exits(
        ["merge", str(tmp_path / "adapter"), "--original", str(tmp_path / "wider"), "--out", str(tmp_path / "m")],
        r"adapter .* does not fit the original: .*\(48, \d+\); was the adapter trained for another model",
    )
    exits(
        ["merge", str(tmp_path / "adapter"), "--original", str(tmp_path / "shorter"), "--out", str(tmp_path / "m")],
        r"targets model\.layers\.1\.\S+, which the original \(LlamaForCausalLM\) does not have",
    )
    (tmp_path / "empty").mkdir()
    exits(
        ["merge", str(tmp_path / "empty"), "--original", str(tmp_path / "wider"), "--out", str(tmp_path / "m")],
        "has no",
    )
    assert not (tmp_path / "m").exists()
    merged = merge_adapter(llama(), tmp_path / "adapter")  # its own model still merges
    assert not any("lora" in n for n, _ in merged.named_parameters())


# ---------------------------------------------------------------- 7. braces in --prompt


def test_prompt_braces_are_literal():
    prompt = '{"a": 1} review: {text} :'
    assert fill_prompt(prompt, "good {text} film") == '{"a": 1} review: good {text} film :'
    task = LabelTask.create(tokenizer(), prompt, ["positive", "negative"])
    batch = task.encode([{"text": "good film", "label": "positive"}])
    assert task.tokenizer.decode(batch["input_ids"][0]) == '{ " a " : 1 } review : good film :'
    s = FinetuneSettings(prompt=prompt, data="x", eval_data="y")
    assert calibration_texts(s, [{"text": "bad", "label": "negative"}]) == ['{"a": 1} review: bad : negative']
    with pytest.raises(ValueError, match=r"--prompt must contain the placeholder \{text\}"):
        FinetuneSettings(prompt='{"a": 1} no placeholder')
    with pytest.raises(ValueError, match=r"placeholder \{text\}"):
        LabelTask.create(tokenizer(), "{txt}", ["positive", "negative"])


# ---------------------------------------------------------------- 8. longer than the model's positions


def test_calibration_texts_are_truncated_to_the_positions_of_the_model():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**GPT2)).eval()  # 16 learned positions
    texts = ["good film " * 30, "bad film"]
    emulator = build_emulator(model, texts, 0.4, tokenizer=tokenizer(), progress=False, heldout=False)
    assert emulator.emloc_metadata["calibration"]["tokens"] == 16 + 2


def test_token_batches_longer_than_the_positions_are_refused():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**GPT2)).eval()
    with pytest.raises(ValueError, match="calibration batch 1 has sequences of 17 tokens; the model takes at most 16"):
        build_emulator(model, tokens(1, 16) + tokens(1, 17), 0.4, progress=False)


# ---------------------------------------------------------------- 9. token ids outside the vocabulary


@pytest.mark.parametrize("bad", [len(WORDS), -1, 10**6])
def test_out_of_vocabulary_token_ids_are_refused(bad):
    ids = tokens()
    ids[1][0, 4] = bad
    message = f"calibration batch 1 holds token id {bad}; token ids must be 0 to {len(WORDS) - 1}"
    with pytest.raises(ValueError, match=re.escape(message)):
        build_emulator(llama(), ids, 0.4, progress=False)
    with pytest.raises(ValueError, match=re.escape(message)):
        collect_grams(llama(), ids, progress=False)


def test_tokenizer_larger_than_the_vocabulary_and_float_ids():
    small = llama(vocab_size=5)
    with pytest.raises(ValueError, match=r"batch 0 \(tokenized texts\) holds token id \d+; token ids must be 0 to 4"):
        build_emulator(small, ["good film"], 0.4, tokenizer=tokenizer(), progress=False)
    with pytest.raises(ValueError, match="input_ids must be integer token ids, got dtype torch.float32"):
        build_emulator(llama(), [torch.ones(1, 5)], 0.4, progress=False)


# ---------------------------------------------------------------- 10. DoRA on an emulator


def test_dora_on_emulator_layers_is_refused():
    emulator = build_emulator(llama(), tokens(), 0.4, progress=False)
    with pytest.raises(ValueError, match=r"DoRA \(LoraConfig\(use_dora=True\)\) is not supported on emulator layers"):
        get_peft_model(emulator, LoraConfig(r=2, use_dora=True, target_modules=["q_proj"]))
    get_peft_model(llama(), LoraConfig(r=2, use_dora=True, target_modules=["q_proj"]))  # dense layers: PEFT's


# ---------------------------------------------------------------- properties


def one_line(e: BaseException) -> bool:
    return len(str(e).splitlines()) == 1


RATIO_ALPHABET = "0123456789.eE-+naif=,()[]{}*?|\\^$_qkvpromlp "
ratio_texts = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=RATIO_ALPHABET, max_size=30),
    st.lists(
        st.tuples(st.text(alphabet="()[]*?|._qkvo\\", max_size=6), st.floats(allow_nan=True)), min_size=1, max_size=4
    ).map(lambda pairs: ",".join(f"{p}={v!r}" for p, v in pairs)),
)


@settings(max_examples=200, deadline=None)
@given(ratio_texts)
def test_ratio_parser_gives_a_valid_ratio_or_a_one_line_value_error(text):
    try:
        ratio = cli._ratio(text)
    except ValueError as e:
        assert one_line(e) and "--ratio" in str(e), e
        return
    values = ratio.values() if isinstance(ratio, dict) else [ratio]
    assert all(isinstance(v, float) and 0 < v < 1 for v in values)
    if isinstance(ratio, dict):
        for pattern in ratio:
            re.compile(pattern)


OPTIONS = ["--ratio", "--data", "--out", "--samples", "--shrinkage", "--allocate", "--quant", "--group-size"]
OPTIONS += ["--dtype", "--model", "--task", "--prompt", "--transfer", "--clamp", "--steps", "--lr", "--overwrite"]
argv_tokens = st.one_of(st.sampled_from(OPTIONS), st.text(max_size=12), st.sampled_from(["0.4", "1", "demo", "-1"]))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["build", "finetune", "correct", "merge", "help"]), st.lists(argv_tokens, max_size=8))
@example("merge", ["a", "--original", "b", "--out", "c", "x\ny"])  # argparse does not quote unrecognised ones
@example("build", ["m", "--data", "d", "--out", "o", "--\u2028"])
def test_command_line_parsing_gives_arguments_or_a_one_line_usage_error(command, rest):
    import contextlib
    import io

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = cli.parser().parse_args([command, *rest])
    except SystemExit as e:
        if e.code not in (0, None):
            last = err.getvalue().splitlines()[-1]
            assert re.match(r"emloc( \w+)?: error: \S", last), err.getvalue()
        return
    # what the commands parse from the values argparse leaves as strings: a value or a one-line ValueError
    try:
        if args.command == "build":
            cli._ratio(args.ratio)
        elif args.command == "finetune":
            fields = FinetuneSettings.__dataclass_fields__
            s = FinetuneSettings(**{k: v for k, v in vars(args).items() if k in fields})
            transfer_variants(s.clamp if s.clamp is not None else s.transfer)
    except ValueError as e:
        assert one_line(e), e


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["text", "label", "x"]), inner),
    max_leaves=6,
)
json_lines = st.lists(json_values.map(lambda v: json.dumps(v, ensure_ascii=False)), max_size=4).map("\n".join)
file_bodies = st.one_of(st.binary(max_size=80), st.text(max_size=80).map(str.encode), json_lines.map(str.encode))


@settings(max_examples=200, deadline=None)
@given(file_bodies)
def test_jsonl_readers_give_rows_or_a_one_line_error(scratch, body):
    for name in ("data.jsonl", "data.txt"):
        (scratch / name).write_bytes(body)
    for read in (
        lambda: read_jsonl(scratch / "data.jsonl", "--data"),
        lambda: cli._texts(str(scratch / "data.jsonl"), 64),
        lambda: cli._texts(str(scratch / "data.txt"), 64),
    ):
        try:
            rows = read()
        except ValueError as e:
            assert one_line(e) and "--data" in str(e), e
            continue
        assert rows and all(isinstance(r, str) or set(r) == {"text", "label"} for r in rows)


rows_strategy = st.lists(st.fixed_dictionaries({"text": st.text(), "label": st.text(min_size=1)}), min_size=1)


@settings(max_examples=100, deadline=None)
@given(rows_strategy, st.sampled_from(["\n", "\r\n"]))
def test_jsonl_round_trip_with_any_characters(scratch, rows, end):
    body = "".join(json.dumps(r, ensure_ascii=False) + end for r in rows)
    (scratch / "rows.jsonl").write_bytes(body.encode("utf-8", "surrogatepass"))
    assert read_jsonl(scratch / "rows.jsonl", "--data") == rows
    assert cli._texts(str(scratch / "rows.jsonl"), len(rows)) == [r["text"] for r in rows]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--adapter", "a"], "--adapter needs --top-blocks"),
    ],
)
def test_memory_measurement_refuses_options_it_would_ignore(extra, message):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "emloc_kernels.recipe.memory", "finetune", "model", "batch.json", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr
