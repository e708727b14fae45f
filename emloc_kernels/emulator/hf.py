"""The emulator as a transformers quantization method, ``quant_method="emloc"``.

Registered (once) when ``emloc_kernels`` is imported, through transformers' public registry
(``register_quantization_config`` / ``register_quantizer``); it touches no model that does not
name it. Two ways in:

- **loading an emulator**: ``config.json`` of an emulator holds ``quantization_config``, its
  metadata (as ``emloc.json``) with ``quant_method``; ``save_emulator`` writes it, and so does
  ``save_pretrained`` of an emulator from ``build_emulator``, ``load_emulator`` or
  ``from_pretrained``, which all carry the config and its quantizer
  (:func:`~emloc_kernels.conventions.attach_quantizer`). ``from_pretrained(emulator_dir)`` then
  replaces the listed linears by empty :class:`LowRankLinear` / :class:`QuantLowRankLinear`
  modules of the right shapes before the weights load, and transformers fills their factors;
- **building on load**: ``from_pretrained(model_dir, quantization_config=EmlocConfig(ratio=0.4,
  dataset=texts))`` loads the dense weights and then runs :func:`build_emulator` on them
  (texts are tokenised with the tokenizer of the same directory unless ``tokenizer`` is given).

A process without ``emloc_kernels`` must not load an emulator as a dense model with random
linears, which is what transformers does with an unknown quantization method (it warns and
skips it). So each compressed linear is saved with an empty ``weight`` tensor beside its
factors: the emulator ignores it, while the dense model finds a ``weight`` of the wrong shape
and transformers raises (``ignore_mismatched_sizes``); the load report it prints above the
error lists an empty tensor named :data:`HINT_KEY`, which says that ``emloc_kernels`` is needed.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..conventions import EMULATOR_QUANT_METHOD, LINEAR_TYPES, replace_submodule
from ..modules import LowRankLinear
from .distill import Distillation
from .io import empty_module_for

QUANT_METHOD = EMULATOR_QUANT_METHOD
# an empty tensor saved under this name shows up in the load report of a process without
# emloc_kernels (as an unexpected key), right above the error, saying what is missing
HINT_KEY = "emloc_kernels is needed: this is an EMLoC emulator, import emloc_kernels before from_pretrained"
# the keys of an emulator's metadata (emloc.json) besides "modules" and "files"
_METADATA_KEYS = ("format_version", "library_version", "original_model", "architecture", "calibration", "build")


class EmlocConfig(QuantizationConfigMixin):
    """``quantization_config`` of an EMLoC emulator (``quant_method="emloc"``).

    Loading: ``modules`` maps each compressed linear's path to its entry in ``emloc.json``
    (``in_features``, ``out_features``, ``rank``, ``bias``, ``quant``, ``group_size``, ... ); the
    emulator's other metadata (``original_model``, ``architecture``, ``calibration``, ``build``,
    ...) rides along as keyword arguments. This is what ``config.json`` of an emulator holds.

    Building on load (no ``modules``): ``ratio`` and ``dataset`` (calibration texts, token
    tensors or dicts) are required; ``tokenizer`` (an object or a path; default: the model's
    own directory, loaded only for texts) and the other options are those of
    :func:`~emloc_kernels.build_emulator`; ``distill_steps`` > 0 distils the emulator on the
    calibration data (:class:`~emloc_kernels.emulator.distill.Distillation`, ``distill_rank``,
    ``distill_lr``). After the build the model's config holds the built
    emulator's :class:`EmlocConfig`, so ``save_pretrained`` writes a loadable emulator.
    """

    def __init__(
        self,
        modules: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        ratio: float | Mapping[str, float] | None = None,
        dataset: Any = None,
        tokenizer: Any = None,
        quant: str | None = None,
        group_size: int = 128,
        targets: str | list[str] | None = None,
        max_length: int = 512,
        propagate: bool = False,
        shrinkage: float | str = 0.0,
        allocate: str = "uniform",
        heldout: bool = True,
        checkpoint: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        progress: bool = True,
        distill_steps: int = 0,
        distill_rank: int = 8,
        distill_lr: float = 1e-3,
        **metadata: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD  # type: ignore[assignment]  # transformers types it as its own enum
        metadata.pop("quant_method", None)
        unknown = sorted(set(metadata) - set(_METADATA_KEYS))
        if unknown:
            raise TypeError(f"EmlocConfig got unexpected arguments {unknown}")
        self.modules = None if modules is None else {str(k): dict(v) for k, v in modules.items()}
        self.metadata = dict(metadata)
        if dataset is not None and not isinstance(dataset, (str, torch.Tensor, Mapping, list)):
            dataset = list(dataset)  # a generator: read once here, so the config can be copied and reread
        self.ratio, self.dataset, self.tokenizer, self.quant = ratio, dataset, tokenizer, quant
        self.group_size, self.targets, self.max_length = group_size, targets, max_length
        self.propagate, self.shrinkage, self.allocate, self.heldout = propagate, shrinkage, allocate, heldout
        self.checkpoint, self.device, self.progress = checkpoint, device, progress
        self.distill_steps, self.distill_rank, self.distill_lr = distill_steps, distill_rank, distill_lr
        self.post_init()

    def post_init(self) -> None:
        if self.modules is not None:
            for name, info in self.modules.items():
                missing = [k for k in ("in_features", "out_features", "rank", "bias") if k not in info]
                if missing:
                    raise ValueError(f"EmlocConfig: modules[{name!r}] lacks {missing}")
            return
        if self.ratio is None or self.dataset is None:
            raise ValueError(
                "EmlocConfig needs ratio= and dataset= (calibration texts) to build an emulator on load, "
                "or the modules= of an existing emulator (as the config.json of one holds)"
            )
        if self.quant is not None:
            from ..ops.quant import FORMATS

            if self.quant not in FORMATS:
                raise ValueError(f"EmlocConfig: quant must be one of {FORMATS} or None, got {self.quant!r}")

    @property
    def built(self) -> bool:
        """Whether this describes an existing emulator (``modules``) rather than one to build."""
        return self.modules is not None

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> "EmlocConfig":
        """The config of the emulator whose ``emloc_metadata`` (or ``emloc.json``) is ``metadata``."""
        return cls(metadata["modules"], **{k: copy.deepcopy(v) for k, v in metadata.items() if k in _METADATA_KEYS})

    @property
    def emloc_metadata(self) -> dict[str, Any]:
        """The emulator's metadata, as ``emloc_metadata`` of a model and ``emloc.json`` hold it."""
        if self.modules is None:
            raise ValueError("this EmlocConfig describes an emulator still to be built")
        return copy.deepcopy({**self.metadata, "modules": self.modules})

    def to_dict(self) -> dict[str, Any]:
        if self.modules is not None:
            return {"quant_method": QUANT_METHOD, **self.emloc_metadata}
        options = {
            "ratio": self.ratio,
            "quant": self.quant,
            "group_size": self.group_size,
            "targets": self.targets,
            "max_length": self.max_length,
            "propagate": self.propagate,
            "shrinkage": self.shrinkage,
            "allocate": self.allocate,
            "heldout": self.heldout,
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
            "device": None if self.device is None else str(self.device),
            "progress": self.progress,
            "distill_steps": self.distill_steps,
            "distill_rank": self.distill_rank,
            "distill_lr": self.distill_lr,
        }
        # texts and a tokenizer path are JSON; tensors and tokenizer objects are left out
        if _texts(self.dataset):
            options["dataset"] = self.dataset
        if isinstance(self.tokenizer, str):
            options["tokenizer"] = self.tokenizer
        return copy.deepcopy({"quant_method": QUANT_METHOD, **options})

    def __iter__(self):  # type: ignore[no-untyped-def]  # as the mixin's: dict(config)
        yield from self.to_dict().items()


