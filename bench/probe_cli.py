"""Hostile probes of the ``emloc`` command line and the library API, each classified automatically.

Every probe is a small scenario in a fresh sandbox directory holding a canary tiny model
(random Llama weights, SmolLM2's tokenizer), its emulator, adapters, data files, a sibling
directory of unrelated files, a user's note and a symbolic link. The sandbox is hashed before
and after the probe; the command runs in a child process under a timeout, and the outcome is
one of

* ``ok``: success was expected and the output checks out (loaded back, finite, consistent);
* ``clear_error``: a non-zero exit with a one-line ``emloc <cmd>: error: ...`` last on stderr
  and no traceback (API probes: a ``ValueError``, ``TypeError`` or file error of one line);
* ``traceback``: a Python traceback, a death by signal, or a non-zero exit without a clear error;
* ``hang``: the timeout ran out;
* ``data_loss``: a file or directory that existed before (an input, the sibling directory, the
  user's files) was changed or removed, other than the output a successful run may write;
* ``silent_wrong``: exit 0 where an error was expected, or an output that fails its check.

Each probe declares its expectation (``success``, ``error``, ``either``, or ``runs``: a run that
may still be going when a short timeout kills it); a ``clear_error`` where success was expected
is reported as a refused valid input.

Children: by default each probe's command runs in a child forked from this process after it has
imported torch, transformers, PEFT and emloc_kernels (and done no computation), calling
``emloc_kernels.cli.main(argv)`` with Python's own exit semantics (``SystemExit`` message on
stderr and exit 1, an uncaught exception's traceback and exit 1): a new interpreter per probe
would spend ~6 s of this machine's CPU on imports alone. Probes marked ``fresh`` (and all CLI
probes with ``--fresh``) run ``python -m emloc_kernels.cli`` in a new interpreter instead.
"Unreadable file" probes drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH in the child, so that
file modes apply to root as well.

Usage::

    python bench/probe_cli.py                    # all probes -> bench/results/probes.{jsonl,md}
    python bench/probe_cli.py --only 'resume|api' --keep
    python bench/probe_cli.py --list
"""

from __future__ import annotations

import os

for _k, _v in {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TQDM_DISABLE": "1",
}.items():
    os.environ.setdefault(_k, _v)

import argparse  # noqa: E402
import ctypes  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["ok", "clear_error", "traceback", "hang", "data_loss", "silent_wrong"]
TRACEBACK = "Traceback (most recent call last)"
API_ERROR_RC = 3  # exit status of an API child whose call raised a clear error
MEMORY_LIMIT = 12 << 30  # address-space limit of every child (bytes): a runaway allocation fails fast
FT = (
    "finetune --model model --data train.jsonl --eval-data eval.jsonl --steps 1 --batch-size 2 "
    "--calibration-samples 4 --validation-samples 4 --no-progress --transfer L=3"
)
BUILD = "build model --data data.txt --samples 6"
CORRECT = "correct adapter --emulator emu --original model"
MERGE = "merge corrected --original model"
T_FAST, T_BUILD, T_FT = 60, 90, 180  # timeouts (s)


# --------------------------------------------------------------------------- probes


@dataclass
class Probe:
    name: str
    group: str
    expect: str  # success | error | either | runs
    argv: list[str] | None = None  # CLI: the arguments after `emloc`
    api: Callable[[], Any] | None = None  # API: a call made in the sandbox
    scenario: Callable[[Ctx], Run] | None = None  # several steps (kill/resume)
    writes: tuple[str, ...] = ()  # sandbox paths the probe may create or change
    setup: Callable[[], Any] | None = None  # runs in the sandbox (a child) before the snapshot
    verify: Callable[[], str | None] | None = None  # runs in the sandbox after a success: None or what is wrong
    extra: tuple[str, ...] = ()  # fixture entries copied into the sandbox beyond the usual ones
    timeout: float = T_FAST
    nocaps: bool = False  # drop the DAC capabilities (file modes apply to root)
    fresh: bool = False  # run the CLI in a new interpreter
    match: str | None = None  # a regular expression the error line should match
    env: dict[str, str] = field(default_factory=dict)

    @property
    def command(self) -> str:
        if self.argv is not None:
            return shlex.join(["emloc", *self.argv])
        fn = self.api or self.scenario
        doc = (fn.__doc__ or fn.__name__).strip().splitlines()[0] if fn else ""
        return ("api: " if self.api else "scenario: ") + doc


PROBES: list[Probe] = []


def cli(
    name: str, group: str, argv: str | list[str], expect: str, *, writes: str | tuple[str, ...] | None = None, **kw
) -> Probe:
    """A CLI probe; ``writes`` defaults to the ``--out`` of an expected success."""
    args = shlex.split(argv) if isinstance(argv, str) else list(argv)
    if writes is None:
        out = args[args.index("--out") + 1] if "--out" in args and args.index("--out") + 1 < len(args) else None
        writes = (out,) if out and expect in ("success", "either", "runs") else ()
    elif isinstance(writes, str):
        writes = (writes,)
    p = Probe(name=f"{group}/{name}", group=group, expect=expect, argv=args, writes=tuple(writes), **kw)
    PROBES.append(p)
    return p


def api(name: str, expect: str, **kw) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    def register(fn: Callable[[], Any]) -> Callable[[], Any]:
        writes = kw.pop("writes", ())
        PROBES.append(
            Probe(
                name=f"api/{name}",
                group="api",
                expect=expect,
                api=fn,
                writes=tuple([writes] if isinstance(writes, str) else writes),
                **kw,
            )
        )
        return fn

    return register


def scenario(name: str, group: str, expect: str, **kw) -> Callable[[Callable[[Ctx], Run]], Callable[[Ctx], Run]]:
    def register(fn: Callable[[Ctx], Run]) -> Callable[[Ctx], Run]:
        PROBES.append(Probe(name=f"{group}/{name}", group=group, expect=expect, scenario=fn, **kw))
        return fn

    return register


# --------------------------------------------------------------------------- helpers run inside sandboxes


def _tok(path: str = "model") -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _model(path: str = "model") -> Any:
    import torch

    from emloc_kernels.conventions import load_model

    return load_model(path, dtype=torch.float32).eval()


def _texts() -> list[str]:
    return [line for line in Path("data.txt").read_text().splitlines() if line.strip()]


def _finite_model(model: Any, what: str) -> str | None:
    import torch

    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        return f"{what}: non-finite parameters {bad[:3]}"
    ids = torch.tensor([[1, 300, 301, 302, 303, 2]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    if not torch.isfinite(logits).all():
        return f"{what}: non-finite logits"
    return None


def _files_of(directory: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}


def check_emulator(out: str, ratio: float | None = None, modules: str | None = None) -> Callable[[], str | None]:
    """Load the emulator back; finite weights and logits; the ratio and the compressed modules."""

    def verify() -> str | None:
        from emloc_kernels import load_emulator

        emu = load_emulator(out)
        meta = emu.emloc_metadata
        if ratio is not None:
            wrong = {n: m["ratio"] for n, m in meta["modules"].items() if abs(m["ratio"] - ratio) > 1e-12}
            if wrong:
                return f"modules built with another ratio than {ratio}: {list(wrong.items())[:2]}"
        if modules is not None:
            stray = [n for n in meta["modules"] if not re.search(modules, n)]
            if stray or not meta["modules"]:
                return f"compressed modules {stray[:3] or 'none'} do not match {modules!r}"
        if not Path(meta["original_model"]).resolve() == Path("model").resolve() and meta["original_model"] != "model":
            return f"emloc.json names the original {meta['original_model']!r}"
        return _finite_model(emu, "emulator")

    return verify


def check_adapter(out: str, original: str = "model") -> Callable[[], str | None]:
    """The adapter loads onto the original with PEFT; finite tensors, logits and report."""

    def verify() -> str | None:
        import torch
        from peft import PeftModel
        from safetensors.torch import load_file

        state = load_file(f"{out}/adapter_model.safetensors")
        bad = [k for k, t in state.items() if not torch.isfinite(t).all()]
        if bad:
            return f"adapter tensors with NaN/inf: {bad[:2]}"
        report = Path(out, "correction_report.json")
        if report.is_file():
            totals = json.loads(report.read_text())["totals"]
            if any(isinstance(v, float) and v != v for v in totals.values()):
                return f"correction report with NaN totals: {totals}"
        model = PeftModel.from_pretrained(_model(original), out)
        return _finite_model(model, "original + adapter")

    return verify


def check_merged(
    out: str, original: str = "model", adapter: str = "corrected", exact: bool = True
) -> Callable[[], str | None]:
    """The merged model loads strictly; finite; one weight is W + s·B·A of the adapter (``exact``),
    or differs from W."""

    def verify() -> str | None:
        import torch
        from safetensors.torch import load_file

        merged, base = _model(out), _model(original)
        if not exact:
            key = "model.layers.0.self_attn.q_proj"
            if torch.equal(merged.get_submodule(key).weight, base.get_submodule(key).weight):
                return f"merged {key} equals the original's: the adapter was not merged"
            return _finite_model(merged, "merged model")
        config = json.loads(Path(adapter, "adapter_config.json").read_text())
        state = load_file(f"{adapter}/adapter_model.safetensors")
        key = "model.layers.0.self_attn.q_proj"
        a = state[f"base_model.model.{key}.lora_A.weight"].double()
        b = state[f"base_model.model.{key}.lora_B.weight"].double()
        expected = base.get_submodule(key).weight.double() + config["lora_alpha"] / config["r"] * b @ a
        got = merged.get_submodule(key).weight.double()
        if not torch.allclose(got, expected, atol=1e-5, rtol=1e-4):
            return f"merged {key} differs from W + s·B·A by {float((got - expected).abs().max()):.3g}"
        return _finite_model(merged, "merged model")

    return verify


def check_finetune(out: str) -> Callable[[], str | None]:
    """report.json: accuracies in [0, 1], finite losses; the delivered adapter loads onto the original."""

    def verify() -> str | None:
        import math

        report = json.loads(Path(out, "report.json").read_text())
        for k, v in report["accuracy"].items():
            if v is not None and not (
                isinstance(v, (int, float)) and math.isfinite(v) and (k == "recovery" or 0 <= v <= 1)
            ):
                return f"accuracy {k} = {v}"
        if not all(math.isfinite(x) for x in report["losses"]):
            return f"non-finite training losses {report['losses'][:4]}"
        if not report["losses"]:
            return "no training step was taken (losses [])"
        delivered = Path(report["delivered_adapter"])
        if not delivered.is_dir():
            delivered = Path(out) / delivered.name
        return check_adapter(str(delivered))()

    return verify


def bitflip(path: str, from_end: int = 64) -> Callable[[], None]:
    def setup() -> None:
        data = bytearray(Path(path).read_bytes())
        data[len(data) - from_end] ^= 0x10
        Path(path).write_bytes(bytes(data))

    return setup


def truncate(path: str, keep: float = 0.5) -> Callable[[], None]:
    def setup() -> None:
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: int(len(data) * keep)])

    return setup


