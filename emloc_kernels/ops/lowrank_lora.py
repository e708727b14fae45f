"""Low-rank emulator matmul with its LoRA branch, and dense + LoRA.

``lowrank_lora`` = ``x vᵀ uᵀ + s·x Aᵀ Bᵀ + b`` in two passes instead of four:
shrink ``[t_v | t_A] = x·[v; A]ᵀ`` (``gemm_2n``: one read of x), expand
``y = [t_v | t_A]·[u | s·B]ᵀ + b`` (``gemm_2k``).  Backward: ``[dt_v | dt_A] = dy·[u | s·B]``,
``dx = [dt_v | dt_A]·[v; A]``, ``dB = s·dyᵀ t_A``, ``dA = dt_Aᵀ x``; only x and the small
``t_A`` are saved.  ``dense_lora`` = ``[x | s·t_A]·[W | B]ᵀ + b`` the same way.

Both are torch custom ops (``emloc::*``) with fake and autograd registrations, so
``torch.compile(fullgraph=True)``, non-reentrant checkpointing and autocast (inputs are cast
like ``F.linear`` casts them) work; an eager call runs the op's bodies without the
dispatcher: directly when it records no gradient (inference, decode), else under a plain
``torch.autograd.Function`` (see ``_eager``).  Gradients flow
to x, lora_a, lora_b and bias; the frozen factors u, v (or weight) must not require grad -- a clear error is raised instead
(train them through ``lowrank_lora_reference``).  LoRA dropout is not an argument: with
dropout > 0 the LoRA branch sees a different x, so callers use the unfused path.
``u``/``v`` may be a :class:`~emloc_kernels.ops.quant.PackedFactor`; the Triton kernels then
dequantise inside the tile loop.  Backend choice: :func:`emloc_kernels.ops.gemm.use_triton`.
"""

from __future__ import annotations

import functools
import weakref
from typing import Callable, Optional, Union

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .gemm import Gemms, use_triton
from .quant import QUANT_MODES, PackedFactor, PackedOperand

Factor = Union[torch.Tensor, PackedFactor]
_ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- argument checks


def _autocast(x: torch.Tensor, *ts):
    """Cast floating tensors to the autocast dtype when autocast is on, as ``F.linear`` would."""
    if not isinstance(x, torch.Tensor) or not torch.is_autocast_enabled(x.device.type):
        return (x, *ts)
    dt = torch.get_autocast_dtype(x.device.type)
    cast = lambda t: t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
    return tuple(cast(t) for t in (x, *ts))


def _check_2d(op: str, name: str, t, shape: tuple[int, int], x: torch.Tensor) -> None:
    if isinstance(t, (PackedFactor, torch.Tensor)):  # a PackedFactor checks its layout when it is made
        got, dev = tuple(t.shape), t.device
    else:
        raise TypeError(
            f"{op}: {name} must be a torch.Tensor{' or PackedFactor' if name in 'uv' else ''}, got {type(t).__name__}"
        )
    if got != shape:
        raise ValueError(f"{op}: {name} must have shape {shape}, got {got}")
    if dev != x.device:
        raise ValueError(f"{op}: {name} is on {dev} but x is on {x.device}")


def _check_x(op: str, x, in_f: int) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim < 1 or x.dtype not in _ACT_DTYPES:
        raise ValueError(
            f"{op}: x must be a float32/float16/bfloat16 tensor of shape (..., in_features), got "
            f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}"
        )
    if x.shape[-1] != in_f:
        raise ValueError(f"{op}: x's last dimension must be in_features={in_f}, got shape {tuple(x.shape)}")


