"""The ops inside real training machinery: custom-op registration, torch.compile,
non-reentrant checkpointing, and a few LoRA steps on a tiny Llama emulator."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from emloc_kernels import LowRankLinear, ops
from emloc_kernels.ops import lowrank_lora_reference

from kernel_utils import DEVICES, rel_err, strided, tol


def _small(device, dtype=torch.float32, lora_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, dt=dtype: torch.randn(*s, generator=g).to(device=device, dtype=dt)  # noqa: E731
    x = r(3, 11, 21)
    u, v = r(17, 9) / 3, r(9, 21) / 5
    a, b = (r(4, 21, dt=lora_dtype) / 5).requires_grad_(), r(17, 4, dt=lora_dtype).requires_grad_()
    bias = r(17).requires_grad_()
    return x.requires_grad_(), u, v, a, b, bias


@pytest.mark.no_launch  # on CPU: the registration is checked with the torch reference
@pytest.mark.parametrize("device", DEVICES)
def test_custom_ops_pass_opcheck(device):
    """Schema, fake (meta) functions and autograd registration agree with the real ops."""
    x, u, v, a, b, bias = _small(device)
    x2 = x.detach().reshape(-1, 21).requires_grad_()
    args = (x2, u, None, None, v, None, None, a, b, 0.5, bias, [0, 0, 0, 0])
    w = (u @ v).contiguous()
    with ops.force_reference(device == "cpu"):  # opcheck runs each op many times
        torch.library.opcheck(torch.ops.emloc.lowrank_lora_fwd.default, args)
        torch.library.opcheck(torch.ops.emloc.dense_lora_fwd.default, (x2, w, a, b, 0.5, bias))


@pytest.mark.no_launch  # on CPU: tracing is checked with the torch reference
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    """fullgraph tracing through the custom ops, forward and backward; on CPU with the
    reference path and the cheap aot_eager backend, on CUDA with inductor and the kernels."""
    backend = "aot_eager" if device == "cpu" else "inductor"
    x, u, v, a, b, bias = _small(device)
    w = (u @ v).contiguous()

    def f(x, a, b, bias):
        h = ops.lowrank_lora(x, u, v, a, b, 0.5, bias)
        return ops.dense_lora(torch.relu(h) @ w, w, a, b, 2.0).square().mean()

    torch._dynamo.reset()
    try:
        with ops.force_reference(device == "cpu"):
            loss = torch.compile(f, fullgraph=True, backend=backend)(x, a, b, bias)
            got = torch.autograd.grad(loss, (x, a, b, bias))
    finally:
        torch._dynamo.reset()
    with ops.force_reference():
        want_loss = f(x, a, b, bias)
        want = torch.autograd.grad(want_loss, (x, a, b, bias))
    assert rel_err(loss, want_loss) < tol(torch.float32, device)
    for gv, wv in zip(got, want):
        assert rel_err(gv, wv) < tol(torch.float32, device)


@pytest.mark.parametrize("device", DEVICES)
def test_non_reentrant_checkpointing(device):
    """Recomputing the forward under checkpoint(use_reentrant=False) gives the same grads."""
    x, u, v, a, b, bias = _small(device, dtype=torch.bfloat16)
    block = lambda x, a, b, bias: torch.tanh(ops.lowrank_lora(x, u, v, a, b, 0.5, bias)) @ u  # noqa: E731
    plain = torch.autograd.grad(block(x, a, b, bias).float().sum(), (x, a, b, bias))
    ckpt = torch.autograd.grad(checkpoint(block, x, a, b, bias, use_reentrant=False).float().sum(), (x, a, b, bias))
    for p, c in zip(plain, ckpt):
        assert torch.equal(p, c)


# ----------------------------------------------------------------------------- tiny Llama


class _LoRALowRank(nn.Module):
    """Minimal LoRA around a LowRankLinear (stands in for the PEFT layer in these tests)."""

    def __init__(self, base: LowRankLinear, rank: int, alpha: float, fused: bool, g: torch.Generator) -> None:
        super().__init__()
        self.base, self.scaling, self.fused = base, alpha / rank, fused
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, generator=g) / base.in_features**0.5)
        self.lora_b = nn.Parameter(
            torch.randn(base.out_features, rank, generator=g) * 0.1
        )  # non-zero: LoRA acts at step 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = ops.lowrank_lora if self.fused else lowrank_lora_reference
        return fn(x, self.base.u, self.base.v, self.lora_a, self.lora_b, self.scaling, self.base.bias)


def _tiny_llama_emulator(fused: bool, device: str) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(1)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if not isinstance(lin, nn.Linear):
                    continue
                w = lin.weight.detach()
                rank = int(w.shape[0] * w.shape[1] * 0.4 / sum(w.shape))
                uu, s, vh = torch.linalg.svd(w, full_matrices=False)
                u, v = uu[:, :rank] * s[:rank].sqrt(), s[:rank].sqrt()[:, None] * vh[:rank]
                base = LowRankLinear.from_factors(u.contiguous(), v.contiguous())
                setattr(parent, name, _LoRALowRank(base, rank=4, alpha=8.0, fused=fused, g=g))
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, _LoRALowRank):
            m.lora_a.requires_grad_(True)
            m.lora_b.requires_grad_(True)
    return model.to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_tiny_llama_training_matches_reference(device):
    """Three AdamW steps of LoRA on a tiny Llama emulator: fused ops vs the torch reference."""
    models = [_tiny_llama_emulator(fused, device) for fused in (True, False)]
    assert sum(isinstance(m, _LoRALowRank) for m in models[0].modules()) == 14
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(2)).to(device)
    losses = []
    for model in models:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        run = []
        for _ in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses.append(run)
    fused, ref = losses
    assert fused[-1] < fused[0]  # training moved
    assert fused == pytest.approx(ref, rel=1e-4 if device == "cpu" else 2e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_op_outputs_match_fake_strides(device):
    """Compiled graphs trust the fake functions' layouts: real outputs must be laid out alike,
    also for non-contiguous inputs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, u, v, a, b, bias = (t.detach() for t in _small(device))
    x2, a, b = strided(x.reshape(-1, 21)), strided(a), strided(b)  # column-major layouts
    w = (u @ v).contiguous()
    y, t_a = torch.ops.emloc.lowrank_lora_fwd(x2, u, None, None, v, None, None, a, b, 0.5, bias, [0, 0, 0, 0])
    dy = strided(torch.randn_like(y))
    calls = [
        (torch.ops.emloc.lowrank_lora_fwd, (x2, u, None, None, v, None, None, a, b, 0.5, bias, [0, 0, 0, 0])),
        (torch.ops.emloc.lowrank_lora_bwd, (dy, x2, t_a, u, None, None, v, None, None, a, b, 0.5, [0, 0, 0, 0], True)),
        (torch.ops.emloc.dense_lora_fwd, (x2, w, a, b, 0.5, bias)),
        (torch.ops.emloc.dense_lora_bwd, (dy, x2, t_a, w, a, b, 0.5, True)),
    ]
    for op, args in calls:
        real = op(*args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = op(*[mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args])
        for r, f in zip(real, fake):
            assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype), op