def write(path: str, content: str | bytes) -> Callable[[], None]:
    def setup() -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(content.encode() if isinstance(content, str) else content)

    return setup


def chmod(path: str, mode: int) -> Callable[[], None]:
    return lambda: os.chmod(path, mode)


def symlink(target: str, name: str) -> Callable[[], None]:
    return lambda: os.symlink(target, name)


def steps(*fns: Callable[[], Any]) -> Callable[[], None]:
    def setup() -> None:
        for f in fns:
            f()

    return setup


def edit_json(path: str, change: Callable[[dict], Any]) -> Callable[[], None]:
    def setup() -> None:
        data = json.loads(Path(path).read_text())
        change(data)
        Path(path).write_text(json.dumps(data))

    return setup


def edit_tensors(path: str, change: Callable[[dict], Any]) -> Callable[[], None]:
    def setup() -> None:
        from safetensors.torch import load_file, save_file

        state = load_file(path)
        change(state)
        save_file(state, path, metadata={"format": "pt"})

    return setup


def copy(src: str, dst: str) -> Callable[[], None]:
    return lambda: shutil.copytree(src, dst) if Path(src).is_dir() else shutil.copy(src, dst)


def jsonl(rows: list[Any]) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def labelled(n: int, labels: tuple[str, ...] = ("positive", "negative"), offset: int = 0) -> list[dict]:
    words = "good bad film plot acting dull great boring fun slow".split()
    return [
        {
            "text": " ".join(words[(i * 7 + j * 3 + offset) % len(words)] for j in range(6)),
            "label": labels[i % len(labels)],
        }
        for i in range(n)
    ]


# --------------------------------------------------------------------------- fixtures


REVIEWS = [
    "A gripping, beautifully acted drama that earns every tear.",
    "The plot collapses under its own weight by the second hour.",
    "Funny, warm and sharper than it has any right to be.",
    "Dull characters wander through a story nobody cared to finish.",
    "An inventive thriller whose final twist actually lands.",
    "Two hours of noise pretending to be an action film.",
    "The lead performance alone is worth the ticket.",
    "It mistakes cruelty for wit and boredom for depth.",
    "A small, honest film about grief and second chances.",
    "Even the soundtrack seems embarrassed to be here.",
    "Visually stunning, emotionally hollow, oddly forgettable.",
    "The best animated feature of the year, by a mile.",
]
USUAL = ["model", "emu", "adapter", "corrected", "prev", "other", "note.txt", "link", "data.txt", "data.jsonl"]
USUAL += ["train.jsonl", "eval.jsonl"]
EXTRA = ["model2", "wide", "model6", "small_vocab", "nan_model", "adapter_wide", "adapter_dora"]


def make_fixtures(base: Path) -> None:
    """Build the fixture directory (in a child: this computes)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from emloc_kernels import build_emulator, correct_adapter, load_emulator, save_emulator
    from emloc_kernels.files import write_dir_atomically
    from emloc_kernels.recipe.demo import smollm2_path

    os.chdir(base)
    tok = _tok(str(smollm2_path()))

    def tiny(name: str, seed: int = 0, **over: Any) -> None:
        torch.manual_seed(seed)
        kw = dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        model = LlamaForCausalLM(LlamaConfig(**{**kw, **over}))
        if name == "nan_model":
            with torch.no_grad():
                model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
        model.save_pretrained(name)
        tok.save_pretrained(name)

    tiny("model")
    tiny("model2", seed=1)
    tiny("wide", hidden_size=48)
    tiny("model6", num_hidden_layers=6)
    tiny("small_vocab", vocab_size=100)
    tiny("nan_model")
    Path("data.txt").write_text("\n".join(REVIEWS) + "\n")
    Path("data.jsonl").write_text(jsonl([{"text": r} for r in REVIEWS]))
    Path("train.jsonl").write_text(jsonl(labelled(16)))
    Path("eval.jsonl").write_text(jsonl(labelled(6, offset=1)))
    Path("other/sub").mkdir(parents=True)
    Path("other/results.csv").write_text("run,accuracy\n1,0.93\n")
    Path("other/sub/weights.bin").write_bytes(bytes(range(256)) * 16)
    Path("note.txt").write_text("my notes: do not lose\n")
    os.symlink("other", "link")

    emulator = build_emulator(_model("model"), REVIEWS, 0.4, tokenizer=tok, progress=False)
    save_emulator(emulator, "emu")

    def lora(model: Any, **kw: Any) -> Any:
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=targets, **kw))
        torch.manual_seed(1)
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
        return peft_model

    lora(load_emulator("emu")).save_pretrained("adapter")
    lora(_model("wide")).save_pretrained("adapter_wide")
    lora(_model("model"), use_dora=True).save_pretrained("adapter_dora")
    correct_adapter("adapter", "emu", "model", "corrected", progress=False)
    write_dir_atomically("prev", lambda d: (d / "old.txt").write_text("an earlier emloc output\n"))


# --------------------------------------------------------------------------- children


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_dac_capabilities() -> None:
    """Drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH: file modes then apply to root too."""
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _CapHeader(0x20080522, 0), (_CapData * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    mask = ~((1 << 1) | (1 << 2)) & 0xFFFFFFFF
    data[0].effective &= mask
    data[0].permitted &= mask
    data[0].inheritable &= mask
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def _child_setup(cwd: Path, stdout: Path, stderr: Path, env: dict[str, str], nocaps: bool) -> None:
    os.setpgid(0, 0)
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, stdout), (2, stderr)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.chdir(cwd)
    os.environ.update(env)
    if nocaps:
        drop_dac_capabilities()


def fork_call(
    fn: Callable[[], Any], cwd: Path, stdout: Path, stderr: Path, *, env=None, nocaps=False, api=False
) -> int:
    """Fork a child that runs ``fn()`` with Python's exit semantics; returns its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        try:
            os.setpgid(pid, pid)
        except OSError:
            pass
        return pid
    code = 70
    try:
        _child_setup(cwd, stdout, stderr, env or {}, nocaps)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            fn()
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError) as e:
            if api and "\n" not in str(e).strip():
                print(f"api error: {type(e).__name__}: {e}", file=sys.stderr)
                code = API_ERROR_RC
            else:
                traceback.print_exc()
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def spawn_cli(argv: list[str], cwd: Path, stdout: Path, stderr: Path, *, env=None, nocaps=False) -> int:
    """``python -m emloc_kernels.cli argv`` in a new interpreter; returns its pid."""
    out, err = open(stdout, "wb"), open(stderr, "wb")

    def pre() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
        if nocaps:
            drop_dac_capabilities()

    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "emloc_kernels.cli", *argv],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=err,
        env=full_env,
        start_new_session=True,
        preexec_fn=pre,
    )
    out.close()
    err.close()
    proc.returncode = 0  # reaped with os.waitpid below
    return proc.pid


@dataclass
class Run:
    rc: int | None
    signal: int | None
    timed_out: bool
    wall: float
    stdout: str
    stderr: str
    killed_on_purpose: bool = False
    notes: list[str] = field(default_factory=list)
    verify: str | None = None  # what a scenario found wrong
    cli_cmd: str | None = None  # the emloc subcommand, for a CLI run


def wait(
    pid: int, timeout: float, until: Callable[[], bool] | None = None, kill_signal: int = signal.SIGKILL
) -> tuple[int | None, int | None, bool, bool]:
    """Wait for ``pid``: ``(rc, signal, timed_out, killed_on_purpose)``; ``until`` true sends
    ``kill_signal`` to the child (its process group too for SIGKILL)."""
    start = time.monotonic()
    purpose = False
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if until is not None and not purpose and until():
            if kill_signal == signal.SIGKILL:
                _killpg(pid)
            else:
                os.kill(pid, kill_signal)
            purpose = True
        if time.monotonic() - start > timeout:
            _killpg(pid)
            os.waitpid(pid, 0)
            return None, None, True, purpose
        time.sleep(0.05)
    _killpg(pid)  # whatever it left running (its own process group)
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status), False, purpose
    return os.WEXITSTATUS(status), None, False, purpose


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Ctx:
    """What a probe step can do in its sandbox."""

    def __init__(self, sandbox: Path, logs: Path, fresh: bool) -> None:
        self.sandbox, self.logs, self.fresh = sandbox, logs, fresh
        self.n = 0

    def _paths(self) -> tuple[Path, Path]:
        self.n += 1
        return self.logs / f"{self.n}.out", self.logs / f"{self.n}.err"

    def _collect(self, out: Path, err: Path, pid_result: tuple, wall: float) -> Run:
        rc, sig, timed_out, purpose = pid_result
        text = lambda p: p.read_text(errors="replace") if p.exists() else ""  # noqa: E731
        return Run(rc, sig, timed_out, round(wall, 2), text(out), text(err), purpose)

    def cli(
        self,
        argv: list[str],
        *,
        timeout: float,
        fresh: bool = False,
        nocaps: bool = False,
        env=None,
        until: Callable[[], bool] | None = None,
        kill_signal: int = signal.SIGKILL,
        slow: float = 0.0,
    ) -> Run:
        out, err = self._paths()
        start = time.monotonic()
        if (fresh or self.fresh) and not slow:
            pid = spawn_cli(argv, self.sandbox, out, err, env=env, nocaps=nocaps)
        else:
            pid = fork_call(lambda: _cli_main(argv, slow), self.sandbox, out, err, env=env, nocaps=nocaps)
        result = wait(pid, timeout, until, kill_signal)
        run = self._collect(out, err, result, time.monotonic() - start)
        run.cli_cmd = argv[0] if argv else ""
        return run

    def call(self, fn: Callable[[], Any], *, timeout: float, nocaps: bool = False, env=None, api: bool = True) -> Run:
        out, err = self._paths()
        start = time.monotonic()
        pid = fork_call(fn, self.sandbox, out, err, env=env, nocaps=nocaps, api=api)
        return self._collect(out, err, wait(pid, timeout), time.monotonic() - start)

    def check(self, fn: Callable[[], str | None], timeout: float = 120) -> str | None:
        """Run a verifier in a child: None when the output checks out, else what is wrong."""
        result = self.logs / f"verify{self.n}.json"
        self.n += 1

        def run() -> None:
            try:
                message = fn()
            except BaseException as e:  # noqa: BLE001
                message = f"verification failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            Path(result).write_text(json.dumps({"message": message}))

        r = self.call(run, timeout=timeout, api=False)
        if r.timed_out:
            return "verification timed out"
        if not result.exists():
            return f"verification crashed: {last_line(r.stderr)}"
        return json.loads(result.read_text())["message"]


