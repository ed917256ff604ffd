"""What bitsandbytes' int8 layers keep for backward, measured on the CPU.

    python scripts/int8_memory.py                                                      # tiny SD3.5, seconds
    OMP_NUM_THREADS=1 python scripts/int8_memory.py --model sd35m --num_layers 3 --resolution 512   # real width

One training forward pass of the transformer (the default LoRA targets, rank 4, bf16), then: the bytes of the
transformer blocks' linear-layer inputs still alive (what backward will read), and the LoRA gradients. Three runs
on the same weights and batch:
- bf16: the frozen base in bf16 (no quantisation);
- int8, bitsandbytes' autograd: every linear layer of the blocks a bitsandbytes ``Linear8bitLt`` as
  ``--base_quantization int8`` loads it (threshold 6.0, the BitsAndBytesConfig default);
- int8, keeping no input: the same layers through ``utils.training.int8_layers_keep_no_input``, what training does.

The int8 layers run bitsandbytes' ``MatMul8bitLt``, the function CUDA trains with (on the CPU bitsandbytes trains
with ``MatMul8bitFp``, which keeps the input the same way). ``--model sd35m --num_layers 3`` is SD3.5 Medium's real
width with three of its 24 blocks: a dual-attention block (0-12 in the full model), a plain one (13-22) and the last
one (23); the figures per block kind scale to the full model.
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

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from diffusers import SD3Transformer2DModel  # noqa: E402

from utils.lora import DEFAULT_TRANSFORMER_TARGETS, add_trainable_lora, make_lora_config  # noqa: E402
from utils.tiny_sd3 import SD35M, _variant_config  # noqa: E402
from utils.training import int8_layers_keep_no_input, trainable_to_fp32  # noqa: E402

MIB = 1024 ** 2
INT8_THRESHOLD = 6.0  # diffusers' BitsAndBytesConfig default (llm_int8_threshold)


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


def quantize_blocks_int8(transformer) -> None:
    """Every linear layer of the transformer blocks becomes a frozen bitsandbytes int8 layer, in place."""
    import bitsandbytes as bnb

    for name, module in list(transformer.transformer_blocks.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                int8 = bnb.nn.Linear8bitLt(child.in_features, child.out_features, child.bias is not None,
                                           has_fp16_weights=False, threshold=INT8_THRESHOLD)
                int8.load_state_dict(child.state_dict())
                int8 = int8.to(child.weight.device)  # quantises the weight
                int8.bias.data = int8.bias.data.to(child.weight.dtype) if child.bias is not None else None
                int8.requires_grad_(False)
                setattr(module, child_name, int8)


def block_linear_layers(transformer) -> list[tuple[int, torch.nn.Module]]:
    """(block index, layer) of every frozen base linear layer of the blocks (LoRA's own layers left out)."""
    import bitsandbytes as bnb

    layers = []
    for index, block in enumerate(transformer.transformer_blocks):
        for name, module in block.named_modules():
            if isinstance(module, (torch.nn.Linear, bnb.nn.Linear8bitLt)) and "lora_" not in name:
                layers.append((index, module))
    return layers


def with_lora(transformer, seed: int):
    """The default LoRA (rank 4), its B matrices made non-zero (seeded) so that every LoRA weight has a gradient."""
    add_trainable_lora(transformer, make_lora_config(4, DEFAULT_TRANSFORMER_TARGETS), "default", seed)
    generator = torch.Generator().manual_seed(seed)
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.02
    trainable_to_fp32(transformer)  # as training keeps them
    transformer.train()
    for _, layer in block_linear_layers(transformer):
        layer.train(False)  # bitsandbytes runs MatMul8bitLt, as on CUDA (no dropout lives in these layers)
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


def forward_backward(transformer, batch: dict) -> dict:
    """One training pass: the bytes per block of linear-layer inputs alive between forward and backward, the time,
    the LoRA gradients and the prediction."""
    seen = {}  # storage pointer -> (block, weak reference to the storage, bytes)

    def record(block_index):
        def hook(module, inputs):
            storage = inputs[0].untyped_storage()
            seen.setdefault(storage.data_ptr(), (block_index, weakref.ref(storage), storage.nbytes()))
        return hook

    handles = [layer.register_forward_pre_hook(record(index)) for index, layer in block_linear_layers(transformer)]
    start = time.perf_counter()
    inputs = {k: v for k, v in batch.items() if k != "target"}
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as accelerate runs the prepared model under bf16
        prediction = transformer(**inputs, return_dict=False)[0]
    loss = (prediction.float() - batch["target"].float()).pow(2).mean()
    kept_prediction = prediction.detach().clone()
    del prediction
    gc.collect()
    kept = [0] * len(transformer.transformer_blocks)
    for block_index, storage_ref, nbytes in seen.values():
        if storage_ref() is not None:
            kept[block_index] += nbytes
    loss.backward()
    seconds = time.perf_counter() - start
    for handle in handles:
        handle.remove()
    grads = {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}
    transformer.zero_grad(set_to_none=True)
    return dict(kept_per_block=kept, seconds=seconds, grads=grads, prediction=kept_prediction)


def measure(model: str = "tiny_sd35", num_layers: int | None = None, resolution: int | None = None,
            text_tokens: int = 154, seed: int = 0) -> dict:
    """The three runs (bf16, int8 with bitsandbytes' autograd, int8 keeping no input) and how the last two's
    predictions and LoRA gradients compare."""
    resolution = resolution or (512 if model == "sd35m" else 64)
    config = transformer_config(model, num_layers)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        base = SD3Transformer2DModel(**config).to(torch.bfloat16).requires_grad_(False)
    int8_model = copy.deepcopy(base)
    quantize_blocks_int8(int8_model)
    batch = make_batch(config, resolution, text_tokens, seed)
    bf16 = forward_backward(with_lora(base, seed), batch)
    del base
    int8_model = with_lora(int8_model, seed)
    bnb_autograd = forward_backward(int8_model, batch)
    patched = int8_layers_keep_no_input(int8_model)
    keeping_no_input = forward_backward(int8_model, batch)
    grad_diff = max((bnb_autograd["grads"][n] - g).abs().max().item() for n, g in keeping_no_input["grads"].items())
    return dict(model=model, num_layers=config["num_layers"], resolution=resolution, text_tokens=text_tokens,
                int8_layers=patched, runs={"bf16": bf16, "int8, bitsandbytes' autograd": bnb_autograd,
                                           "int8, keeping no input": keeping_no_input},
                same_lora_grads=bnb_autograd["grads"].keys() == keeping_no_input["grads"].keys(),
                max_grad_diff=grad_diff,
                max_prediction_diff=(bnb_autograd["prediction"] - keeping_no_input["prediction"]).abs().max().item())


def block_kinds(transformer_config_: dict) -> list[str]:
    dual = set(transformer_config_["dual_attention_layers"])
    last = transformer_config_["num_layers"] - 1
    return ["last" if i == last else "dual" if i in dual else "plain" for i in range(transformer_config_["num_layers"])]


def main(argv=None) -> int:
    args = parse_args(argv)
    result = measure(args.model, args.num_layers, args.resolution, args.text_tokens, args.seed)
    kinds = block_kinds(transformer_config(args.model, args.num_layers))
    print(f"{result['model']}, {result['num_layers']} blocks ({', '.join(kinds)}), {result['resolution']} px, "
          f"{result['text_tokens']} text tokens, {result['int8_layers']} int8 layers; linear-layer inputs alive "
          f"between forward and backward (MiB):")
    print(f"| run | {' | '.join(f'block {i} ({kind})' for i, kind in enumerate(kinds))} | all blocks | pass (s) |")
    print("|---" * (len(kinds) + 3) + "|")
    for name, run in result["runs"].items():
        cells = " | ".join(f"{b / MIB:.2f}" for b in run["kept_per_block"])
        print(f"| {name} | {cells} | {sum(run['kept_per_block']) / MIB:.2f} | {run['seconds']:.1f} |")
    print(f"keeping no input vs bitsandbytes' autograd: LoRA gradients differ by at most {result['max_grad_diff']:.3g} "
          f"(same set: {result['same_lora_grads']}), predictions by {result['max_prediction_diff']:.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