def _check(op, x, frozen: dict, out_f: int, in_f: int, lora_a, lora_b, bias) -> None:
    """Shapes, dtypes and devices; messages name the argument and what is allowed."""
    for name, f in frozen.items():
        if isinstance(f, torch.Tensor):
            if f.dtype != x.dtype:
                raise ValueError(f"{op}: {name} must have x's dtype {x.dtype}, got {f.dtype}")
            if f.requires_grad and torch.is_grad_enabled():
                raise ValueError(
                    f"{op}: {name} is a frozen factor and must not require grad (use {op}_reference to train it; "
                    "FSDP1 makes frozen parameters that share a flat parameter with trainable ones require grad: "
                    "shard with FSDP2 instead, torch's fully_shard or accelerate's fsdp_version: 2)"
                )
    if (lora_a is None) != (lora_b is None):
        raise ValueError(f"{op}: lora_a and lora_b must be given together")
    if lora_a is not None:
        rho = lora_a.shape[0] if isinstance(lora_a, torch.Tensor) and lora_a.ndim == 2 else -1
        _check_2d(op, "lora_a", lora_a, (rho, in_f), x)
        _check_2d(op, "lora_b", lora_b, (out_f, rho), x)
        if rho < 1:
            raise ValueError(f"{op}: lora_a must be rank×in_features with rank >= 1, got {tuple(lora_a.shape)}")
        if lora_a.dtype != lora_b.dtype or lora_a.dtype not in (x.dtype, torch.float32):
            raise ValueError(
                f"{op}: lora_a and lora_b must share a dtype, float32 or x's ({x.dtype}); "
                f"got {lora_a.dtype} and {lora_b.dtype}"
            )
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (out_f,) or bias.dtype != x.dtype:
            raise ValueError(
                f"{op}: bias must be a ({out_f},) tensor of x's dtype {x.dtype}, got "
                f"{getattr(bias, 'dtype', type(bias).__name__)} {tuple(getattr(bias, 'shape', ()))}"
            )
        if bias.device != x.device:
            raise ValueError(f"{op}: bias is on {bias.device} but x is on {x.device}")


def _no_tracing_or_modes() -> bool:
    """Not tracing (torch.compile), no dispatch or function mode, no functorch transform (vmap)."""
    return not (
        torch.compiler.is_compiling()
        or torch._C._is_torch_function_mode_enabled()
        or _get_current_dispatch_mode()
        or torch._C._are_functorch_transforms_active()
    )


# plain tensors: a Parameter is one (a subclass such as DTensor or FakeTensor is not)
_PLAIN = (torch.Tensor, torch.nn.Parameter, PackedFactor)


def _eager(*tensors) -> bool:
    """Whether a call may bypass the registered custom op: no tracing, modes or transforms, plain
    tensors only.  The op's dispatcher round trips (Python → C++ → autograd → Python) cost more
    than the kernel launches at small shapes; everything that needs the registered op still
    gets it."""
    return _no_tracing_or_modes() and all(t is None or type(t) in _PLAIN for t in tensors)


def _records_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _lora_dtype(x: torch.Tensor, lora: Optional[torch.Tensor]) -> torch.dtype:
    """dtype of ``t_A = x Aᵀ``: the LoRA branch runs in the adapter's dtype (as the reference)."""
    if lora is None or lora.dtype == x.dtype:  # (promote_types costs a microsecond per call)
        return x.dtype
    return torch.promote_types(x.dtype, lora.dtype)


# ----------------------------------------------------------------------------- replays


def _stamp(t) -> object:
    """What a replay depends on besides a tensor's identity: what a ``.data`` assignment or
    ``requires_grad_`` may change (data pointer, shape, strides, dtype, whether it requires grad)."""
    if type(t) is PackedFactor:
        return t.qweight.data_ptr(), t.scale.data_ptr(), None if t.offset is None else t.offset.data_ptr()
    return t.data_ptr(), t.shape, t.stride(), t.dtype, t.requires_grad