def _cli_main(argv: list[str], slow: float = 0.0) -> None:
    if slow:  # each block's fit takes `slow` seconds longer, so that a kill lands mid-build
        from emloc_kernels.emulator import build

        fit = build._compress_block

        def slowed(*args: Any, **kwargs: Any) -> Any:
            time.sleep(slow)
            return fit(*args, **kwargs)

        build._compress_block = slowed
    from emloc_kernels import cli as emloc_cli

    emloc_cli.main(argv)


# --------------------------------------------------------------------------- sandboxes


def snapshot(root: Path) -> dict[str, str]:
    """Every path below ``root``: a content hash, ``dir`` or ``-> target`` for a link (not followed)."""
    out: dict[str, str] = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(directory, name)
            key = str(p.relative_to(root))
            if p.is_symlink():
                out[key] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[key] = "dir"
            else:
                try:
                    out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
                except OSError as e:
                    out[key] = f"unreadable: {e.strerror}"
    return out


def _allowed(key: str, writes: tuple[str, ...], sandbox: Path) -> bool:
    for w in writes:
        w = os.path.normpath(w)
        if key == w or key.startswith(w.rstrip("/") + "/"):
            return True
        real = os.path.relpath(os.path.realpath(sandbox / w), os.path.realpath(sandbox))
        if key == real or key.startswith(real + "/"):
            return True
    return False


def compare(before: dict, after: dict, writes: tuple[str, ...], sandbox: Path) -> tuple[list[str], list[str]]:
    """(pre-existing paths changed or removed outside ``writes``, new paths outside ``writes``)."""
    changed = [
        f"{k} {'removed' if k not in after else 'changed'}"
        for k in before
        if after.get(k) != before[k] and not _allowed(k, writes, sandbox)
    ]
    new = [k for k in after if k not in before and not _allowed(k, writes, sandbox)]
    return changed, new


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


NOISE = re.compile(r"\d+%\||it/s\]|Warning: |warnings\.warn\(|^\s*$")  # progress bars and library warnings


def error_line(probe: Probe, run: Run) -> str:
    """The line that says what happened: the emloc error, else the exception of a traceback, else
    the first line of stderr that is no progress bar or warning (else the first line)."""
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("api error: ") or (line.startswith("emloc") and ": error: " in line):
            return line
    if TRACEBACK in run.stderr:
        for line in reversed(lines):
            if not line.startswith(" "):
                return line
    quiet = [line for line in lines if not NOISE.search(line)]
    return quiet[0] if quiet else ""


# what an accepted input that should have been refused does (the note of a silent_wrong)
WRONG = {
    "args-build/build-samples--1": "--samples -1 is read as texts[:-1]: calibrates on all samples but the last",
    "args-finetune/finetune-steps-0": "trains no step and delivers the untrained adapter",
    "args-finetune/finetune-steps--1": "trains no step (range(-1)) and delivers the untrained adapter",
    "args-finetune/finetune-calibration-samples--1": "calibrates on rows[:-1], all training rows but the last",
    "args-finetune/finetune-validation-samples-0": "chooses the delivered transfer on 0 validation examples",
    "args-finetune/finetune-eval-samples-0": "0 is taken as 'all' (`if s.eval_samples`): evaluates on the whole test set",
    "args-finetune/finetune-eval-samples--1": "evaluates on test_rows[:-1], all but the last example",
    "malformed-data/train-empty-label": "the label '' is trained and scored as the next token ' '",
    "malformed-adapter-merge/lora_B-missing": "PEFT leaves the missing lora_B at its zero initialisation: "
    "that module's LoRA is dropped from the merge without a word",
    "silent-merge/adapter-with-nan": "the NaN of the adapter is merged into the written model",
    "silent-correct/original-with-nan-weight": "a NaN weight at an unprobed position of the original passes "
    "the weight-probe check and the corrected adapter holds NaN",
    "silent-correct/stray-shard-in-emulator": "correct reads every *.safetensors of the emulator (the last "
    "file wins for a key), which load_emulator refuses: the correction uses the stray tensor",
    "silent-correct/bitflip-in-emulator": "correct does not check the SHA-256 recorded in emloc.json "
    "(load_emulator does): the correction uses the damaged tensor",
    "api/transfer-other-original": "transfer_adapter has no weight-probe check (correct_adapter has): "
    "an adapter is fitted to another model of the same shapes",
}


def classify(probe: Probe, run: Run, changed: list[str]) -> tuple[str, list[str]]:
    notes: list[str] = []
    if run.timed_out and not run.killed_on_purpose:
        if probe.expect == "runs":
            notes.append("still running when the timeout stopped it, as a long run should")
            return ("data_loss" if changed else "ok"), notes
        return "hang", notes
    if changed:
        return "data_loss", notes
    crashed = run.signal is not None or TRACEBACK in run.stderr
    if run.signal is not None:
        notes.append(f"killed by signal {run.signal}")
    if run.rc == 0 and run.signal is None:
        if TRACEBACK in run.stderr:
            notes.append("exit 0 with a traceback on stderr")
        if probe.expect == "error":
            notes.append("exit 0: " + WRONG.get(probe.name, "the input was accepted"))
            if run.verify:
                notes.append(run.verify)
            return "silent_wrong", notes
        if run.verify:
            notes.append(run.verify)
            return "silent_wrong", notes
        return "ok", notes
    last = last_line(run.stderr)
    if run.cli_cmd is not None:  # argparse reports errors outside a subcommand as `emloc: error: ...`
        clear = last.startswith((f"emloc {run.cli_cmd}: error: ", "emloc: error: "))
    else:
        clear = run.rc == API_ERROR_RC
    if clear and not crashed:
        if probe.expect in ("success", "runs"):
            notes.append("refused an input that should have been accepted")
        if probe.match and not re.search(probe.match, error_line(probe, run)):
            notes.append(f"misleading message: does not name {probe.match!r}")
        return "clear_error", notes
    if not crashed:
        if any(line.startswith("emloc") and ": error: " in line for line in run.stderr.splitlines()):
            notes.append("no traceback, but the error message runs over several lines")
        else:
            notes.append(f"exit {run.rc} without a one-line 'emloc <cmd>: error:' as the last line of stderr")
    return "traceback", notes


# --------------------------------------------------------------------------- running


def run_probe(probe: Probe, base: Path, work: Path, fresh: bool) -> dict[str, Any]:
    sandbox = work / re.sub(r"[^A-Za-z0-9_.-]+", "_", probe.name)
    logs = work / ("logs_" + sandbox.name)
    for d in (sandbox, logs):
        shutil.rmtree(d, ignore_errors=True)
    sandbox.mkdir(parents=True)
    logs.mkdir(parents=True)
    words = " ".join(probe.argv or [])
    for entry in USUAL + [e for e in EXTRA if e in probe.extra or re.search(rf"(^|[\s/=]){e}([\s/]|$)", words)]:
        src = base / entry
        if src.is_symlink():
            os.symlink(os.readlink(src), sandbox / entry)
        elif src.is_dir():
            shutil.copytree(src, sandbox / entry, symlinks=True)
        else:
            shutil.copy2(src, sandbox / entry)
    ctx = Ctx(sandbox, logs, fresh)
    notes: list[str] = []
    if probe.setup is not None:
        r = ctx.call(probe.setup, timeout=120, api=False)
        if r.rc != 0:
            raise RuntimeError(f"setup of {probe.name} failed: {r.stderr[-2000:]}")
    before = snapshot(sandbox)
    start = time.monotonic()
    if probe.scenario is not None:
        run = probe.scenario(ctx)
    elif probe.api is not None:
        run = ctx.call(probe.api, timeout=probe.timeout, nocaps=probe.nocaps, env=probe.env)
    else:
        run = ctx.cli(probe.argv, timeout=probe.timeout, fresh=probe.fresh, nocaps=probe.nocaps, env=probe.env)
    wall = time.monotonic() - start
    after = snapshot(sandbox)
    # the output a probe may write is excluded only from a successful run's comparison: a failed
    # run must leave even an existing --out (one it was allowed to replace) as it was
    changed, new = compare(before, after, probe.writes if run.rc == 0 else (), sandbox)
    if run.rc == 0 and not run.timed_out and probe.verify is not None and not changed and run.verify is None:
        run.verify = ctx.check(probe.verify)
    cls, more = classify(probe, run, changed)
    notes += run.notes + more
    if changed:
        notes.append("changed: " + ", ".join(changed[:6]) + (" …" if len(changed) > 6 else ""))
    left = sorted({k.split("/")[0] for k in new} - {w.split("/")[0] for w in probe.writes})
    if left and cls != "ok":
        notes.append("left behind: " + ", ".join(left[:6]))
    record = {
        "name": probe.name,
        "group": probe.group,
        "command": probe.command,
        "expect": probe.expect,
        "class": cls,
        "as_expected": (cls == "ok" and probe.expect in ("success", "either", "runs"))
        or (cls == "clear_error" and probe.expect in ("error", "either")),
        "rc": run.rc,
        "signal": run.signal,
        "wall_s": round(wall, 2),
        "stderr_line": error_line(probe, run)[:400],
        "message_ok": not any(n.startswith("misleading message") for n in notes),
        "notes": notes,
        "sandbox": str(sandbox),
    }
    (logs / "stderr.txt").write_text(run.stderr)
    (logs / "stdout.txt").write_text(run.stdout)
    return record


def select(pattern: str | None) -> list[Probe]:
    names = [p.name for p in PROBES]
    dup = [n for n, c in Counter(names).items() if c > 1]
    if dup:
        raise SystemExit(f"duplicate probe names: {dup}")
    return [p for p in PROBES if pattern is None or re.search(pattern, p.name)]


def build_fixtures(base: Path) -> None:
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    logs = base.parent / "logs_fixtures"
    logs.mkdir(exist_ok=True)
    ctx = Ctx(base.parent, logs, fresh=False)
    r = ctx.call(lambda: make_fixtures(base), timeout=600, api=False)
    if r.rc != 0:
        raise SystemExit(f"building the fixtures failed:\n{r.stderr[-3000:]}")


