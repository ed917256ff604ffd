"""Speed and memory features keep the maths: --compile gives the same losses without recompiling every step, LoRA
inputs left to autocast and int8 layers that keep no input leave less for backward with bitwise the same numbers, the
text encoders visit the device one at a time, the optimizer is fused; scripts/bench.py runs and reports (its
figures are printed, not asserted: speed is measured by benchmarks, not by tests)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import stage1, stage2

from utils.checks import BadInput


def load_script(name: str):
    import importlib.util

    from helpers import REPO_ROOT

    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_bench():
    return load_script("bench")


def deeper_copy(model, out, num_layers: int):
    """``model`` (a tiny pipeline folder) with a transformer of ``num_layers`` random blocks, all but the last with
    dual attention (two block kinds, as the tiny model has, so compiling costs what it costs there); the other parts
    are links to the original's."""
    from diffusers import SD3Transformer2DModel

    out.mkdir()
    for part in model.iterdir():
        if part.name != "transformer":
            (out / part.name).symlink_to(part)
    config = json.loads((model / "transformer" / "config.json").read_text())
    config = {key: value for key, value in config.items() if not key.startswith("_")}
    config.update(num_layers=num_layers, dual_attention_layers=tuple(range(num_layers - 1)))
    torch.manual_seed(0)
    SD3Transformer2DModel(**config).save_pretrained(out / "transformer")
    return out


