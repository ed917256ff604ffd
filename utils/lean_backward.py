"""Layers that keep less for backward than autograd over their library code does.

With the base frozen, backward needs from a layer only what the gradient of its input takes, and from a LoRA layer
its input once. Three kinds of layer kept more (measured by scripts/backward_memory.py; figures in the README's
Performance section):
- bitsandbytes' int8 linear layers keep their input (--base_quantization int8);
- diffusers' RMSNorm (SD3.5's q/k norms) keeps an fp32 copy of its bf16/fp16 input besides the input itself;
- peft's LoRA layers keep their own bf16 copy of their input under autocast.
Each layer changes per module instance, never a library class: its class becomes a subclass of its own class with
one method overridden (``_one_method_overridden``). The subclass is made once per library class, so every block
of the transformer still has the same types, and torch.compile reuses one compiled block for all blocks of a kind.
(A per-instance function is a different Python object in every block: torch.compile guarded on it and compiled each
block on its own. On a tiny model with SD3.5 Medium's 24-block layout, stage 2 made 64 versions of the block forward
where 11 do, and its first step took 5x as long.)
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _subclass(library_class: type, override: type) -> type:
    return type(library_class.__name__, (override, library_class), {"__module__": library_class.__module__})


def _one_method_overridden(module, override: type) -> None:
    """``module``'s class becomes (``override``, its class): ``override``'s method runs, ``super()`` reaching the
    library's own. Applying it twice changes nothing."""
    if not isinstance(module, override):
        module.__class__ = _subclass(type(module), override)


class _FrozenInt8Linear(torch.autograd.Function):
    """A frozen bitsandbytes int8 linear layer whose backward keeps nothing of its input.

    bitsandbytes' own autograd (0.50: MatMul8bitLt on CUDA, MatMul8bitFp on the CPU) keeps every int8 layer's input
    alive until backward, though with the weight frozen the input's gradient needs only the weight; a frozen bf16
    linear layer keeps no input. That is one cause of --base_quantization int8 holding more memory than no
    quantisation on an H200 (1024 px: +2.1 GiB stage 1, +6.8 GiB stage 2). The forward pass is bitsandbytes' own, run
    without autograd; the backward pass is the input-gradient formula of bitsandbytes' backward:
    grad @ (CB * SCB / 127)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer, ctx.input_dtype = layer, x.dtype
        return layer.int8_forward(x)  # autograd is off inside forward: bitsandbytes records and keeps nothing

    @staticmethod
    def backward(ctx, grad_output):
        state = ctx.layer.state
        weight = state.CB.to(ctx.input_dtype, copy=True).mul_(state.SCB.unsqueeze(1).mul(1.0 / 127.0))
        return torch.matmul(grad_output.to(ctx.input_dtype), weight), None  # (x, layer): no gradient for the layer


class _Int8KeepingNoInput:
    """Overrides a frozen bitsandbytes Linear8bitLt's forward (``_one_method_overridden``)."""

    def int8_forward(self, x):
        return super().forward(x)

    def forward(self, x):
        if torch.is_grad_enabled() and x.requires_grad:
            return _FrozenInt8Linear.apply(x, self)
        return super().forward(x)