def write_reports(records: list[dict], out_dir: Path, wall: float, fresh: bool) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "probes.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps({k: v for k, v in r.items() if k != "sandbox"}, ensure_ascii=False) + "\n")
    counts = Counter(r["class"] for r in records)
    unexpected = [r for r in records if r["class"] in ("ok", "clear_error") and not r["as_expected"]]
    cell = lambda s: str(s).replace("|", "\\|").replace("\n", "\\n")  # noqa: E731
    lines = [
        "# Hostile probes of the emloc CLI and API",
        "",
        f"`python bench/probe_cli.py{' --fresh' if fresh else ''}`: {len(records)} probes in {wall / 60:.1f} min "
        "(2 busy CPU cores). Classes: see the docstring of bench/probe_cli.py.",
        "",
        "| class | probes |",
        "|---|---|",
        *[f"| {c} | {counts.get(c, 0)} |" for c in CLASSES],
        f"| (ok/clear_error against the declared expectation) | {len(unexpected)} |",
        "",
    ]
    bad = [r for r in records if r["class"] not in ("ok", "clear_error")] + unexpected
    vague = [r for r in records if r["class"] == "clear_error" and not r.get("message_ok", True)]
    for title, rows in (
        ("Defects (not ok/clear_error, or against the expectation)", bad),
        ("Clear errors whose message misleads or does not name the input", vague),
    ):
        if not rows:
            continue
        lines += [f"## {title}", "", "| probe | command | class | expected | what happened |", "|---|---|---|---|---|"]
        for r in rows:
            parts = [*r["notes"], r["stderr_line"]] if r["rc"] == 0 else [r["stderr_line"], *r["notes"]]
            what = "; ".join(x for x in parts if x)
            lines.append(
                f"| {cell(r['name'])} | `{cell(r['command'])}` | {r['class']} | {r['expect']} | {cell(what)} |"
            )
        lines.append("")
    lines += [
        "## All probes",
        "",
        "| probe | command | class | expected | first line of stderr (the error line if any) |",
    ]
    lines.append("|---|---|---|---|---|")
    for r in records:
        lines.append(
            f"| {cell(r['name'])} | `{cell(r['command'])}` | {r['class']} | {r['expect']} | {cell(r['stderr_line'][:200])} |"
        )
    text = "\n".join(lines) + "\n"
    (out_dir / "probes.md").write_text(text)
    return text