def test_compile_gives_the_same_losses_and_a_bounded_number_of_graphs(tiny_sd35_path, tmp_path):
    """Stage 2 (two adapters, switched every step, plus the frozen base branch) with its transformer blocks compiled:
    fp32 losses equal the eager ones to 1e-6; the graphs are made in the first step and reused after; and the blocks
    of one kind share their compiled code: a block forward has fewer compiled versions than the model (10 blocks of
    2 kinds, 3 passes a step) has blocks. A per-block object that compilation guards on (once, a per-instance
    function on each RMSNorm) compiles every block on its own: 30 versions here."""
    from diffusers.models.attention import JointTransformerBlock
    from torch._dynamo.utils import counters

    num_layers = 10
    model = deeper_copy(tiny_sd35_path, tmp_path / "deeper", num_layers)
    stage1(model, tmp_path / "extractor", "--learning_rate", "1e-2", steps=2)
    flags = ["--stage1_output_dir", tmp_path / "extractor", "--original_branch", "frozen", "--random_flip"]
    eager = stage2(model, tmp_path / "eager", *flags, steps=4)
    counters.clear()
    graphs_per_step = []
    import utils.training

    real_accumulate = utils.training.accumulate_batch

    def counting(*args, **kwargs):
        out = real_accumulate(*args, **kwargs)
        graphs_per_step.append(counters["stats"]["unique_graphs"])
        return out

    utils.training.accumulate_batch = counting
    try:
        compiled = stage2(model, tmp_path / "compiled", *flags, "--compile", "--compile_backend", "aot_eager",
                          steps=4)
        # dynamo's cache of compiled versions of the block forward, one entry per version, over all blocks
        block_versions = torch._C._dynamo.eval_frame._debug_get_cache_entry_list(JointTransformerBlock.forward.__code__)
    finally:
        utils.training.accumulate_batch = real_accumulate
        torch._dynamo.reset()
    for a, b in zip(eager.history, compiled.history):
        for key in ("loss", "diff_loss", "pri_loss", "lambda"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
    assert graphs_per_step[0] >= 2  # the blocks really went through the compiler
    assert graphs_per_step[1:] == [graphs_per_step[0]] * 3  # and nothing recompiled after the first step
    assert 3 <= len(block_versions) < num_layers, len(block_versions)


def test_lora_inputs_keep_peft_casts_where_autocast_does_not_cast():
    """Without autocast (validation, inference) peft's cast still runs: a bf16 input cannot meet fp32 LoRA weights in
    a matmul; a layer with LoRA dropout keeps it too (dropout computes on the cast input)."""
    from diffusers import SD3Transformer2DModel

    from utils.lean_backward import inputs_left_to_autocast
    from utils.lora import add_lora, make_lora_config, tuner_layers

    memory = load_script("backward_memory")
    config = memory.transformer_config("tiny_sd35", None)
    model = memory.with_lora(SD3Transformer2DModel(**config).to(torch.bfloat16).requires_grad_(False), seed=0)
    assert inputs_left_to_autocast(tuner_layers(model)) == 15
    batch = memory.make_batch(config, resolution=64, text_tokens=154, seed=0)
    with torch.no_grad():
        assert model(**{k: v for k, v in batch.items() if k != "target"}, return_dict=False)[0].dtype == torch.bfloat16
    with_dropout = SD3Transformer2DModel(**config)
    add_lora(with_dropout, make_lora_config(4, ["attn.to_q"], dropout=0.1), "default")
    assert inputs_left_to_autocast(tuner_layers(with_dropout)) == 0


def test_stage2_bf16_losses_with_and_without_the_bf16_levers(tiny_sd35_path, extractors, tmp_path,
                                                         monkeypatch, fresh_accelerator_state):
    """The training scripts leave LoRA inputs to autocast: a bf16 stage-2 run gives the losses and lambdas of a run
    with peft's casts, to the last bit. Its RMSNorms keep only their input: the first loss is bitwise that of
    diffusers' RMSNorm (same forward), the later ones (after updates from gradients that differ by bf16 rounding)
    within 0.1% (1e-6 measured)."""
    import utils.training

    from accelerate.state import AcceleratorState
    from utils.lean_backward import _InputLeftToAutocast
    from utils.lora import tuner_layers

    flags = ["--stage1_output_dir", extractors[0], "--mixed_precision", "bf16"]
    without_casts = stage2(tiny_sd35_path, tmp_path / "without", *flags, steps=3)
    assert all(isinstance(layer, _InputLeftToAutocast) for layer in tuner_layers(without_casts.transformer))
    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setattr(utils.training, "inputs_left_to_autocast", lambda layers: 0)  # peft's casts kept
    with_casts = stage2(tiny_sd35_path, tmp_path / "with", *flags, steps=3)
    assert len(with_casts.history) == 3
    for a, b in zip(with_casts.history, without_casts.history):
        for key in ("loss", "diff_loss", "pri_loss", "lambda"):
            assert a[key] == b[key], key
    AcceleratorState._reset_state(reset_partial_state=True)
    monkeypatch.setattr(utils.training, "rms_norms_keep_only_input", lambda model: 0)  # diffusers' RMSNorm autograd
    diffusers_norms = stage2(tiny_sd35_path, tmp_path / "norms", *flags, steps=3)
    assert diffusers_norms.history[0]["loss"] == with_casts.history[0]["loss"]  # same forward, before any update
    for a, b in zip(diffusers_norms.history, with_casts.history):
        for key in ("loss", "diff_loss", "pri_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-3), key


def test_text_encoders_visit_the_device_one_at_a_time(tiny_sd35_path, tmp_path, monkeypatch):
    import utils.prompts

    seen = []
    real_clip = utils.prompts.encode_clip

    def spy(pipe, prompts, device):
        seen.append(pipe.text_encoder_3 is None)  # T5 already freed when CLIP encodes
        return real_clip(pipe, prompts, device)

    monkeypatch.setattr(utils.prompts, "encode_clip", spy)
    stage1(tiny_sd35_path, tmp_path / "out", "--text_encoder_device", "cpu", steps=1)
    assert seen == [True]


def test_t5_visits_the_device_one_block_at_a_time(tiny_sd35_path):
    """Each T5 block is moved to the encoding device just before it runs and off it right after, so no two blocks
    are there at once; the embeddings are bitwise those of the whole encoder."""
    from utils.prompts import encode_t5, load_text_pipeline, t5_blocks_visiting

    pipe = load_text_pipeline(str(tiny_sd35_path))
    prompts = ["a photo of sks robot toy", ""]
    with torch.no_grad():
        whole = encode_t5(pipe, prompts, torch.device("cpu"), 77)
    events = []
    blocks = pipe.text_encoder_3.encoder.block
    for index, block in enumerate(blocks):
        def spy_to(*args, index=index, real_to=block.to, **kwargs):
            events.append((index, "moved"))
            return real_to(*args, **kwargs)

        def spy_forward(*args, index=index, real_forward=block.forward, **kwargs):
            events.append((index, "ran"))
            return real_forward(*args, **kwargs)

        block.to, block.forward = spy_to, spy_forward
    with torch.no_grad(), t5_blocks_visiting(pipe.text_encoder_3, torch.device("cpu")):
        streamed = encode_t5(pipe, prompts, torch.device("cpu"), 77)
    assert len(blocks) >= 2 and events == [(i, e) for i in range(len(blocks)) for e in ("moved", "ran", "moved")]
    assert torch.equal(whole, streamed)


def test_adamw_is_fused():
    from utils.training import make_optimizer

    args = SimpleNamespace(optimizer="adamw", use_8bit_adam=False, adam_beta1=0.9, adam_beta2=0.999,
                           adam_weight_decay=1e-4, adam_epsilon=1e-8)
    optimizer = make_optimizer(args, [{"params": [torch.nn.Parameter(torch.zeros(3))], "lr": 1e-3}])
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_quantised_base_needs_a_gpu(tiny_sd35_path, tmp_path):
    with pytest.raises(BadInput, match="--base_quantization nf4 needs a CUDA GPU"):
        stage1(tiny_sd35_path, tmp_path / "out", "--base_quantization", "nf4")


def test_backward_memory_levers_keep_less_and_keep_the_numbers():
    """scripts/backward_memory.py on the tiny SD3.5 model (CPU, bf16 autocast): each lever leaves fewer bytes for
    backward in every block. Leaving LoRA inputs to autocast and int8 layers keeping no input change no number; the
    RMSNorm keeping only its input gives the same prediction and LoRA gradients to bf16 rounding. int8 then keeps
    exactly what bf16 keeps (bitsandbytes' own autograd keeps every int8 layer's input; a frozen bf16 layer keeps
    none)."""
    result = load_script("backward_memory").measure("tiny_sd35")
    before, lora_inputs, bf16, int8_bnb, int8 = (run["kept"] for run in result["runs"].values())
    for block in (0, 1):
        assert before[block] > lora_inputs[block] > bf16[block] > 0 and int8_bnb[block] > int8[block]
    assert int8 == bf16
    assert result["lora_layers_left_to_autocast"] == 15  # 8 LoRA layers in the dual block, 7 in the last
    assert result["rms_norms"] == 10  # q/k norms: 6 in the dual block (attn, added, attn2), 4 in the last
    assert result["int8_layers"] == 29  # every linear layer of the blocks: 18 in the dual block, 11 in the last
    for lever in ("lora_input_lever", "int8_lever"):
        assert result[lever]["max_grad_diff"] == result[lever]["max_prediction_diff"] == 0, lever
    rms = result["rms_norm_lever"]
    assert rms["max_prediction_diff"] == 0 and 0 < rms["max_grad_diff_relative"] < 1e-2
    assert all(result[lever]["same_grad_names"] for lever in ("lora_input_lever", "rms_norm_lever", "int8_lever"))
    assert len(result["runs"]["+ LoRA inputs left to autocast"]["grads"]) == 30


def test_rms_norm_keeping_only_its_input_is_diffusers_forward_with_a_closer_gradient():
    """bf16 input: the same output bitwise, a third of the bytes saved for backward (no fp32 copy of the input), and
    an input gradient at least as close to an fp64 reference as autograd's over diffusers' operations; an fp32 input
    runs diffusers' forward as it is."""
    import copy

    from diffusers.models.normalization import RMSNorm

    from utils.lean_backward import rms_norms_keep_only_input

    torch.manual_seed(0)
    norm = RMSNorm(64, eps=1e-6).requires_grad_(False)
    norm.weight.data = torch.randn(64) * 0.5 + 1
    x0, grad_y = torch.randn(2, 4, 50, 64) * 3, torch.randn(2, 4, 50, 64)

    def run(module, dtype):
        x, saved = x0.to(dtype, copy=True).requires_grad_(), {}

        def pack(tensor):
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            y = module.to(dtype)(x * 1)
        y.backward(grad_y.to(dtype))
        return y.detach(), x.grad.double(), sum(saved.values())

    lean = copy.deepcopy(norm)
    assert rms_norms_keep_only_input(lean) == 1
    reference = x0.double().requires_grad_()
    (reference * torch.rsqrt(reference.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.double()).backward(
        grad_y.to(torch.bfloat16).double())
    y, grad, saved = run(norm, torch.bfloat16)
    y_lean, grad_lean, saved_lean = run(lean, torch.bfloat16)
    assert torch.equal(y, y_lean) and saved_lean < saved / 2
    assert (grad_lean - reference.grad).abs().max() <= (grad - reference.grad).abs().max()
    y, grad, saved = run(norm, torch.float32)
    y_lean, grad_lean, saved_lean = run(lean, torch.float32)
    assert torch.equal(y, y_lean) and torch.equal(grad, grad_lean) and saved_lean == saved


def test_int8_layers_with_a_trainable_part_keep_bitsandbytes_autograd():
    import bitsandbytes as bnb

    from utils.lean_backward import int8_layers_keep_no_input

    frozen, trains_bias = (bnb.nn.Linear8bitLt(8, 4, has_fp16_weights=False).to("cpu") for _ in range(2))
    frozen.requires_grad_(False)
    trains_bias.weight.requires_grad_(False)
    model = torch.nn.Sequential(frozen, trains_bias)
    assert int8_layers_keep_no_input(model) == 1
    assert type(frozen) is not bnb.nn.Linear8bitLt and isinstance(frozen, bnb.nn.Linear8bitLt)
    assert type(trains_bias) is bnb.nn.Linear8bitLt


def test_bench_reports_every_design(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "bench.json"
    assert bench.main(["--model", "tiny_sd35", "--warmup", "1", "--steps", "2", "--json", str(out), "--workdir",
                       str(tmp_path / "work")]) == 0
    report = json.loads(out.read_text())
    designs = report["designs"]
    assert list(designs) == ["stage1", "stage2", "authors (release)"]
    for values in designs.values():
        assert values["median_step_s"] > 0 and values["aten_ops_per_step"] > 100 and values["steps_timed"] == 2
        assert values["first_step_s"] > 0
        assert values["process_peak_gib"] >= values["training_peak_gib"] > 0
    # prompts are encoded once in both stages; the release runs the 3 encoders on 3 prompt sets every step
    assert designs["stage1"]["text_encoder_passes_per_step"] == designs["stage2"]["text_encoder_passes_per_step"] == 0
    assert designs["authors (release)"]["text_encoder_passes_per_step"] == 9
    # where the host's time goes: each labelled part of the profiled step, the transformer passes inside the step
    # function; and each step's loss (the same seeds give the same losses with and without --compile)
    for name in ("stage1", "stage2"):
        host = designs[name]["host_ms_of_profiled_step"]
        assert set(host) == {"step function (noise, forward passes, loss)", "latents (VAE)", "transformer passes",
                             "backward", "clip", "optimizer step", "waits for the device (.item())"}
        inside = host["latents (VAE)"] + host["transformer passes"]
        assert 0 < inside < host["step function (noise, forward passes, loss)"]
        assert host["backward"] > 0 and host["optimizer step"] > 0
        losses = designs[name]["losses"]
        assert len(losses) == 3 and all(0 < loss < 100 for loss in losses)
    table = capsys.readouterr().out
    assert "| stage2 |" in table and "stage 2 / stage 1 step time" in table
    assert "[bench] stage2: median step" in table and "transformer passes" in table


def test_bench_device_time_counts_kernels_not_the_labelled_ranges():
    bench = load_bench()
    events = [SimpleNamespace(name="bench::backward", device_type="DeviceType.CUDA", self_device_time_total=900),
              SimpleNamespace(name="ampere_bf16_gemm", device_type="DeviceType.CUDA", self_device_time_total=600),
              SimpleNamespace(name="triton_poi_fused_add_0", device_type="DeviceType.CUDA", self_device_time_total=300),
              SimpleNamespace(name="aten::mm", device_type="DeviceType.CPU", self_device_time_total=600)]
    assert [e.name for e in bench.device_kernels(events)] == ["ampere_bf16_gemm", "triton_poi_fused_add_0"]


def test_bench_makes_an_unmeasured_extractor_without_compiling():
    assert load_bench().without_compile(["--mixed_precision", "bf16", "--compile", "--compile_backend", "aot_eager",
                                         "--compile_backend=inductor", "--rank", "8"]) == [
        "--mixed_precision", "bf16", "--rank", "8"]


def test_bench_cudagraphs_experiment_needs_compile():
    expected = '--inductor_cudagraphs changes what --compile compiles: add --extra="--compile"'
    with pytest.raises(SystemExit, match=expected):
        load_bench().main(["--model", "tiny_sd35", "--inductor_cudagraphs"])


def test_stage2_never_casts_a_quantised_base(tiny_sd35_path, extractors, tmp_path, monkeypatch):
    """A bitsandbytes-quantised transformer refuses ``.to(dtype)`` (diffusers checks ``is_quantized``); stage 2 once
    cast the whole transformer after adding the extractor and failed so with --base_quantization nf4 on an H100.
    Here the tiny base is marked quantised, which arms the same check on the CPU."""
    import train_stage2_v2_sd3

    real_load = train_stage2_v2_sd3.load_diffusion_parts

    def load_marked_quantised(*args, **kwargs):
        scheduler, vae, transformer = real_load(*args, **kwargs)
        transformer.is_quantized = True
        return scheduler, vae, transformer

    monkeypatch.setattr(train_stage2_v2_sd3, "load_diffusion_parts", load_marked_quantised)
    stage2(tiny_sd35_path, tmp_path / "out", "--stage1_output_dir", extractors[0], steps=1)
    assert (tmp_path / "out" / "robot_toy" / "pytorch_lora_weights.safetensors").is_file()