class EmlocHfQuantizer(HfQuantizer):
    """Puts an emulator's low-rank layers in place before transformers loads the weights (or
    builds the emulator after the dense weights loaded), see the module docstring."""

    requires_calibration = False
    quantization_config: EmlocConfig

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        # an existing emulator also when its config comes from the arguments (an emulator
        # directory written before config.json carried the quantization config)
        self.pre_quantized = cast(EmlocConfig, quantization_config).built

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if not self.pre_quantized:
            return model  # building on load: the dense weights load as they are
        modules = cast(dict, self.quantization_config.modules)
        for name, info in modules.items():
            try:
                linear = model.get_submodule(name)
            except AttributeError:
                raise ValueError(
                    f"the emulator's config lists {name}, which {type(model).__name__} does not have (the emulator "
                    f"was built from a {self.quantization_config.metadata.get('architecture', 'model of another class')}; "
                    "load it with that class)"
                ) from None
            if not isinstance(linear, LINEAR_TYPES):
                raise ValueError(f"the emulator's config lists {name}, a {type(linear).__name__} in this model")
            replace_submodule(model, name, empty_module_for(info, cast(torch.Tensor, linear.weight).dtype))
        # the empty ``weight`` each compressed linear is saved with (module docstring)
        ignored = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
        ignored |= {rf"^{re.escape(name)}\.weight$" for name in modules} | {rf"^{re.escape(HINT_KEY)}$"}
        model._keys_to_ignore_on_load_unexpected = ignored  # type: ignore[assignment]
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        if not self.pre_quantized:
            self._build(model)
        else:
            check_loaded(model)
            model.emloc_metadata = self.quantization_config.emloc_metadata  # type: ignore[assignment]
        return model

    def _build(self, model: nn.Module) -> None:
        from .build import build_emulator

        c = self.quantization_config
        tokenizer = c.tokenizer
        if _texts(c.dataset) and (tokenizer is None or isinstance(tokenizer, str)):
            from transformers import AutoTokenizer

            source = tokenizer or cast(Any, model).config.name_or_path
            try:
                tokenizer = AutoTokenizer.from_pretrained(source)
            except Exception as e:
                raise ValueError(
                    f"EmlocConfig: the calibration texts need a tokenizer and none loads from {source!r} ({e}); "
                    "pass EmlocConfig(tokenizer=...)"
                ) from e
        build_emulator(
            model,
            c.dataset,
            cast(Any, c.ratio),
            tokenizer=tokenizer,
            targets=c.targets,
            device=c.device,
            progress=c.progress,
            quant=c.quant,
            group_size=c.group_size,
            max_length=c.max_length,
            propagate=c.propagate,
            shrinkage=c.shrinkage,
            allocate=c.allocate,
            heldout=c.heldout,
            checkpoint=c.checkpoint,
            distill=Distillation(c.distill_steps, c.distill_rank, lr=c.distill_lr) if c.distill_steps else None,
        )  # which gives the model the built emulator's config (and a quantizer for it)

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        state = model.state_dict()
        for name, module in model.named_modules():
            if isinstance(module, LowRankLinear):
                state[f"{name}.weight"] = torch.empty(0, dtype=module.weight.dtype)
        state[HINT_KEY] = torch.empty(0, dtype=torch.uint8)  # not floating: never taken for the model's dtype
        return state, {}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # LoRA / PEFT on the frozen factors