def worker(probes: list[tuple[int, Probe]], base: Path, work: Path, fresh: bool, keep: bool, sink: Path) -> None:
    with open(sink, "a") as f:
        for i, probe in probes:
            try:
                record = run_probe(probe, base, work, fresh)
            except Exception as e:  # noqa: BLE001 - a harness failure is reported, not hidden
                record = {
                    "name": probe.name,
                    "group": probe.group,
                    "command": probe.command,
                    "expect": probe.expect,
                    "class": "traceback",
                    "as_expected": False,
                    "rc": None,
                    "signal": None,
                    "wall_s": 0,
                    "stderr_line": f"HARNESS ERROR {type(e).__name__}: {e}"[:400],
                    "notes": [],
                    "sandbox": "",
                }
            record["index"] = i
            f.write(json.dumps(record) + "\n")
            f.flush()
            flag = (
                ""
                if record["as_expected"]
                else "  <-- " + (record["stderr_line"][:120] or "; ".join(record["notes"])[:120])
            )
            print(f"[{i + 1:3d}] {record['class']:<12} {record['wall_s']:6.1f}s {probe.name}{flag}", flush=True)
            if not keep and record["as_expected"] and record["sandbox"]:
                shutil.rmtree(record["sandbox"], ignore_errors=True)
                shutil.rmtree(
                    Path(record["sandbox"]).parent / ("logs_" + Path(record["sandbox"]).name), ignore_errors=True
                )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", help="regular expression on probe names")
    p.add_argument("--list", action="store_true", help="list the probes and exit")
    p.add_argument("--fresh", action="store_true", help="every CLI probe in a new interpreter (slow)")
    p.add_argument("--jobs", type=int, default=1, help="probes run side by side (default 1)")
    p.add_argument("--keep", action="store_true", help="keep every sandbox (default: only unexpected outcomes)")
    p.add_argument("--work", default=None, help="work directory (default: a new one under /tmp)")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"), help="where probes.{jsonl,md} go")
    a = p.parse_args()
    probes = select(a.only)
    if a.list:
        for probe in probes:
            print(f"{probe.name:<55} {probe.expect:<8} {probe.command}")
        print(f"{len(probes)} probes")
        return
    import peft  # noqa: F401 - imported once here, inherited by every forked child
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import emloc_kernels  # noqa: F401
    import emloc_kernels.cli  # noqa: F401
    import emloc_kernels.recipe.finetune  # noqa: F401

    work = Path(a.work or tempfile.mkdtemp(prefix="emloc_probes_"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    print(f"work directory {work}; building fixtures", flush=True)
    build_fixtures(work / "base")
    print(f"fixtures in {time.monotonic() - start:.0f} s; {len(probes)} probes", flush=True)
    sinks = [work / f"results{j}.jsonl" for j in range(a.jobs)]
    for s in sinks:
        s.unlink(missing_ok=True)
    indexed = list(enumerate(probes))
    if a.jobs == 1:
        worker(indexed, work / "base", work, a.fresh, a.keep, sinks[0])
    else:
        pids = []
        for j in range(a.jobs):
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    worker(indexed[j :: a.jobs], work / "base", work, a.fresh, a.keep, sinks[j])
                except BaseException:
                    traceback.print_exc()
                    code = 1
                finally:
                    os._exit(code)
            pids.append(pid)
        for pid in pids:
            os.waitpid(pid, 0)
    records = sorted(
        (json.loads(line) for s in sinks if s.exists() for line in s.read_text().splitlines()), key=lambda r: r["index"]
    )
    wall = time.monotonic() - start
    text = write_reports(records, Path(a.results), wall, a.fresh)
    print(text.split("## All probes")[0])
    print(f"{len(records)} probes in {wall / 60:.1f} min; sandboxes of unexpected outcomes kept in {work}")


# --------------------------------------------------------------------------- the probes

# --------------------------------------------------------------------------- the probes
# Sandbox (cwd of every probe): model/ (the canary original), emu/ (its emulator), adapter/
# (a LoRA trained on emu/, PEFT's files, no marker), corrected/ (correct's output: marker),
# prev/ (an earlier emloc output: marker), other/ (a user's unrelated files), note.txt,
# link -> other, data.txt, data.jsonl, train.jsonl, eval.jsonl; on demand model2/ (same shapes,
# other weights), wide/ (hidden 48), model6/ (6 blocks), small_vocab/ (100 tokens), nan_model/,
# adapter_wide/, adapter_dora/.

E = "--out E"

# ---- data loss: --out against the inputs, files, links and foreign directories
for name, out, expect in [
    ("out=model", "model", "error"),
    ("out=model-overwrite", "model --overwrite", "error"),
    ("out=parent-of-model", ". --overwrite", "error"),
    ("out=inside-model", "model/emu", "error"),
    ("out=model-trailing-dot", "model/. --overwrite", "error"),
    ("out=data-file", "data.txt --overwrite", "error"),
    ("out=user-file", "note.txt", "error"),
    ("out=user-file-overwrite", "note.txt --overwrite", "error"),
    ("out=symlink", "link", "error"),
    ("out=symlink-overwrite", "link --overwrite", "error"),
    ("out=foreign-dir", "other", "error"),
    ("out=foreign-dir-overwrite", "other --overwrite", "error"),
    ("out=peft-dir-overwrite", "adapter --overwrite", "error"),
    ("out=earlier-output", "prev", "error"),
    ("out=earlier-output-overwrite", "prev --overwrite", "success"),
    ("out=new-dir-behind-symlink", "link/emu_new", "success"),
    ("out=nested-new-dirs", "a/b/c", "success"),
    ("out=empty-string", "'' --overwrite", "error"),
    ("out=filesystem-root", "/ --overwrite", "error"),
    ("out=dev-null", "/dev/null --overwrite", "error"),
]:
    verify = check_emulator(out.split()[0]) if expect == "success" else None
    writes = ("other/emu_new", "link/emu_new") if "link/" in out else None
    cli(name, "dataloss-build", f"{BUILD} --out {out}", expect, verify=verify, writes=writes, timeout=T_BUILD)
cli(
    "model-via-symlink,out=model",
    "dataloss-build",
    "build mlink --data data.txt --out model --overwrite",
    "error",
    setup=symlink("model", "mlink"),
)
cli(
    "out=symlink-to-model",
    "dataloss-build",
    f"{BUILD} --out mlink --overwrite",
    "error",
    setup=symlink("model", "mlink"),
)
cli(
    "out=dangling-symlink",
    "dataloss-build",
    f"{BUILD} --out dangling --overwrite",
    "error",
    setup=symlink("nowhere", "dangling"),
)
cli(
    "out=earlier-output-holding-the-data",
    "dataloss-build",
    "build model --data prev/d.txt --out prev --overwrite",
    "error",
    setup=copy("data.txt", "prev/d.txt"),
)
cli(
    "out-parent-read-only",
    "dataloss-build",
    f"{BUILD} --out ro/E",
    "error",
    setup=steps(lambda: os.mkdir("ro"), chmod("ro", 0o555)),
    nocaps=True,
)
cli(
    "foreign-.E.partial-dir",
    "dataloss-build",
    f"{BUILD} {E}",
    "error",
    setup=write(".E.partial/precious.txt", "mine\n"),
    timeout=T_BUILD,
)
cli(
    "foreign-.E.partial-with-build.json",
    "dataloss-build",
    f"{BUILD} {E}",
    "error",
    setup=steps(write(".E.partial/build.json", "{}"), write(".E.partial/precious.txt", "mine\n")),
    timeout=T_BUILD,
)
cli(
    ".E.partial-symlink-to-foreign-dir",
    "dataloss-build",
    f"{BUILD} {E}",
    "error",
    setup=symlink("other", ".E.partial"),
    timeout=T_BUILD,
)
cli(
    ".E.partial-is-a-file",
    "dataloss-build",
    f"{BUILD} {E}",
    "error",
    setup=write(".E.partial", "mine\n"),
    timeout=T_BUILD,
)

for name, out, expect in [
    ("out=model", "model --overwrite", "error"),
    ("out=parent", ". --overwrite", "error"),
    ("out=inside-model", "model/run", "error"),
    ("out=train-data", "train.jsonl --overwrite", "error"),
    ("out=eval-data", "eval.jsonl --overwrite", "error"),
    ("out=user-file", "note.txt --overwrite", "error"),
    ("out=symlink", "link --overwrite", "error"),
    ("out=foreign-dir", "other --overwrite", "error"),
    ("out=earlier-output", "prev", "error"),
    ("out=earlier-output-overwrite", "prev --overwrite", "success"),
]:
    verify = check_finetune("prev") if expect == "success" else None
    cli(name, "dataloss-finetune", f"{FT} --out {out}", expect, verify=verify, timeout=T_FT)
cli(
    "data-inside-out",
    "dataloss-finetune",
    f"{FT.replace('train.jsonl', 'prev/t.jsonl')} --out prev --overwrite",
    "error",
    setup=copy("train.jsonl", "prev/t.jsonl"),
)
cli(
    "foreign-.run.partial-dir",
    "dataloss-finetune",
    f"{FT} --out run",
    "error",
    setup=write(".run.partial/precious.txt", "mine\n"),
    timeout=T_FT,
)
cli(
    ".run.partial-symlink",
    "dataloss-finetune",
    f"{FT} --out run",
    "error",
    setup=symlink("other", ".run.partial"),
    timeout=T_FT,
)

for name, out, expect in [
    ("out=adapter", "adapter --overwrite", "error"),
    ("out=emulator", "emu --overwrite", "error"),
    ("out=original", "model --overwrite", "error"),
    ("out=parent", ". --overwrite", "error"),
    ("out=inside-adapter", "adapter/c", "error"),
    ("out=inside-emulator", "emu/c", "error"),
    ("out=user-file", "note.txt --overwrite", "error"),
    ("out=symlink", "link --overwrite", "error"),
    ("out=foreign-dir", "other --overwrite", "error"),
    ("out=earlier-output", "corrected", "error"),
    ("out=earlier-output-overwrite", "corrected --overwrite", "success"),
]:
    verify = check_adapter(out.split()[0]) if expect == "success" else None
    cli(name, "dataloss-correct", f"{CORRECT} --out {out}", expect, verify=verify)

for name, out, expect in [
    ("out=original", "model --overwrite", "error"),
    ("out=adapter", "corrected --overwrite", "error"),
    ("out=parent", ". --overwrite", "error"),
    ("out=inside-adapter", "corrected/m", "error"),
    ("out=user-file", "note.txt --overwrite", "error"),
    ("out=symlink", "link --overwrite", "error"),
    ("out=foreign-dir", "other --overwrite", "error"),
    ("out=earlier-output", "prev", "error"),
    ("out=earlier-output-overwrite", "prev --overwrite", "success"),
]:
    verify = check_merged("prev") if expect == "success" else None
    cli(name, "dataloss-merge", f"{MERGE} --out {out}", expect, verify=verify)
cli(
    "adapter-inside-out",
    "dataloss-merge",
    "merge prev/a --original model --out prev --overwrite",
    "error",
    setup=copy("corrected", "prev/a"),
)


# ---- baselines (what must work), a few in a new interpreter
cli("build", "baseline", f"{BUILD} {E}", "success", verify=check_emulator("E", 0.4), timeout=T_BUILD, fresh=True)
cli(
    "build-jsonl",
    "baseline",
    f"build model --data data.jsonl {E}",
    "success",
    verify=check_emulator("E"),
    timeout=T_BUILD,
)
cli("build-int8", "baseline", f"{BUILD} --quant int8 {E}", "success", verify=check_emulator("E"), timeout=T_BUILD)
cli(
    "build-int4-group64",
    "baseline",
    f"{BUILD} --quant int4 --group-size 64 {E}",
    "success",
    verify=check_emulator("E"),
    timeout=T_BUILD,
)
cli(
    "build-propagate-block-auto",
    "baseline",
    f"{BUILD} --propagate --allocate block --shrinkage auto {E}",
    "success",
    verify=check_emulator("E"),
    timeout=T_BUILD,
)
cli("correct", "baseline", f"{CORRECT} --out C", "success", verify=check_adapter("C"), fresh=True)
cli("correct-unclamped", "baseline", f"{CORRECT} --clamp none --out C", "success", verify=check_adapter("C"))
cli("merge", "baseline", f"{MERGE} --out M", "success", verify=check_merged("M"))
cli(
    "merge-dora",
    "baseline",
    "merge adapter_dora --original model --out M",
    "success",
    verify=check_merged("M", "model", "adapter_dora", exact=False),
)
cli("help", "baseline", "build --help", "success")
cli(
    "unicode-out-path",
    "baseline",
    [*BUILD.split(), "--out", "émù 😀 dir"],
    "success",
    verify=check_emulator("émù 😀 dir"),
    timeout=T_BUILD,
)
cli(
    "newline-in-out-path",
    "baseline",
    [*BUILD.split(), "--out", "a\nb"],
    "success",
    verify=check_emulator("a\nb"),
    timeout=T_BUILD,
)


# ---- kill / resume
def _same_dirs(a: Path, b: Path) -> str | None:
    fa, fb = _files_of(str(a)), _files_of(str(b))
    if fa.keys() != fb.keys():
        return f"{a.name} holds {sorted(fa)}, {b.name} {sorted(fb)}"
    diff = [n for n in fa if fa[n] != fb[n]]
    return f"{a.name} differs from the uninterrupted build in {diff}" if diff else None


def _kill_build(ctx: Ctx, ratio_first: str, ratio_then: str, damage: Callable[[Path], None] | None = None) -> Run:
    base = ["build", "model6", "--data", "data.txt", "--samples", "6"]
    ref = ctx.cli([*base, "--ratio", ratio_then, "--out", "R"], timeout=T_BUILD)
    if ref.rc != 0:
        ref.notes.append("the uninterrupted reference build failed")
        return ref
    partial = ctx.sandbox / ".E.partial"
    killed = ctx.cli(
        [*base, "--ratio", ratio_first, "--out", "E"],
        timeout=T_BUILD,
        slow=0.7,
        until=(partial / "block00001.json").exists,
    )
    notes = [] if killed.killed_on_purpose else ["the build ended before the kill"]
    if (ctx.sandbox / "E").exists():
        notes.append("the killed build left --out E")
    if damage is not None:
        damage(partial)
    rerun = ctx.cli([*base, "--ratio", ratio_then, "--out", "E"], timeout=T_BUILD)
    rerun.notes += notes
    if rerun.rc == 0:
        if ratio_first == ratio_then and damage is None and "resuming the build" not in rerun.stderr:
            rerun.verify = "the rerun did not resume the killed build"
        else:
            rerun.verify = _same_dirs(ctx.sandbox / "E", ctx.sandbox / "R")
        if rerun.verify is None and partial.exists():
            rerun.verify = ".E.partial left behind after a successful build"
    return rerun


@scenario(
    "build-sigkill-rerun", "resume", "success", writes=("E", "R", ".E.partial"), extra=("model6",), timeout=3 * T_BUILD
)
def _resume_same(ctx: Ctx) -> Run:
    """SIGKILL `emloc build model6 --data data.txt --out E` after 2 of 6 blocks, rerun it; compare with an uninterrupted build"""
    return _kill_build(ctx, "0.4", "0.4")


@scenario("build-sigkill-rerun-other-ratio", "resume", "success", writes=("E", "R", ".E.partial"), extra=("model6",))
def _resume_other(ctx: Ctx) -> Run:
    """SIGKILL a build (--ratio 0.4) mid-way, rerun with --ratio 0.3; compare with an uninterrupted --ratio 0.3 build"""
    return _kill_build(ctx, "0.4", "0.3")


@scenario("build-sigkill-damaged-block-rerun", "resume", "either", writes=("E", "R", ".E.partial"), extra=("model6",))
def _resume_damaged(ctx: Ctx) -> Run:
    """SIGKILL a build mid-way, truncate .E.partial/block00000.safetensors, rerun: refit or refuse, never crash"""

    def damage(partial: Path) -> None:
        f = partial / "block00000.safetensors"
        f.write_bytes(f.read_bytes()[:100])

    return _kill_build(ctx, "0.4", "0.4", damage)


@scenario("build-sigint", "resume", "error", writes=(".E.partial",), extra=("model6",))
def _interrupt(ctx: Ctx) -> Run:
    """Ctrl-C (SIGINT) during `emloc build model6 ... --out E`: a short message, no traceback, no --out"""
    partial = ctx.sandbox / ".E.partial"
    run = ctx.cli(
        ["build", "model6", "--data", "data.txt", "--out", "E"],
        timeout=T_BUILD,
        slow=0.7,
        until=(partial / "block00000.json").exists,
        kill_signal=signal.SIGINT,
    )
    run.killed_on_purpose = False  # its outcome is what counts
    if (ctx.sandbox / "E").exists():
        run.notes.append("--out E exists after the interrupt")
    return run


@scenario("finetune-sigkill-rerun", "resume", "success", writes=("run", ".run.partial"), timeout=2 * T_FT)
def _resume_finetune(ctx: Ctx) -> Run:
    """SIGKILL `emloc finetune ... --out run` once the training stage is recorded, rerun it"""
    argv = [*FT.split(), "--out", "run"]
    stages = ctx.sandbox / ".run.partial" / "stages.json"
    killed = ctx.cli(argv, timeout=T_FT, until=lambda: stages.is_file() and '"train"' in stages.read_text())
    rerun = ctx.cli(argv, timeout=T_FT)
    if not killed.killed_on_purpose:
        rerun.notes.append("the run ended before the kill")
    if rerun.rc == 0:
        if "resuming the run" not in rerun.stderr:
            rerun.verify = "the rerun did not resume (no 'resuming the run' on stderr)"
        else:
            rerun.verify = ctx.check(check_finetune("run"))
    return rerun


# ---- silent wrong results the review found
cli("emulator-as-original", "silent-build", f"build emu --data data.txt {E}", "error", timeout=T_BUILD)
cli("original-with-nan", "silent-build", f"build nan_model --data data.txt {E}", "error", timeout=T_BUILD)
cli("tokenizer-beyond-vocab", "silent-build", f"build small_vocab --data data.txt {E}", "error", timeout=T_BUILD)
cli(
    "truncated-original",
    "silent-build",
    f"{BUILD} {E}",
    "error",
    setup=truncate("model/model.safetensors"),
    timeout=T_BUILD,
)
cli(
    "original-missing-tensor",
    "silent-build",
    f"{BUILD} {E}",
    "error",
    setup=edit_tensors("model/model.safetensors", lambda s: s.pop("model.layers.1.mlp.up_proj.weight")),
    timeout=T_BUILD,
)
cli(
    "original-wrong-shape-tensor",
    "silent-build",
    f"{BUILD} {E}",
    "error",
    setup=edit_tensors(
        "model/model.safetensors", lambda s: s.update({"model.norm.weight": s["model.norm.weight"][:16].clone()})
    ),
    timeout=T_BUILD,
)
cli(
    "blank-calibration",
    "silent-build",
    f"build model --data blank.txt {E}",
    "error",
    setup=write("blank.txt", "\n  \n\t\n\n"),
)
cli(
    "empty-text-calibration",
    "silent-build",
    f"build model --data e.jsonl {E}",
    "error",
    setup=write("e.jsonl", jsonl([{"text": ""}] * 4)),
    timeout=T_BUILD,
)
cli(
    "one-token-calibration",
    "silent-build",
    f"build model --data one.txt {E}",
    "either",
    setup=write("one.txt", "a\n"),
    verify=check_emulator("E"),
    timeout=T_BUILD,
)
cli(
    "identical-calibration",
    "silent-build",
    f"build model --data same.txt {E}",
    "either",
    setup=write("same.txt", "good film\n" * 8),
    verify=check_emulator("E"),
    timeout=T_BUILD,
)
cli(
    "finetune-emulator-as-model",
    "silent-finetune",
    f"{FT.replace('--model model', '--model emu')} --out run",
    "error",
    timeout=T_FT,
)
cli(
    "finetune-original-with-nan",
    "silent-finetune",
    f"{FT.replace('--model model', '--model nan_model')} --out run",
    "error",
    timeout=T_FT,
)
cli(
    "finetune-tokenizer-beyond-vocab",
    "silent-finetune",
    f"{FT.replace('--model model', '--model small_vocab')} --out run",
    "error",
    timeout=T_FT,
)
cli("other-original", "silent-correct", "correct adapter --emulator emu --original model2 --out C", "error")
cli("emulator-as-original", "silent-correct", "correct adapter --emulator emu --original emu --out C", "error")
cli("original-as-emulator", "silent-correct", "correct adapter --emulator model --original model --out C", "error")
cli("wider-original", "silent-correct", "correct adapter --emulator emu --original wide --out C", "error")
cli(
    "original-with-nan-weight",
    "silent-correct",
    f"{CORRECT} --out C",
    "error",
    verify=check_adapter("C"),
    setup=edit_tensors(
        "model/model.safetensors", lambda s: s["model.layers.1.mlp.down_proj.weight"].__setitem__((3, 5), float("nan"))
    ),
)
cli(
    "stray-shard-in-emulator",
    "silent-correct",
    f"{CORRECT} --out C",
    "error",
    verify=check_adapter("C"),
    setup=lambda: _stray_shard("emu"),
)
cli(
    "stray-shard-in-original",
    "silent-correct",
    f"{CORRECT} --out C",
    "error",
    verify=check_adapter("C"),
    setup=lambda: _stray_shard("model", key="model.layers.0.self_attn.q_proj.weight"),
)
cli("bitflip-in-emulator", "silent-correct", f"{CORRECT} --out C", "error", setup=bitflip("emu/model.safetensors"))
cli("truncated-emulator", "silent-correct", f"{CORRECT} --out C", "error", setup=truncate("emu/model.safetensors"))
cli(
    "emulator-shard-missing",
    "silent-correct",
    f"{CORRECT} --out C",
    "error",
    setup=lambda: os.remove("emu/model.safetensors"),
)
cli(  # config.json's quantization_config describes the emulator on its own
    "emulator-without-emloc.json",
    "silent-correct",
    f"{CORRECT} --out C",
    "success",
    setup=lambda: os.remove("emu/emloc.json"),
)
cli("emulator-as-original", "silent-merge", "merge corrected --original emu --out M", "error")
cli(
    "adapter-with-nan",
    "silent-merge",
    f"{MERGE} --out M",
    "error",
    verify=check_merged("M"),
    setup=edit_tensors(
        "corrected/adapter_model.safetensors",
        lambda s: s["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].__setitem__((0, 0), float("nan")),
    ),
)
cli("truncated-original", "silent-merge", f"{MERGE} --out M", "error", setup=truncate("model/model.safetensors"))


def _stray_shard(directory: str, key: str = "model.layers.0.self_attn.q_proj.u") -> None:
    """A second safetensors file in ``directory`` holding a changed copy of one tensor."""
    from safetensors.torch import load_file, save_file

    state = load_file(f"{directory}/model.safetensors")
    save_file({key: state[key] * 2}, f"{directory}/zz-extra.safetensors", metadata={"format": "pt"})


# ---- --ratio
for name, ratio, expect in [
    ("word", "abc", "error"),
    ("empty", "''", "error"),
    ("zero", "0", "error"),
    ("one", "1", "error"),
    ("negative", "-0.5", "error"),
    ("nan", "nan", "error"),
    ("inf", "inf", "error"),
    ("1e-9", "1e-9", "error"),
    ("0.001", "0.001", "error"),
    ("denormal", "5e-324", "error"),
    ("comma-list", "0.4,0.5", "error"),
    ("bad-regex", "'(=0.3'", "error"),
    ("no-match", "nomatch=0.3", "error"),
    ("pair-above-1", "mlp=0.3,self_attn=1", "error"),
    ("pattern-twice", "mlp=0.3,mlp=0.4", "error"),
    ("hex", "0x1p-2", "error"),
]:
    cli(f"ratio-{name}", "malformed-ratio", f"{BUILD} --ratio {ratio} {E}", expect, timeout=T_BUILD)
cli(
    "ratio-0.9999999",
    "malformed-ratio",
    f"{BUILD} --ratio 0.9999999 {E}",
    "success",
    verify=check_emulator("E", 0.9999999),
    timeout=T_BUILD,
)
cli(
    "ratio-spaces",
    "malformed-ratio",
    [*BUILD.split(), "--ratio", " 0.4 ", "--out", "E"],
    "success",
    verify=check_emulator("E", 0.4),
    timeout=T_BUILD,
)
cli(
    "ratio-mlp-only",
    "malformed-ratio",
    f"{BUILD} --ratio mlp=0.3 {E}",
    "success",
    verify=check_emulator("E", 0.3, r"\.mlp\."),
    timeout=T_BUILD,
)
cli(
    "ratio-empty-pattern",
    "malformed-ratio",
    f"{BUILD} --ratio =0.3 {E}",
    "either",
    verify=check_emulator("E", 0.3),
    timeout=T_BUILD,
)
for value in ["0", "1", "nan", "-0.2", "1e-9"]:
    cli(f"finetune-ratio-{value}", "malformed-ratio", f"{FT} --ratio {value} --out run", "error", timeout=T_FT)


# ---- JSONL rows, unicode, text files
for name, body, expect in [
    ("no-text-field", jsonl([{"text": "good"}, {"label": "x"}]), "error"),
    ("text-number", jsonl([{"text": 3}]), "error"),
    ("text-null", jsonl([{"text": None}]), "error"),
    ("row-array", jsonl([["good film"]]), "error"),
    ("broken-json", '{"text": "good film"\n', "error"),
    ("deep-nesting", "[" * 100000 + "]" * 100000 + "\n", "error"),
    ("huge-integer", '{"text": "a", "n": ' + "9" * 5000 + "}\n", "error"),
    ("lone-surrogate", '{"text": "good \\ud800 film"}\n', "error"),
    ("bom-crlf", "\ufeff" + jsonl([{"text": "good film"}, {"text": "bad film"}]).replace("\n", "\r\n"), "success"),
    ("line-separators-in-strings", jsonl([{"text": "good\u2028film\u0085ok"}, {"text": "bad\u2029film"}]), "success"),
    ("nul-and-emoji", jsonl([{"text": "good\u0000film 😀 مرحبا 你好"}, {"text": "bad"}]), "success"),
    ("extra-fields", jsonl([{"text": "good film", "id": 1, "meta": {"a": [1]}}]), "success"),
]:
    cli(
        f"jsonl-{name}",
        "malformed-data",
        f"build model --data d.jsonl {E}",
        expect,
        setup=write("d.jsonl", body),
        verify=check_emulator("E") if expect == "success" else None,
        timeout=T_BUILD,
    )
cli(
    "latin1-text",
    "malformed-data",
    f"build model --data d.txt {E}",
    "error",
    setup=write("d.txt", b"caf\xe9 au lait\n"),
)
cli(
    "long-calibration-line",
    "malformed-data",
    f"build model --data d.txt {E}",
    "success",
    setup=write("d.txt", "good film " * 20000 + "\n"),
    verify=check_emulator("E"),
    timeout=T_BUILD,
)
cli(
    "many-calibration-lines",
    "malformed-data",
    f"build model --data d.txt --samples 100000 {E}",
    "success",
    setup=write("d.txt", "".join(f"review {i} was fine\n" for i in range(400))),
    verify=check_emulator("E"),
    timeout=T_BUILD,
)
cli("dev-null-data", "malformed-data", f"build model --data /dev/null {E}", "error")

TRAIN_FT = FT.replace("--data train.jsonl", "--data t.jsonl")
for name, rows, expect in [
    ("no-label", [*labelled(15), {"text": "good"}], "error"),
    ("label-number", [*labelled(15), {"text": "good", "label": 1}], "error"),
    ("one-label", labelled(16, ("positive",)), "error"),
    ("labels-share-first-token", labelled(16, ("very good", "very bad")), "error"),
    ("empty-label", labelled(16, ("positive", "")), "error"),
    ("too-few-rows", labelled(5), "error"),
]:
    labels = tuple(sorted({r.get("label") for r in rows if isinstance(r.get("label"), str)}))
    evaluation = write("ev.jsonl", jsonl(labelled(6, labels, offset=1)))  # the same labels as the training rows
    cli(
        f"train-{name}",
        "malformed-data",
        f"{TRAIN_FT.replace('eval.jsonl', 'ev.jsonl')} --out run",
        expect,
        setup=steps(write("t.jsonl", jsonl(rows)), evaluation),
        timeout=T_FT,
    )
cli(
    "eval-label-unseen",
    "malformed-data",
    f"{FT.replace('eval.jsonl', 'ev.jsonl')} --out run",
    "error",
    setup=write("ev.jsonl", jsonl(labelled(4, ("neutral", "positive")))),
    timeout=T_FT,
)
cli("data-without-eval-data", "malformed-data", "finetune --model model --data train.jsonl --out run", "error")
cli("eval-data-without-data", "malformed-data", "finetune --model model --eval-data eval.jsonl --out run", "error")
cli("task-and-data", "malformed-data", f"{FT} --task rt --out run", "error")


# ---- prompts
for name, prompt, expect in [
    ("no-placeholder", "{}", "error"),
    ("unclosed", "{text", "error"),
    ("upper-case", "{TEXT} is", "error"),
    ("empty", "", "error"),
]:
    cli(f"prompt-{name}", "malformed-prompt", [*FT.split(), "--prompt", prompt, "--out", "run"], expect, timeout=T_FT)
cli(
    "prompt-braces-and-percent",
    "malformed-prompt",
    [*FT.split(), "--prompt", '{"review": "{text}"} {0} %s {label} ->', "--out", "run"],
    "success",
    verify=check_finetune("run"),
    timeout=T_FT,
)


# ---- adapters: shapes, ranks, kinds
cli("wrong-shape-adapter", "malformed-adapter", "correct adapter_wide --emulator emu --original model --out C", "error")
cli("wrong-shape-adapter", "malformed-adapter-merge", "merge adapter_wide --original model --out M", "error")
cli("dora-adapter", "malformed-adapter", "correct adapter_dora --emulator emu --original model --out C", "error")
cli(
    "config-rank-mismatch",
    "malformed-adapter",
    f"{CORRECT} --out C",
    "error",
    setup=edit_json("adapter/adapter_config.json", lambda c: c.update(r=4)),
)
cli(
    "config-rank-mismatch",
    "malformed-adapter-merge",
    f"{MERGE} --out M",
    "error",
    setup=edit_json("corrected/adapter_config.json", lambda c: c.update(r=4)),
)
cli(
    "lora_B-missing",
    "malformed-adapter",
    f"{CORRECT} --out C",
    "error",
    setup=edit_tensors(
        "adapter/adapter_model.safetensors",
        lambda s: s.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"),
    ),
)
cli(
    "lora_B-missing",
    "malformed-adapter-merge",
    f"{MERGE} --out M",
    "error",
    setup=edit_tensors(
        "corrected/adapter_model.safetensors",
        lambda s: s.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"),
    ),
)
cli(
    "not-lora",
    "malformed-adapter",
    f"{CORRECT} --out C",
    "error",
    setup=edit_json("adapter/adapter_config.json", lambda c: c.update(peft_type="IA3")),
)
cli(
    "config-not-json",
    "malformed-adapter",
    f"{CORRECT} --out C",
    "error",
    setup=write("adapter/adapter_config.json", "{r: 2,"),
    match="adapter_config",
)
cli(
    "config-not-json",
    "malformed-adapter-merge",
    f"{MERGE} --out M",
    "error",
    setup=write("corrected/adapter_config.json", "{r: 2,"),
    match="adapter_config",
)


# ---- missing, empty, hub-like, directory-as-file, unreadable
for name, argv in [
    ("build-model", f"build nope --data data.txt {E}"),
    ("build-data", f"build model --data nope.txt {E}"),
    ("finetune-model", f"{FT.replace('--model model', '--model nope')} --out run"),
    ("finetune-data", f"{FT.replace('train.jsonl', 'nope.jsonl')} --out run"),
    ("correct-adapter", "correct nope --emulator emu --original model --out C"),
    ("correct-emulator", "correct adapter --emulator nope --original model --out C"),
    ("correct-original", "correct adapter --emulator emu --original nope --out C"),
    ("merge-adapter", "merge nope --original model --out M"),
    ("merge-original", "merge corrected --original nope --out M"),
]:
    cli(f"missing-{name}", "malformed-missing", argv, "error")
for name, argv in [
    ("build", f"build HuggingFaceTB/SmolLM2-135M-Instruct --data data.txt {E}"),
    ("build-org-name", f"build some-org/some-model --data data.txt {E}"),
    ("build-url", f"build https://huggingface.co/org/model --data data.txt {E}"),
    ("finetune", f"{FT.replace('--model model', '--model some-org/some-model')} --out run"),
    ("correct", "correct adapter --emulator emu --original some-org/some-model --out C"),
    ("merge", "merge corrected --original some-org/some-model --out M"),
    ("correct-adapter", "correct some-org/adapter --emulator emu --original model --out C"),
]:
    cli(f"hub-id-{name}", "malformed-hub", argv, "error")
for name, argv, setup in [
    ("data-txt", f"build model --data d.txt {E}", write("d.txt", "")),
    ("data-jsonl", f"build model --data d.jsonl {E}", write("d.jsonl", "")),
    ("train-jsonl", f"{TRAIN_FT} --out run", write("t.jsonl", "")),
    ("model-config", f"{BUILD} {E}", write("model/config.json", "")),
    ("model-weights", f"{BUILD} {E}", write("model/model.safetensors", "")),
    ("adapter-config", f"{CORRECT} --out C", write("adapter/adapter_config.json", "")),
    ("adapter-weights", f"{CORRECT} --out C", write("adapter/adapter_model.safetensors", "")),
    ("adapter-weights-merge", f"{MERGE} --out M", write("corrected/adapter_model.safetensors", "")),
    ("emloc.json", f"{CORRECT} --out C", write("emu/emloc.json", "")),
    ("emulator-weights", f"{CORRECT} --out C", write("emu/model.safetensors", "")),
]:
    file = {"adapter-config": "adapter_config.json", "emloc.json": "emloc.json", "model-config": "config.json"}.get(
        name
    )
    cli(f"empty-{name}", "malformed-empty", argv, "error", setup=setup, timeout=T_BUILD, match=file and re.escape(file))
cli(
    "model-config-not-json", "malformed-empty", f"{BUILD} {E}", "error", setup=write("model/config.json", "{'no': json")
)
cli(
    "model-config-no-architectures",
    "malformed-empty",
    f"{BUILD} {E}",
    "error",
    setup=edit_json("model/config.json", lambda c: c.pop("architectures")),
)
DIR_FILE_MATCH = {
    "emulator-is-file": "is a file|not a directory",
    "original-is-file": "is a file|not a directory",
    "merge-adapter-is-file": "is a file|not a directory",
    "adapter-is-file": "is a file|not a directory",
}
for name, argv in [
    ("data-is-dir", f"build model --data other {E}"),
    ("train-data-is-dir", f"{FT.replace('train.jsonl', 'other')} --out run"),
    ("eval-data-is-dir", f"{FT.replace('eval.jsonl', 'other')} --out run"),
    ("model-is-file", f"build data.txt --data data.txt {E}"),
    ("adapter-is-file", "correct note.txt --emulator emu --original model --out C"),
    ("emulator-is-file", "correct adapter --emulator note.txt --original model --out C"),
    ("original-is-file", "correct adapter --emulator emu --original note.txt --out C"),
    ("merge-adapter-is-file", "merge note.txt --original model --out M"),
    ("merge-original-is-file", "merge corrected --original note.txt --out M"),
    ("adapter-is-empty-dir", "correct other/sub --emulator emu --original model --out C"),
]:
    cli(name, "malformed-dir-file", argv, "error", match=DIR_FILE_MATCH.get(name))
for name, argv, setup in [
    ("data", f"{BUILD} {E}", chmod("data.txt", 0)),
    ("model-config", f"{BUILD} {E}", chmod("model/config.json", 0)),
    ("model-weights", f"{BUILD} {E}", chmod("model/model.safetensors", 0)),
    ("model-dir", f"{BUILD} {E}", chmod("model", 0)),
    ("train-data", f"{FT} --out run", chmod("train.jsonl", 0)),
    ("adapter-weights", f"{CORRECT} --out C", chmod("adapter/adapter_model.safetensors", 0)),
    ("emulator-weights", f"{CORRECT} --out C", chmod("emu/model.safetensors", 0)),
    ("merge-adapter-weights", f"{MERGE} --out M", chmod("corrected/adapter_model.safetensors", 0)),
]:
    cli(
        f"unreadable-{name}",
        "malformed-unreadable",
        argv,
        "error",
        setup=setup,
        nocaps=True,
        timeout=T_BUILD,
        match="ermission|cannot be read",
    )


# ---- argument edge cases
for name, extra, expect in [
    ("samples-0", "--samples 0", "error"),
    ("samples--1", "--samples -1", "error"),
    ("samples-huge", "--samples 99999999999999999999999999", "success"),
    ("samples-float", "--samples 1.5", "error"),
    ("group-size-32", "--group-size 32", "error"),
    ("group-size--1", "--group-size -1", "error"),
    ("shrinkage--1", "--shrinkage -1", "error"),
    ("shrinkage-nan", "--shrinkage nan", "error"),
    ("shrinkage-inf", "--shrinkage inf", "error"),
    ("shrinkage-word", "--shrinkage abc", "error"),
    ("dtype-float64", "--dtype float64", "error"),
    ("dtype-float16", "--dtype float16", "either"),
    ("dtype-bfloat16", "--dtype bfloat16", "success"),
    ("quant-int2", "--quant int2", "error"),
    ("device-bogus", "--device bogus", "error"),
    ("device-meta", "--device meta", "error"),
    ("device-cuda-9", "--device cuda:9", "error"),
    ("unknown-option", "--ratios 0.4", "error"),
]:
    verify = check_emulator("E") if expect != "error" else None
    cli(
        f"build-{name}",
        "args-build",
        f"build model --data data.txt {extra} {E}",
        expect,
        verify=verify,
        timeout=T_BUILD,
    )
cli("build-missing-out", "args-build", "build model --data data.txt", "error")
cli("no-command", "args-cli", [], "error", fresh=True)
cli("unknown-command", "args-cli", "train model", "error")
cli("merge-extra-positional", "args-cli", f"{MERGE} extra --out M", "error")

FT_MATCH = {
    "validation-samples--1": "validation",
    "seed-2^64": "seed",
    "lora-rank-0": "lora-rank",
    "lora-rank--1": "lora-rank",
    "lr-nan": "lr|learning rate",
    "lr--1": "lr|learning rate",
}
for name, extra, expect in [
    ("steps-0", "--steps 0", "error"),
    ("steps--1", "--steps -1", "error"),
    ("steps-huge", "--steps 100000000000000000000", "error"),
    ("steps-float", "--steps 1e3", "error"),
    ("batch-size-0", "--batch-size 0", "error"),
    ("batch-size--1", "--batch-size -1", "error"),
    ("batch-size-huge", "--batch-size 1000000000", "error"),
    ("lora-rank-0", "--lora-rank 0", "error"),
    ("lora-rank--1", "--lora-rank -1", "error"),
    ("lora-rank-huge", "--lora-rank 1000000000000", "error"),
    ("calibration-samples-0", "--calibration-samples 0", "error"),
    ("calibration-samples--1", "--calibration-samples -1", "error"),
    ("validation-samples-0", "--validation-samples 0", "error"),
    ("validation-samples--1", "--validation-samples -1", "error"),
    ("validation-samples-huge", "--validation-samples 1000000000", "error"),
    ("eval-samples-0", "--eval-samples 0", "error"),
    ("eval-samples--1", "--eval-samples -1", "error"),
    ("samples-huge-seed--1", "--calibration-samples 1000000000 --eval-samples 1000000000 --seed -1", "success"),
    ("lr-nan", "--lr nan", "error"),
    ("lr-inf", "--lr inf", "error"),
    ("lr--1", "--lr -1", "error"),
    ("seed-2^64", "--seed 18446744073709551616", "either"),
    ("seed-word", "--seed abc", "error"),
    ("transfer-junk", "--transfer junk", "error"),
    ("transfer-0", "--transfer 0", "error"),
    ("transfer-nan", "--transfer nan", "error"),
    ("transfer-inf", "--transfer inf", "error"),
    ("transfer-aware-2", "--transfer aware:2", "error"),
    ("clamp-junk", "--clamp junk", "error"),
    ("group-size-32", "--group-size 32", "error"),
    ("quant-int2", "--quant int2", "error"),
    ("shrinkage--1", "--shrinkage -1", "error"),
    ("device-bogus", "--device bogus", "error"),
    ("task-unknown", "--task nope", "error"),
]:
    argv = f"{FT} {extra} --out run".replace("--steps 1 ", "") if "--steps" in extra else f"{FT} {extra} --out run"
    argv = argv.replace("--batch-size 2 ", "") if "--batch-size" in extra else argv
    argv = argv.replace("--calibration-samples 4 ", "") if "--calibration-samples" in extra else argv
    argv = argv.replace("--validation-samples 4 ", "") if "--validation-samples" in extra else argv
    argv = argv.replace("--transfer L=3", "") if "--transfer" in extra or "--clamp" in extra else argv
    verify = check_finetune("run") if expect in ("success", "either") else None
    cli(
        f"finetune-{name}",
        "args-finetune",
        argv,
        expect,
        verify=verify,
        timeout=30 if expect == "runs" else T_FT,
        match=FT_MATCH.get(name),
    )

for name, clamp, expect in [
    ("0", "0", "error"),
    ("-1", "-1", "error"),
    ("nan", "nan", "error"),
    ("inf", "inf", "error"),
    ("word", "abc", "error"),
    ("off", "off", "success"),
]:
    cli(
        f"correct-clamp-{name}",
        "args-correct",
        f"{CORRECT} --clamp {clamp} --out C",
        expect,
        verify=check_adapter("C") if expect == "success" else None,
        match="clamp",
    )


# ---- library API
def _emulator_of(path: str = "model") -> Any:
    from emloc_kernels import build_emulator

    return build_emulator(_model(path), _texts(), 0.4, tokenizer=_tok(path), progress=False)


@api("build-empty-calibration", "error")
def _api1() -> None:
    """build_emulator(model, [], 0.4, tokenizer=tok)"""
    from emloc_kernels import build_emulator

    build_emulator(_model(), [], 0.4, tokenizer=_tok(), progress=False)


@api("build-texts-without-tokenizer", "error")
def _api2() -> None:
    """build_emulator(model, ['good film'], 0.4)"""
    from emloc_kernels import build_emulator

    build_emulator(_model(), ["good film"], 0.4, progress=False)


@api("build-ratio-1.5", "error")
def _api3() -> None:
    """build_emulator(model, texts, 1.5, tokenizer=tok)"""
    from emloc_kernels import build_emulator

    build_emulator(_model(), _texts(), 1.5, tokenizer=_tok(), progress=False)


@api("build-on-an-emulator", "error")
def _api4() -> None:
    """build_emulator(load_emulator('emu'), texts, 0.4, tokenizer=tok)"""
    from emloc_kernels import build_emulator, load_emulator

    build_emulator(load_emulator("emu"), _texts(), 0.4, tokenizer=_tok(), progress=False)


@api("build-token-id-beyond-vocab", "error")
def _api5() -> None:
    """build_emulator(model, [tensor([[1, 2, 10**6]])], 0.4)"""
    import torch

    from emloc_kernels import build_emulator

    build_emulator(_model(), [torch.tensor([[1, 2, 10**6]])], 0.4, progress=False)


@api("build-quant-int3", "error")
def _api6() -> None:
    """build_emulator(model, texts, 0.4, tokenizer=tok, quant='int3')"""
    from emloc_kernels import build_emulator

    build_emulator(_model(), _texts(), 0.4, tokenizer=_tok(), quant="int3", progress=False)


@api("build-checkpoint-is-a-file", "error")
def _api7() -> None:
    """build_emulator(model, texts, 0.4, tokenizer=tok, checkpoint='note.txt')"""
    from emloc_kernels import build_emulator

    build_emulator(_model(), _texts(), 0.4, tokenizer=_tok(), checkpoint="note.txt", progress=False)


@api("build-checkpoint-in-a-user-dir-with-build.json", "error", setup=write("other/build.json", '{"tool": "make"}'))
def _api8() -> None:
    """build_emulator(model, texts, 0.4, tokenizer=tok, checkpoint='other') where other/ is a user's directory holding a build.json"""
    from emloc_kernels import build_emulator

    build_emulator(_model(), _texts(), 0.4, tokenizer=_tok(), checkpoint="other", progress=False)


@api("save-a-plain-model", "error")
def _api9() -> None:
    """save_emulator(model, 'E') of a model that is no emulator"""
    from emloc_kernels import save_emulator

    save_emulator(_model(), "E")


@api("save-into-the-original", "error")
def _api10() -> None:
    """save_emulator(emulator, 'model', overwrite=True)"""
    from emloc_kernels import save_emulator

    save_emulator(_emulator_of(), "model", overwrite=True)


@api("save-over-a-user-file", "error")
def _api11() -> None:
    """save_emulator(emulator, 'note.txt', overwrite=True)"""
    from emloc_kernels import save_emulator

    save_emulator(_emulator_of(), "note.txt", overwrite=True)


@api("save-and-load", "success", writes="E", verify=check_emulator("E", 0.4))
def _api12() -> None:
    """save_emulator(build_emulator(model, texts, 0.4, tokenizer=tok), 'E')"""
    from emloc_kernels import save_emulator

    save_emulator(_emulator_of(), "E")


@api("load-an-original", "error")
def _api13() -> None:
    """load_emulator('model')"""
    from emloc_kernels import load_emulator

    load_emulator("model")


@api("load-missing", "error")
def _api14() -> None:
    """load_emulator('nope')"""
    from emloc_kernels import load_emulator

    load_emulator("nope")


for _name, _setup in [
    ("stray-shard", lambda: _stray_shard("emu")),
    ("bitflip", bitflip("emu/model.safetensors")),
    ("truncated", truncate("emu/model.safetensors")),
    ("shard-missing", lambda: os.remove("emu/model.safetensors")),
    ("unknown-architecture", edit_json("emu/emloc.json", lambda m: m.update(architecture="NoSuchForCausalLM"))),
    ("emloc.json-not-json", write("emu/emloc.json", "{")),
    ("module-entry-missing", edit_json("emu/emloc.json", lambda m: m["modules"].pop("model.layers.0.mlp.up_proj"))),
]:

    def _load(name: str = _name) -> None:
        from emloc_kernels import load_emulator

        load_emulator("emu")

    _load.__doc__ = f"load_emulator('emu') with emu/ damaged: {_name}"
    api(f"load-{_name}", "error", setup=_setup, match="emloc.json" if "json" in _name else None)(_load)


@api("correct-out-is-the-adapter", "error")
def _api15() -> None:
    """correct_adapter('adapter', 'emu', 'model', 'adapter', overwrite=True)"""
    from emloc_kernels import correct_adapter

    correct_adapter("adapter", "emu", "model", "adapter", overwrite=True, progress=False)


@api("correct-other-original-object", "error", extra=("model2",))
def _api16() -> None:
    """correct_adapter('adapter', 'emu', <model2 loaded>, 'C')"""
    from emloc_kernels import correct_adapter

    correct_adapter("adapter", "emu", _model("model2"), "C", progress=False)


@api("correct-clamp-nan", "error")
def _api17() -> None:
    """correct_adapter('adapter', 'emu', 'model', 'C', clamp=nan)"""
    from emloc_kernels import correct_adapter

    correct_adapter("adapter", "emu", "model", "C", clamp=float("nan"), progress=False)


@api("correct-objects", "success", writes="C", verify=check_adapter("C"))
def _api18() -> None:
    """correct_adapter(<PeftModel on the loaded emulator>, <loaded emulator>, <loaded original>, 'C')"""
    from peft import PeftModel

    from emloc_kernels import correct_adapter, load_emulator

    emu = load_emulator("emu")
    correct_adapter(PeftModel.from_pretrained(emu, "adapter"), emu, _model(), "C", progress=False)


@api("correct-emulator-object-as-original", "error")
def _api19() -> None:
    """correct_adapter('adapter', 'emu', <loaded emulator>, 'C')"""
    from emloc_kernels import correct_adapter, load_emulator

    correct_adapter("adapter", "emu", load_emulator("emu"), "C", progress=False)


@api("merge-into-an-emulator-dir", "error")
def _api20() -> None:
    """merge_adapter('emu', 'corrected')"""
    from emloc_kernels import merge_adapter

    merge_adapter("emu", "corrected")


@api("merge-adapter-of-another-shape", "error", extra=("wide",))
def _api21() -> None:
    """merge_adapter(<loaded wide model>, 'corrected')"""
    from emloc_kernels import merge_adapter

    merge_adapter(_model("wide"), "corrected")


def _transfer(
    original: Any = "model", calibration: Any = None, out: str = "T", adapter: str = "adapter", **kw: Any
) -> None:
    from emloc_kernels.transfer import transfer_adapter  # not exported by emloc_kernels itself

    calib = _texts() if calibration is None else calibration
    transfer_adapter(adapter, "emu", original, calib, out, tokenizer=_tok(), progress=False, **kw)


@api("transfer", "success", writes="T", verify=check_adapter("T"))
def _api22() -> None:
    """transfer_adapter('adapter', 'emu', 'model', texts, 'T', tokenizer=tok)"""
    _transfer()


for _name, _kw, _extra in [
    ("other-original", dict(original="model2"), ("model2",)),
    ("emulator-as-original", dict(original="emu"), ()),
    ("empty-calibration", dict(calibration=[]), ()),
    ("empty-texts", dict(calibration=["", "", ""]), ()),
    ("lam-nan", dict(lam=float("nan")), ()),
    ("lam-pattern-matching-nothing", dict(lam={"nomatch": 1.0}), ()),
    ("ridge-negative", dict(ridge=-1.0), ()),
    ("out-is-the-emulator", dict(out="emu", overwrite=True), ()),
    ("dora-adapter", dict(adapter="adapter_dora"), ("adapter_dora",)),
    ("wide-adapter", dict(adapter="adapter_wide"), ("adapter_wide",)),
]:

    def _t(kw: dict = _kw) -> None:
        _transfer(**kw)

    _t.__doc__ = f"transfer_adapter(...) with {_name}: {_kw}"
    api(f"transfer-{_name}", "error", extra=_extra)(_t)


if __name__ == "__main__":
    main()
