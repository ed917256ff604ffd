"""The memory a training forward pass leaves for backward, measured on the CPU, for the levers that shrink it.

    python scripts/backward_memory.py                                                      # tiny SD3.5, seconds
    OMP_NUM_THREADS=1 python scripts/backward_memory.py --model sd35m --num_layers 3 --resolution 512  # real width

One bf16-autocast training forward pass of the transformer (the default LoRA targets, rank 4, LoRA weights in fp32
as training keeps them); then the bytes of every tensor made during that pass and still alive (what backward will
read; views counted once), per transformer block, and the LoRA gradients of the backward pass. Five runs on the same
weights and batch, each adding one lever to the run before it:
- bf16, as peft and diffusers compute it: peft casts each LoRA layer's input to fp32 and autocast casts it back;
  diffusers' RMSNorm keeps an fp32 copy of its input;
- + LoRA inputs left to autocast (``utils.lean_backward.inputs_left_to_autocast``);
- + RMSNorm keeping only its input (``utils.lean_backward.rms_norms_keep_only_input``): what bf16 training runs;
- int8, bitsandbytes' autograd: the same, with every linear layer of the blocks a bitsandbytes ``Linear8bitLt`` as
  ``--base_quantization int8`` loads it (threshold 6.0, the BitsAndBytesConfig default);
- + int8 layers keeping no input (``utils.lean_backward.int8_layers_keep_no_input``): what int8 training runs.

The int8 layers run bitsandbytes' ``MatMul8bitLt``, the function CUDA trains with (on the CPU bitsandbytes trains
with ``MatMul8bitFp``, which keeps the input the same way). ``--model sd35m --num_layers 3`` is SD3.5 Medium's real
width with three of its 24 blocks: a dual-attention block (blocks 0-12 of the full model), a plain one (13-22) and
the last one (23); the figures per block kind scale to the full model.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import utils  # noqa: E402,F401  before diffusers: utils/quiet.py silences known-harmless library messages
from diffusers import SD3Transformer2DModel  # noqa: E402
from utils.lean_backward import (inputs_left_to_autocast, int8_layers_keep_no_input,  # noqa: E402
                                 rms_norms_keep_only_input)
from utils.lora import DEFAULT_TRANSFORMER_TARGETS, add_trainable_lora, make_lora_config, tuner_layers  # noqa: E402
from utils.tiny_sd3 import SD35M, _variant_config  # noqa: E402
from utils.training import trainable_to_fp32  # noqa: E402

MIB = 1024 ** 2
INT8_THRESHOLD = 6.0  # diffusers' BitsAndBytesConfig default (llm_int8_threshold)
OUTSIDE_BLOCKS = "outside blocks"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["tiny_sd35", "sd35m"], default="tiny_sd35")
    p.add_argument("--num_layers", type=int, default=None, help="Transformer blocks (default: the model's own).")
    p.add_argument("--resolution", type=int, default=None, help="Image pixels (default: 64 tiny, 512 sd35m).")
    p.add_argument("--text_tokens", type=int, default=154, help="77 CLIP + 77 T5 tokens (--max_sequence_length 77).")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def transformer_config(model: str, num_layers: int | None) -> dict:
    config = dict(SD35M["transformer"] if model == "sd35m" else _variant_config("sd35")["transformer"])
    if num_layers is not None:
        if num_layers < 2:
            raise SystemExit(f"error: --num_layers {num_layers}: need at least 2 (a block and the last block).")
        dual = tuple(config["dual_attention_layers"])
        config.update(num_layers=num_layers, dual_attention_layers=dual[:max(1, min(len(dual), num_layers - 2))])
    return config


def block_kinds(config: dict) -> list[str]:
    dual, last = set(config["dual_attention_layers"]), config["num_layers"] - 1
    return ["last" if i == last else "dual" if i in dual else "plain" for i in range(config["num_layers"])]


def quantize_blocks_int8(transformer) -> None:
    """Every linear layer of the transformer blocks becomes a frozen bitsandbytes int8 layer, in place."""
    import bitsandbytes as bnb

    for module in list(transformer.transformer_blocks.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                int8 = bnb.nn.Linear8bitLt(child.in_features, child.out_features, child.bias is not None,
                                           has_fp16_weights=False, threshold=INT8_THRESHOLD)
                int8.load_state_dict(child.state_dict())
                int8 = int8.to(child.weight.device)  # quantises the weight
                if child.bias is not None:
                    int8.bias.data = int8.bias.data.to(child.weight.dtype)
                setattr(module, child_name, int8.requires_grad_(False))


def with_lora(transformer, seed: int):
    """The default LoRA (rank 4) in fp32, its B matrices made non-zero (seeded) so every LoRA weight has a gradient;
    the int8 layers in eval mode, which makes bitsandbytes run MatMul8bitLt as CUDA does (no dropout lives there)."""
    import bitsandbytes as bnb

    add_trainable_lora(transformer, make_lora_config(4, DEFAULT_TRANSFORMER_TARGETS), "default", seed)
    generator = torch.Generator().manual_seed(seed)
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.02
    trainable_to_fp32(transformer)
    transformer.train()
    for module in transformer.modules():
        if isinstance(module, bnb.nn.Linear8bitLt):
            module.train(False)
    return transformer


def make_batch(config: dict, resolution: int, text_tokens: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    side = resolution // 8  # the SD3 VAE's downsampling

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(torch.bfloat16)
    return dict(hidden_states=randn(1, config["in_channels"], side, side),
                encoder_hidden_states=randn(1, text_tokens, config["joint_attention_dim"]),
                pooled_projections=randn(1, config["pooled_projection_dim"]),
                timestep=torch.tensor([500.0]), target=randn(1, config["out_channels"], side, side))


class _Made(TorchDispatchMode):
    """Records a weak reference to the storage of every tensor an operator makes, with the block running it."""

    def __init__(self):
        super().__init__()
        self.block = OUTSIDE_BLOCKS
        self.made = []  # (block, weak reference to the storage, bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                self.made.append((self.block, weakref.ref(storage), storage.nbytes()))
        return out


def forward_backward(transformer, batch: dict) -> dict:
    """One training pass: the bytes per block made in forward and alive before backward, the LoRA gradients, the
    prediction and the time."""
    made = _Made()

    def entering(index):
        def hook(module, args):
            made.block = index
        return hook

    def leaving(module, args, output):
        made.block = OUTSIDE_BLOCKS

    handles = [h for index, block in enumerate(transformer.transformer_blocks)
               for h in (block.register_forward_pre_hook(entering(index)), block.register_forward_hook(leaving))]
    start = time.perf_counter()
    inputs = {k: v for k, v in batch.items() if k != "target"}
    with made, torch.autocast("cpu", dtype=torch.bfloat16):  # accelerate runs the prepared model so under bf16
        prediction = transformer(**inputs, return_dict=False)[0]
    loss = (prediction.float() - batch["target"].float()).pow(2).mean()
    kept_prediction = prediction.detach().clone()
    del prediction
    gc.collect()
    alive = {}  # storage pointer -> (block, bytes): a freed address may be reused, so only live storages count
    existing = {t.untyped_storage().data_ptr() for t in (*transformer.parameters(), *transformer.buffers(),
                                                          *inputs.values())}  # views of weights are not activations
    for block, storage_ref, nbytes in made.made:
        storage = storage_ref()
        if storage is not None and storage.data_ptr() not in existing:
            alive[storage.data_ptr()] = (block, nbytes)
    kept = {}
    for block, nbytes in alive.values():
        kept[block] = kept.get(block, 0) + nbytes
    loss.backward()
    seconds = time.perf_counter() - start
    for handle in handles:
        handle.remove()
    grads = {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}
    transformer.zero_grad(set_to_none=True)
    return dict(kept=kept, seconds=seconds, grads=grads, prediction=kept_prediction)


def compare(a: dict, b: dict) -> dict:
    """How far run b's prediction and LoRA gradients are from run a's (the largest gradient difference also relative
    to the largest gradient)."""
    grad_diff = max((a["grads"][n] - g).abs().max().item() for n, g in b["grads"].items())
    largest = max(g.abs().max().item() for g in a["grads"].values())
    return dict(same_grad_names=a["grads"].keys() == b["grads"].keys(), max_grad_diff=grad_diff,
                max_grad_diff_relative=grad_diff / largest,
                max_prediction_diff=(a["prediction"] - b["prediction"]).abs().max().item())


RUNS = ("bf16, as peft and diffusers compute it", "+ LoRA inputs left to autocast",
        "+ RMSNorm keeping only its input (bf16 training)", "int8 (with both levers above), bitsandbytes' autograd",
        "+ int8 layers keeping no input (int8 training)")
LEVERS = {"lora_input_lever": (RUNS[0], RUNS[1]), "rms_norm_lever": (RUNS[1], RUNS[2]),
          "int8_lever": (RUNS[3], RUNS[4])}


def measure(model: str = "tiny_sd35", num_layers: int | None = None, resolution: int | None = None,
            text_tokens: int = 154, seed: int = 0) -> dict:
    """The five runs, and how each lever's run compares with the run before it (gradients, prediction)."""
    resolution = resolution or (512 if model == "sd35m" else 64)
    config = transformer_config(model, num_layers)
    torch.manual_seed(seed)
    base = SD3Transformer2DModel(**config).to(torch.bfloat16).requires_grad_(False)
    int8_model = copy.deepcopy(base)
    quantize_blocks_int8(int8_model)
    batch = make_batch(config, resolution, text_tokens, seed)
    runs = {}
    bf16 = with_lora(base, seed)
    runs[RUNS[0]] = forward_backward(bf16, batch)
    lora_layers = inputs_left_to_autocast(tuner_layers(bf16))
    runs[RUNS[1]] = forward_backward(bf16, batch)
    rms_norms = rms_norms_keep_only_input(bf16)
    runs[RUNS[2]] = forward_backward(bf16, batch)
    del bf16, base
    int8_model = with_lora(int8_model, seed)
    inputs_left_to_autocast(tuner_layers(int8_model))
    rms_norms_keep_only_input(int8_model)
    runs[RUNS[3]] = forward_backward(int8_model, batch)
    int8_layers = int8_layers_keep_no_input(int8_model)
    runs[RUNS[4]] = forward_backward(int8_model, batch)
    return dict(model=model, config=config, resolution=resolution, text_tokens=text_tokens, runs=runs,
                lora_layers_left_to_autocast=lora_layers, rms_norms=rms_norms, int8_layers=int8_layers,
                **{lever: compare(runs[before], runs[after]) for lever, (before, after) in LEVERS.items()})