class _Replay:
    """The Triton launches of an op for one layer's tensors and one input layout, prepared on
    its first call and replayed by the later ones (every call of every step), so that a call
    after the first skips the argument checks and the launch planning.  ``fwd_impl`` /
    ``bwd_impl`` are the op's bodies taking a :class:`Gemms` first (the low-rank forward takes
    the factors themselves, :func:`_lowrank_fwd_factors`).  It is kept under the ids of the
    layer's objects, holds them weakly and leaves the table when one of them dies (so a
    replay found by its key was made for these very objects), and applies while they have
    the same stamps (:func:`_stamp`)."""

    __slots__ = (
        "refs", "stamps", "in_f", "out_f", "lead", "records_grad", "flat_view", "fwd_impl", "bwd_impl", "fwd", "bwd"
    )  # fmt: skip

    def __init__(
        self,
        x: torch.Tensor,
        objects: tuple,
        in_f: int,
        out_f: int,
        records_grad: bool,
        fwd_impl: Callable,
        bwd_impl: Callable,
    ) -> None:
        self.refs: tuple = ()
        # whether x as an M×in matrix is a view of x's own memory: then, once every forward
        # GEMM has a prepared launch (which reads only x's data pointer; its strides are
        # planned), a call that records no gradient hands x over as it is, without the view
        self.flat_view = x.ndim == 2 or (x.numel() > 0 and x.reshape(-1, in_f).data_ptr() == x.data_ptr())
        self.stamps = tuple(None if t is None else _stamp(t) for t in objects)
        self.in_f, self.out_f, self.lead, self.records_grad = in_f, out_f, x.shape[:-1], records_grad
        self.fwd_impl, self.bwd_impl = fwd_impl, bwd_impl
        self.fwd: Optional[list] = None
        self.bwd: dict[tuple, list] = {}

    def applies(self, objects: tuple) -> bool:
        for t, stamp in zip(objects, self.stamps):
            if stamp is not None and _stamp(t) != stamp:
                return False
        return True

    # A first pass fills a list of its own and publishes it whole: a replay never sees a
    # half-prepared list, whatever other thread runs the same layer.

    def forward(self, *inputs) -> tuple[torch.Tensor, torch.Tensor]:
        launches = [] if self.fwd is None else self.fwd
        out = self.fwd_impl(Gemms(True, launches), *inputs)
        if self.fwd is None:
            self.flat_view = self.flat_view and None not in launches
            if self.flat_view and not self.records_grad and len(self.lead) != 1:
                launches[-1].shape_output(self.lead)  # (a forward body's last GEMM makes y)
            self.fwd = launches
        return out

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """x as the M×in matrix the launches take: x itself when it is one, or when a replayed
        forward that records no gradient may take it in any leading shape (``flat_view``)."""
        if x.ndim == 2 or (not self.records_grad and self.flat_view and self.fwd is not None):
            return x
        return x.reshape(-1, self.in_f)

    def backward(self, dy: torch.Tensor, *rest) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = rest[0]  # saved; a saved-tensor hook may hand it back in another layout
        key = (dy.shape, dy.stride(), dy.dtype, rest[-1], x.stride(), x.storage_offset(), x.untyped_storage().nbytes())
        launches = self.bwd.get(key, [])
        out = self.bwd_impl(Gemms(True, launches), dy, *rest)
        self.bwd[key] = launches
        return out


_REPLAYS: dict[tuple, _Replay] = {}
_MAX_REPLAYS = 4096  # layers × input layouts; past it the table starts over


def _replay_key(op: str, x: torch.Tensor, objects: tuple, scaling: float) -> tuple:
    return (
        op,
        x.shape,
        x.stride(),
        x.dtype,
        x.device,
        x.requires_grad,
        torch.is_grad_enabled(),
        float(scaling),
        torch.get_float32_matmul_precision(),
        *map(id, objects),
    )


def _replayable(x) -> bool:
    """Calls that may replay: eager (no tracing, modes or transforms), a plain tensor x on the
    Triton path, autocast off (it would cast the arguments into new tensors every call)."""
    return (
        type(x) is torch.Tensor
        and use_triton(x)  # (a CUDA or a CPU tensor, then)
        and not torch.is_autocast_enabled("cuda" if x.is_cuda else "cpu")
        and _no_tracing_or_modes()
    )


def _replay_for(op: str, x, objects: tuple, scaling: float, make: Callable[[], Optional[_Replay]]):
    """This call's replay: the one an earlier call of the layer made, else ``make()``'s (which
    checks the arguments; ``None`` for a call that may not replay)."""
    if not _replayable(x):
        return None
    key = _replay_key(op, x, objects, scaling)
    replay = _REPLAYS.get(key)
    if replay is None or not replay.applies(objects):
        replay = make()
        if replay is not None:
            if len(_REPLAYS) >= _MAX_REPLAYS:
                _REPLAYS.clear()
            _REPLAYS[key] = replay
            evict = functools.partial(_evict, _REPLAYS, key)
            replay.refs = tuple(weakref.ref(t, evict) for t in objects if t is not None)
    return replay