def _texts(dataset: Any) -> bool:
    """Whether calibration ``dataset`` is text (a string or a list of them)."""
    return isinstance(dataset, str) or (isinstance(dataset, (list, tuple)) and all(isinstance(x, str) for x in dataset))


def check_loaded(model: nn.Module) -> None:
    """After transformers loaded an emulator's tensors: each low-rank layer got all its tensors
    (transformers leaves a missing one as uninitialised memory: a dense checkpoint loaded with
    an emulator's config), the factors are frozen again (the loader makes every floating tensor
    a trainable parameter), their rows are aligned on a GPU (:meth:`LowRankLinear._apply`) and
    each packed buffer has its format's dtype (the loader keeps a buffer's stored dtype, where
    ``load_state_dict`` would cast)."""
    from ..modules.quantized import QuantLowRankLinear
    from ..ops.quant import qweight_dtype

    missing = [
        f"{name}.{part}"
        for name, module in model.named_modules()
        if isinstance(module, LowRankLinear)
        for part, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        if not getattr(t, "_is_hf_initialized", False)
    ]
    if missing:
        raise ValueError(
            f"the checkpoint has no tensors for {len(missing)} parts of the emulator's low-rank layers "
            f"(e.g. {missing[:3]}); is it the emulator that its quantization_config describes?"
        )
    for name, module in model.named_modules():
        if isinstance(module, QuantLowRankLinear):
            for part, buf in module.named_buffers(recurse=False):
                want = qweight_dtype(module.quant) if part.endswith("qweight") else None
                if (buf.dtype != want) if want is not None else not buf.is_floating_point():
                    raise ValueError(
                        f"{name}.{part}: this {module.quant} layer stores {want or 'floating point'}, "
                        f"the checkpoint has {buf.dtype}"
                    )
        elif isinstance(module, LowRankLinear):
            module.u.requires_grad_(False)
            module.v.requires_grad_(False)
            # the loader put the factors on their device directly: align CUDA rows as .to() does
            module._apply(lambda t: t, recurse=False)


def register() -> None:
    """Register ``emloc`` with transformers (once per process)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(EmlocConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(EmlocHfQuantizer)


register()