def main(argv=None) -> int:
    args = parse_args(argv)
    result = measure(args.model, args.num_layers, args.resolution, args.text_tokens, args.seed)
    kinds = block_kinds(result["config"])
    print(f"{result['model']}, {len(kinds)} blocks, {result['resolution']} px, {result['text_tokens']} text tokens: "
          f"memory a bf16 training forward pass leaves for backward (MiB; {result['lora_layers_left_to_autocast']} "
          f"LoRA layers, {result['rms_norms']} RMSNorms, {result['int8_layers']} int8 layers)")
    columns = [*range(len(kinds)), OUTSIDE_BLOCKS]
    print(f"| run | {' | '.join(f'block {i} ({kind})' for i, kind in enumerate(kinds))} | outside blocks | total | "
          f"pass (s) |")
    print("|---" * (len(columns) + 3) + "|")
    for name, run in result["runs"].items():
        cells = " | ".join(f"{run['kept'].get(column, 0) / MIB:.3f}" for column in columns)
        print(f"| {name} | {cells} | {sum(run['kept'].values()) / MIB:.3f} | {run['seconds']:.1f} |")
    for lever in LEVERS:
        c = result[lever]
        print(f"{lever}: LoRA gradients differ by at most {c['max_grad_diff']:.3g} ({c['max_grad_diff_relative']:.2g} "
              f"of the largest; same set: {c['same_grad_names']}), predictions by {c['max_prediction_diff']:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