def _evict(table: dict, key: tuple, dead: weakref.ref) -> None:
    """An object of the replay under ``key`` died (its id may now be another object's).  The
    table comes bound: objects that die at interpreter exit find the module's globals gone."""
    replay = table.get(key)
    if replay is not None and dead in replay.refs:
        del table[key]


# ----------------------------------------------------------------------------- low-rank + LoRA op

# A factor crosses the op boundary as (tensor, scale, offset) plus (mode, group) in `quant`.


def _flat(f: Factor) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], int, int]:
    if isinstance(f, PackedFactor):
        return f.qweight, f.scale, f.offset, QUANT_MODES[f.fmt], f.group_size
    return f, None, None, 0, 0


def _factor(t, scale, offset, mode: int, group: int, shape: tuple[int, int]) -> Factor:
    if mode == 0:
        return t
    fmt = next(f for f, m in QUANT_MODES.items() if m == mode)
    return PackedFactor(t, scale, offset, fmt, shape, group)


def _t(g: Gemms, f: Factor):
    """``fᵀ`` as a right operand of the next GEMM (see :meth:`Gemms.t`) or a transposed packed operand."""
    return PackedOperand(f, True) if isinstance(f, PackedFactor) else g.t(f)


def _n(f: Factor):
    return PackedOperand(f, False) if isinstance(f, PackedFactor) else f


def _unpack(x2, u, us, uo, v, vs, vo, quant) -> tuple[Factor, Factor]:
    r = v.shape[0]
    return (
        _factor(u, us, uo, quant[0], quant[1], (u.shape[0], r)),
        _factor(v, vs, vo, quant[2], quant[3], (r, x2.shape[1])),
    )