def test_eager_calls_skip_the_dispatcher(monkeypatch):
    """An eager call runs the op's body without the dispatcher, with the op's exact result:
    directly without autograd, under a plain autograd.Function with gradients to record.
    Under a dispatch mode (as tracing uses) or vmap the registered op runs."""
    import importlib

    from torch.utils._python_dispatch import TorchDispatchMode

    mod = importlib.import_module("emloc_kernels.ops.lowrank_lora")
    body_calls = []  # eager forwards: the body, or a replay of its launches (the Triton path)
    body, replay = mod._lowrank_fwd_body, mod._Replay.forward
    monkeypatch.setattr(mod, "_lowrank_fwd_body", lambda *a: body_calls.append(1) or body(*a))
    monkeypatch.setattr(mod._Replay, "forward", lambda self, *a: body_calls.append(1) or replay(self, *a))
    seen = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    x, u, v, a, b, bias = _small("cpu")
    with torch.no_grad():
        direct = ops.lowrank_lora(x, u, v, a, b, 0.5, bias)
        assert body_calls == [1]
        with Log():
            via_op = ops.lowrank_lora(x, u, v, a, b, 0.5, bias)
    assert torch.ops.emloc.lowrank_lora_fwd.default in seen and body_calls == [1]
    torch.testing.assert_close(direct, via_op, rtol=0, atol=0)
    with torch.no_grad():  # under vmap the op runs (torch loops over it: no batching rule)
        mapped = torch.vmap(lambda xi: ops.lowrank_lora(xi, u, v, a, b, 0.5, bias))(x)
    assert body_calls == [1]
    torch.testing.assert_close(mapped, direct)  # per-sample GEMMs may block differently
    with_grad = ops.lowrank_lora(x, u, v, a, b, 0.5, bias)
    node = with_grad.grad_fn.next_functions[0][0]  # under the reshape's view
    assert body_calls == [1, 1] and type(node).__name__ == "_LowRankLoraBackward"
    torch.testing.assert_close(with_grad.detach(), direct, rtol=0, atol=0)
    seen.clear()
    with Log():
        traced = ops.lowrank_lora(x, u, v, a, b, 0.5, bias)
    assert torch.ops.emloc.lowrank_lora_fwd.default in seen and body_calls == [1, 1]
    (g_eager,) = torch.autograd.grad(with_grad.square().sum(), a)
    (g_op,) = torch.autograd.grad(traced.square().sum(), a)
    torch.testing.assert_close(g_eager, g_op, rtol=0, atol=0)