def int8_layers_keep_no_input(model) -> int:
    """Route every frozen bitsandbytes int8 layer of ``model`` through ``_FrozenInt8Linear``; returns how many.
    A layer whose weight or bias trains keeps bitsandbytes' autograd (it needs the input for that gradient)."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)
              and not any(p.requires_grad for p in m.parameters(recurse=False))]
    for layer in layers:
        _one_method_overridden(layer, _Int8KeepingNoInput)
    return len(layers)


class _RMSNormKeepingInput(torch.autograd.Function):
    """diffusers' RMSNorm (0.42) of a bf16/fp16 input with a frozen weight (or none), keeping for backward only the
    input and 1/rms.

    diffusers computes ``x * rsqrt(mean(float32(x)^2) + eps)`` in fp32, rounds it to the weight's dtype and multiplies
    by the weight; autograd over those operations keeps the fp32 copy of x (for the square) as well as x (for the
    product): three times x's bytes where x and one number per row suffice. The forward pass here is the same
    operations (the same numbers, bitwise); the backward pass is the input gradient of y = x * r, r = (mean(x^2) +
    eps)^-1/2, in fp32 and rounded once: g * r - x * r^3 * mean(g * x), where g is the incoming gradient times the
    weight. Autograd's own backward over diffusers' operations rounds to bf16 along the way, so the two gradients
    agree to bf16 rounding, not bitwise."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        inv_rms = torch.rsqrt(variance + eps)
        y = x * inv_rms
        if weight is None:
            y = y.to(x.dtype)
        else:
            if weight.dtype in (torch.float16, torch.bfloat16):
                y = y.to(weight.dtype)
            y = y * weight
        ctx.save_for_backward(x, inv_rms, weight)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, inv_rms, weight = ctx.saved_tensors
        g = (grad_y if weight is None else grad_y * weight).to(torch.float32)
        x32 = x.to(torch.float32)
        grad_x = g * inv_rms - x32 * inv_rms.pow(3) * (g * x32).mean(-1, keepdim=True)
        return grad_x.to(x.dtype), None, None


class _RMSNormKeepingOnlyInput:
    """Overrides a diffusers RMSNorm's forward (``_one_method_overridden``)."""

    def forward(self, x):
        if (x.dtype in (torch.float16, torch.bfloat16) and torch.is_grad_enabled() and x.requires_grad
                and (self.weight is None or not self.weight.requires_grad)):
            return _RMSNormKeepingInput.apply(x, self.weight, self.eps)
        return super().forward(x)


def rms_norms_keep_only_input(model) -> int:
    """Route every bias-free diffusers RMSNorm of ``model`` through ``_RMSNormKeepingInput`` when its input is bf16
    or fp16 and needs a gradient (an fp32 input keeps no copy: diffusers' forward runs as it is); returns how many.
    A norm whose weight trains keeps diffusers' forward (its weight's gradient is not written out here)."""
    from diffusers.models.normalization import RMSNorm

    norms = [m for m in model.modules() if isinstance(m, RMSNorm) and m.bias is None]
    for norm in norms:
        _one_method_overridden(norm, _RMSNormKeepingOnlyInput)
    return len(norms)


class _InputLeftToAutocast:
    """Overrides a peft LoRA layer's ``_cast_input_dtype`` (``_one_method_overridden``)."""

    def _cast_input_dtype(self, x, dtype):
        if x is not None and torch.is_autocast_enabled(x.device.type):
            return x
        return super()._cast_input_dtype(x, dtype)


def inputs_left_to_autocast(layers: list) -> int:
    """Under autocast, let each LoRA layer's matmuls cast its input (``utils.lora.tuner_layers``); returns how many
    layers.

    peft casts a LoRA layer's input to its weights' dtype, fp32 here (``trainable_to_fp32``), and autocast casts it
    straight back to bf16 for the matmul: an exact round trip, since fp32 holds every bf16/fp16 value. It costs two
    casts per LoRA layer and pass, forward and backward, and one bf16 copy of the input per LoRA layer kept for the
    LoRA's gradient, where the layers that share an input (to_q, to_k, to_v) could share it. Without autocast
    (validation, inference) peft's cast is kept: a bf16 input cannot meet fp32 weights in a matmul there. A layer with
    LoRA dropout or a LoRA variant (DoRA) keeps peft's cast too: those compute on the cast input itself."""
    changed = 0
    for layer in layers:
        plain = all(isinstance(d, torch.nn.Identity) for d in layer.lora_dropout.values())
        if plain and not getattr(layer, "lora_variant", None):
            _one_method_overridden(layer, _InputLeftToAutocast)
            changed += 1
    return changed