def _lowrank_fwd_body(
    x: torch.Tensor,
    u: torch.Tensor,
    u_scale: Optional[torch.Tensor],
    u_offset: Optional[torch.Tensor],
    v: torch.Tensor,
    v_scale: Optional[torch.Tensor],
    v_offset: Optional[torch.Tensor],
    lora_a: Optional[torch.Tensor],
    lora_b: Optional[torch.Tensor],
    scaling: float,
    bias: Optional[torch.Tensor],
    quant: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: M×in.  Returns y (M×out) and ``t_A = x Aᵀ`` (M×ρ; M×0 without LoRA) for backward."""
    return _lowrank_fwd(
        Gemms(use_triton(x)), x, u, u_scale, u_offset, v, v_scale, v_offset, lora_a, lora_b, scaling, bias, quant
    )


def _lowrank_fwd(g: Gemms, x, u, u_scale, u_offset, v, v_scale, v_offset, lora_a, lora_b, scaling, bias, quant):
    fu, fv = _unpack(x, u, u_scale, u_offset, v, v_scale, v_offset, quant)
    return _lowrank_fwd_factors(g, x, fu, fv, lora_a, lora_b, scaling, bias)


def _lowrank_fwd_factors(g: Gemms, x, fu: Factor, fv: Factor, lora_a, lora_b, scaling, bias):
    """The forward on the factors as such: a replay of a call that records no gradient starts
    here, without taking a packed factor apart and making it again (and checking it)."""
    if lora_a is None or lora_b is None:  # given together (checked by the op's caller)
        t_v = g.two_k(x, _t(g, fv))
        return g.two_k(t_v, _t(g, fu), bias=bias), x.new_empty(x.shape[0], 0)
    t_v, t_a = g.two_n(x, _t(g, fv), g.t(lora_a), out_dtypes=(x.dtype, _lora_dtype(x, lora_a)))
    y = g.two_k(t_v, _t(g, fu), t_a, g.t(lora_b), alpha2=scaling, bias=bias, out_dtype=x.dtype)
    return y, t_a


_lowrank_fwd_op = torch.library.custom_op("emloc::lowrank_lora_fwd", mutates_args=())(_lowrank_fwd_body)


@_lowrank_fwd_op.register_fake
def _(x, u, u_scale, u_offset, v, v_scale, v_offset, lora_a, lora_b, scaling, bias, quant):
    rho = 0 if lora_a is None else lora_a.shape[0]
    return x.new_empty(x.shape[0], u.shape[0]), x.new_empty(x.shape[0], rho, dtype=_lora_dtype(x, lora_a))


def _lowrank_bwd_body(
    dy: torch.Tensor,
    x: torch.Tensor,
    t_a: torch.Tensor,
    u: torch.Tensor,
    u_scale: Optional[torch.Tensor],
    u_offset: Optional[torch.Tensor],
    v: torch.Tensor,
    v_scale: Optional[torch.Tensor],
    v_offset: Optional[torch.Tensor],
    lora_a: Optional[torch.Tensor],
    lora_b: Optional[torch.Tensor],
    scaling: float,
    quant: list[int],
    need_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (dx, dA, dB); an empty tensor stands for a gradient not asked for / no LoRA."""
    g = Gemms(use_triton(dy))
    return _lowrank_bwd(
        g, dy, x, t_a, u, u_scale, u_offset, v, v_scale, v_offset, lora_a, lora_b, scaling, quant, need_dx
    )


def _lowrank_bwd(
    g: Gemms, dy, x, t_a, u, u_scale, u_offset, v, v_scale, v_offset, lora_a, lora_b, scaling, quant, need_dx
):
    fu, fv = _unpack(x, u, u_scale, u_offset, v, v_scale, v_offset, quant)
    if lora_a is None or lora_b is None:
        dx = g.two_k(g.two_k(dy, _n(fu)), _n(fv)) if need_dx else dy.new_empty(0)
        return dx, dy.new_empty(0), dy.new_empty(0)
    ta_dtype = _lora_dtype(dy, lora_b)
    if need_dx:
        dt_v, dt_a = g.two_n(dy, _n(fu), lora_b, alpha2=scaling, out_dtypes=(dy.dtype, ta_dtype))
        dx = g.two_k(dt_v, _n(fv), dt_a, lora_a, out_dtype=x.dtype)
    else:
        dt_a = g.two_k(dy, lora_b, alpha1=scaling, out_dtype=ta_dtype)
        dx = dy.new_empty(0)
    da = g.two_k(g.t(dt_a), x, out_dtype=lora_a.dtype)
    db = g.two_k(g.t(dy), t_a, alpha1=scaling, out_dtype=lora_b.dtype)
    return dx, da, db


_lowrank_bwd_op = torch.library.custom_op("emloc::lowrank_lora_bwd", mutates_args=())(_lowrank_bwd_body)


@_lowrank_bwd_op.register_fake
def _(dy, x, t_a, u, u_scale, u_offset, v, v_scale, v_offset, lora_a, lora_b, scaling, quant, need_dx):
    dx = x.new_empty(x.shape) if need_dx else dy.new_empty(0)
    if lora_a is None:
        return dx, dy.new_empty(0), dy.new_empty(0)
    return dx, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


def _lowrank_setup(ctx, inputs, output):
    x, u, us, uo, v, vs, vo, lora_a, lora_b, scaling, bias, quant = inputs
    ctx.save_for_backward(x, output[1], u, us, uo, v, vs, vo, lora_a, lora_b)
    ctx.scaling, ctx.quant = scaling, quant
    ctx.bias_dtype = None if bias is None else bias.dtype


def _lowrank_grads(ctx, dy, bwd, offset: int = 0) -> tuple:
    """Gradients of (x, u, u_scale, u_offset, v, v_scale, v_offset, lora_a, lora_b, scaling,
    bias, quant) from ``bwd`` (the registered op, or its body on the eager path); ``offset``:
    inputs of the autograd node before x."""
    x, t_a, u, us, uo, v, vs, vo, lora_a, lora_b = ctx.saved_tensors
    need = ctx.needs_input_grad[offset:]
    dx = da = db = None
    if dy is not None and (need[0] or need[7] or need[8]):
        dx, da, db = bwd(dy, x, t_a, u, us, uo, v, vs, vo, lora_a, lora_b, ctx.scaling, ctx.quant, need[0])
    dbias = dy.sum(0).to(ctx.bias_dtype) if dy is not None and need[10] else None
    return (
        dx if need[0] else None,
        None,
        None,
        None,
        None,
        None,
        None,
        da if need[7] else None,
        db if need[8] else None,
        None,
        dbias,
        None,
    )


def _lowrank_setup_op(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    _lowrank_setup(ctx, inputs, output)


def _lowrank_backward(ctx, dy, _dt_a):
    return _lowrank_grads(ctx, dy, torch.ops.emloc.lowrank_lora_bwd)


_lowrank_fwd_op.register_autograd(_lowrank_backward, setup_context=_lowrank_setup_op)


class _LowRankLora(torch.autograd.Function):
    """Eager training: the op's bodies under a plain autograd.Function, without the custom-op
    dispatcher round trips (about 200 µs a call); t_A gets no gradient buffer at all.  With a
    :class:`_Replay` its launches are replayed, forward and backward."""

    @staticmethod
    def forward(ctx, replay: Optional[_Replay], *inputs):
        if replay is None:
            y, t_a = _lowrank_fwd_body(*inputs)
        else:
            x, u, us, uo, v, vs, vo, lora_a, lora_b, scaling, bias, quant = inputs
            y, t_a = replay.forward(x, *_unpack(x, u, us, uo, v, vs, vo, quant), lora_a, lora_b, scaling, bias)
        ctx.set_materialize_grads(False)
        ctx.replay = replay
        _lowrank_setup(ctx, inputs, (y, t_a))
        return y

    @staticmethod
    def backward(ctx, dy):
        bwd = _lowrank_bwd_body if ctx.replay is None else ctx.replay.backward
        return (None, *_lowrank_grads(ctx, dy, bwd, offset=1))


def lowrank_lora(
    x: torch.Tensor,
    u: Factor,
    v: Factor,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    scaling: float = 1.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x vᵀ uᵀ + scaling·x lora_aᵀ lora_bᵀ + bias`` (u: out×r, v: r×in, lora_a: ρ×in,
    lora_b: out×ρ), fused; any leading shape of x; output in x's dtype."""
    objects = (u, v, lora_a, lora_b, bias)
    replay = _replay_for("lowrank", x, objects, scaling, lambda: _new_lowrank_replay(x, u, v, lora_a, lora_b, bias))
    if replay is not None:  # checked when the replay was made
        if replay.records_grad:
            (ut, us, uo, um, ug), (vt, vs, vo, vm, vg) = _flat(u), _flat(v)
            args = (replay.rows(x), ut, us, uo, vt, vs, vo, lora_a, lora_b, float(scaling), bias, [um, ug, vm, vg])
            y = _LowRankLora.apply(replay, *args)
        else:  # inference, decode
            y, _ = replay.forward(replay.rows(x), u, v, lora_a, lora_b, scaling, bias)
        return y if y.ndim == x.ndim else y.view(*x.shape[:-1], replay.out_f)

    x, u, v, lora_a, lora_b, bias = _autocast(x, u, v, lora_a, lora_b, bias)
    _check_lowrank(x, u, v, lora_a, lora_b, bias)
    out_f, in_f = u.shape[0], v.shape[1]
    (ut, us, uo, um, ug), (vt, vs, vo, vm, vg) = _flat(u), _flat(v)
    args = (x.reshape(-1, in_f), ut, us, uo, vt, vs, vo, lora_a, lora_b, float(scaling), bias, [um, ug, vm, vg])
    tensors = (x, ut, us, uo, vt, vs, vo, lora_a, lora_b, bias)
    if not _eager(*tensors):
        y, _ = torch.ops.emloc.lowrank_lora_fwd(*args)
    elif _records_grad(*tensors):
        y = _LowRankLora.apply(None, *args)
    else:  # inference, decode
        y, _ = _lowrank_fwd_body(*args)
    return y.reshape(*x.shape[:-1], out_f)


def _new_lowrank_replay(x, u, v, lora_a, lora_b, bias) -> Optional[_Replay]:
    _check_lowrank(x, u, v, lora_a, lora_b, bias)
    if not _eager(*_flat(u)[:3], *_flat(v)[:3], lora_a, lora_b, bias):
        return None
    records = _records_grad(x, lora_a, lora_b, bias)
    objects = (u, v, lora_a, lora_b, bias)
    return _Replay(x, objects, v.shape[1], u.shape[0], records, _lowrank_fwd_factors, _lowrank_bwd)


def _check_lowrank(x, u, v, lora_a, lora_b, bias) -> None:
    for name, f in (("u", u), ("v", v)):
        if not isinstance(f, (torch.Tensor, PackedFactor)) or len(f.shape) != 2:
            raise ValueError(
                f"lowrank_lora: {name} must be a 2-D tensor or PackedFactor (u: out×rank, v: rank×in), "
                f"got {type(f).__name__} {tuple(getattr(f, 'shape', ()))}"
            )
    (out_f, rank), in_f = u.shape, v.shape[1]
    _check_x("lowrank_lora", x, in_f)
    _check_2d("lowrank_lora", "u", u, (out_f, rank), x)
    _check_2d("lowrank_lora", "v", v, (rank, in_f), x)
    _check("lowrank_lora", x, {"u": u, "v": v}, out_f, in_f, lora_a, lora_b, bias)


# ----------------------------------------------------------------------------- dense + LoRA op


def _dense_fwd_body(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    bias: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: M×in.  ``t_A = x Aᵀ``; ``y = [x | t_A]·[W | s·B]ᵀ + b``; returns (y, t_A)."""
    return _dense_fwd(Gemms(use_triton(x)), x, weight, lora_a, lora_b, scaling, bias)


def _dense_fwd(g: Gemms, x, weight, lora_a, lora_b, scaling, bias):
    t_a = g.two_k(x, g.t(lora_a), out_dtype=_lora_dtype(x, lora_a))
    y = g.two_k(x, g.t(weight), t_a, g.t(lora_b), alpha2=scaling, bias=bias, out_dtype=x.dtype)
    return y, t_a


_dense_fwd_op = torch.library.custom_op("emloc::dense_lora_fwd", mutates_args=())(_dense_fwd_body)


@_dense_fwd_op.register_fake
def _(x, weight, lora_a, lora_b, scaling, bias):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(
        x.shape[0], lora_a.shape[0], dtype=_lora_dtype(x, lora_a)
    )


def _dense_bwd_body(
    dy: torch.Tensor,
    x: torch.Tensor,
    t_a: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    need_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dt_A = s·dy B``; ``dx = [dy | dt_A]·[W; A]``; ``dA = dt_Aᵀ x``; ``dB = s·dyᵀ t_A``."""
    return _dense_bwd(Gemms(use_triton(dy)), dy, x, t_a, weight, lora_a, lora_b, scaling, need_dx)


def _dense_bwd(g: Gemms, dy, x, t_a, weight, lora_a, lora_b, scaling, need_dx):
    dt_a = g.two_k(dy, lora_b, alpha1=scaling, out_dtype=_lora_dtype(dy, lora_b))
    dx = g.two_k(dy, weight, dt_a, lora_a, out_dtype=x.dtype) if need_dx else dy.new_empty(0)
    da = g.two_k(g.t(dt_a), x, out_dtype=lora_a.dtype)
    db = g.two_k(g.t(dy), t_a, alpha1=scaling, out_dtype=lora_b.dtype)
    return dx, da, db


_dense_bwd_op = torch.library.custom_op("emloc::dense_lora_bwd", mutates_args=())(_dense_bwd_body)


@_dense_bwd_op.register_fake
def _(dy, x, t_a, weight, lora_a, lora_b, scaling, need_dx):
    dx = x.new_empty(x.shape) if need_dx else dy.new_empty(0)
    return dx, lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


def _dense_setup(ctx, inputs, output):
    x, weight, lora_a, lora_b, scaling, bias = inputs
    ctx.save_for_backward(x, output[1], weight, lora_a, lora_b)
    ctx.scaling = scaling
    ctx.bias_dtype = None if bias is None else bias.dtype


def _dense_setup_op(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    _dense_setup(ctx, inputs, output)


def _dense_grads(ctx, dy, bwd, offset: int = 0) -> tuple:
    """Gradients of (x, weight, lora_a, lora_b, scaling, bias) from ``bwd`` (``offset`` as in
    :func:`_lowrank_grads`)."""
    x, t_a, weight, lora_a, lora_b = ctx.saved_tensors
    need = ctx.needs_input_grad[offset:]
    dx = da = db = None
    if dy is not None and (need[0] or need[2] or need[3]):
        dx, da, db = bwd(dy, x, t_a, weight, lora_a, lora_b, ctx.scaling, need[0])
    dbias = dy.sum(0).to(ctx.bias_dtype) if dy is not None and need[5] else None
    return (dx if need[0] else None, None, da if need[2] else None, db if need[3] else None, None, dbias)


def _dense_backward(ctx, dy, _dt_a):
    return _dense_grads(ctx, dy, torch.ops.emloc.dense_lora_bwd)


_dense_fwd_op.register_autograd(_dense_backward, setup_context=_dense_setup_op)


class _DenseLora(torch.autograd.Function):
    """Eager training of ``dense_lora`` without the dispatcher (as :class:`_LowRankLora`)."""

    @staticmethod
    def forward(ctx, replay: Optional[_Replay], *inputs):
        y, t_a = _dense_fwd_body(*inputs) if replay is None else replay.forward(*inputs)
        ctx.set_materialize_grads(False)
        ctx.replay = replay
        _dense_setup(ctx, inputs, (y, t_a))
        return y

    @staticmethod
    def backward(ctx, dy):
        bwd = _dense_bwd_body if ctx.replay is None else ctx.replay.backward
        return (None, *_dense_grads(ctx, dy, bwd, offset=1))


def dense_lora(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float = 1.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x weightᵀ + scaling·x lora_aᵀ lora_bᵀ + bias`` (weight: out×in), fused; any leading shape of x."""
    objects = (weight, lora_a, lora_b, bias)
    replay = _replay_for("dense", x, objects, scaling, lambda: _new_dense_replay(x, weight, lora_a, lora_b, bias))
    if replay is not None:  # checked when the replay was made
        args = (replay.rows(x), weight, lora_a, lora_b, float(scaling), bias)
        y = _DenseLora.apply(replay, *args) if replay.records_grad else replay.forward(*args)[0]
        return y if y.ndim == x.ndim else y.view(*x.shape[:-1], replay.out_f)

    x, weight, lora_a, lora_b, bias = _autocast(x, weight, lora_a, lora_b, bias)
    _check_dense(x, weight, lora_a, lora_b, bias)
    out_f, in_f = weight.shape
    args = (x.reshape(-1, in_f), weight, lora_a, lora_b, float(scaling), bias)
    tensors = (x, weight, lora_a, lora_b, bias)
    if not _eager(*tensors):
        y, _ = torch.ops.emloc.dense_lora_fwd(*args)
    elif _records_grad(*tensors):
        y = _DenseLora.apply(None, *args)
    else:
        y, _ = _dense_fwd_body(*args)
    return y.reshape(*x.shape[:-1], out_f)


def _new_dense_replay(x, weight, lora_a, lora_b, bias) -> Optional[_Replay]:
    _check_dense(x, weight, lora_a, lora_b, bias)
    if not _eager(weight, lora_a, lora_b, bias):
        return None
    records = _records_grad(x, lora_a, lora_b, bias)
    objects = (weight, lora_a, lora_b, bias)
    return _Replay(x, objects, weight.shape[1], weight.shape[0], records, _dense_fwd, _dense_bwd)


def _check_dense(x, weight, lora_a, lora_b, bias) -> None:
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ValueError(
            f"dense_lora: weight must be an out×in tensor, got {type(weight).__name__} "
            f"{tuple(getattr(weight, 'shape', ()))}"
        )
    if lora_a is None or lora_b is None:
        raise ValueError("dense_lora: lora_a and lora_b are required (use F.linear without LoRA)")
    out_f, in_f = weight.shape
    _check_x("dense_lora", x, in_f)
    _check_2d("dense_lora", "weight", weight, (out_f, in_f), x)
    _check("dense_lora", x, {"weight": weight}, out_f, in_f, lora_a, lora_b, bias)
