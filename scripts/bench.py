"""Benchmark one training step of stage 1, stage 2 and the authors' design on the same model, batch and resolution.

    python scripts/bench.py --model tiny_sd35                                  # CPU, tiny: about a minute
    python scripts/bench.py --model sd35m --resolution 512 --extra="--mixed_precision bf16 --compile"  # GPU
    python scripts/bench.py --model /path/to/SD3.5-medium --resolution 1024 --infer --json bench.json

``--model``: a local pipeline folder, ``tiny_sd3`` / ``tiny_sd35`` (built here), or ``sd35m`` (SD3.5 Medium's real
configs with random weights, built here on the GPU in bf16, never kept). Stage 1 and stage 2 are the project's own
scripts (their ``main``, run in this process one after the other, with --extra appended); the authors' design is
their release's structure written out here for comparison: two transformer copies (trainable + reference), the
three text encoders kept on the device and run on the batch's prompts every step.

For each design it prints and writes (--json): the median step time after --warmup steps; the first step's time (with
--compile: mostly compilation); from torch.profiler on one step, the aten operators dispatched, (CUDA) the device
time of its kernels, whose ratio to the step time says how GPU-bound the step is, and where the host's time goes (the
step function, within it the VAE latents and the transformer passes, backward, clipping, the optimizer step, waits
for the device); text-encoder passes per step; the training-phase peak (after prompt encoding) and the process peak
of memory (CUDA: max_memory_allocated; CPU: peak resident set); each step's loss. Without stage1 in --designs, stage
1 runs one eager step to make stage 2's extractor and is not measured. --inductor_cudagraphs is an experiment:
inductor's CUDA graphs over what --compile compiles. With --infer: the time of one image from the base model, the
stage-2 LoRA unfused, and the LoRA fused (infer.py's default), and how far the fused image is from the unfused one.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate.state import PartialState
from torch.profiler import ProfilerActivity, profile, record_function

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import train_stage1_sd3 as stage1  # noqa: E402
import train_stage2_v2_sd3 as stage2  # noqa: E402
import utils.prompts  # noqa: E402
import utils.training  # noqa: E402
from utils.tiny_sd3 import build_sd35m, build_tiny_sd3  # noqa: E402

GIB = 1024 ** 3


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny_sd35", help="tiny_sd3, tiny_sd35, sd35m or a pipeline folder.")
    p.add_argument("--resolution", type=int, default=None, help="Default: 64 for the tiny models, 512 otherwise.")
    p.add_argument("--designs", default="stage1,stage2,authors")
    p.add_argument("--warmup", type=int, default=2, help="Steps not timed (compilation, allocator warm-up).")
    p.add_argument("--steps", type=int, default=5, help="Timed steps.")
    p.add_argument("--extra", default="", help='Flags for both stage scripts, e.g. "--mixed_precision bf16 --compile".')
    p.add_argument("--infer", action="store_true", help="Also time base / LoRA / fused-LoRA image generation.")
    p.add_argument("--infer_steps", type=int, default=28)
    p.add_argument("--json", default=None, help="Write the results here.")
    p.add_argument("--workdir", default=None, help="Where models and runs go (default: a temporary folder).")
    p.add_argument("--inductor_cudagraphs", action="store_true",
                   help="Experiment: inductor's CUDA graphs (what mode='reduce-overhead' turns on) for everything "
                        "--compile compiles, with a new CUDA-graph step marked before each step. Needs --compile in "
                        "--extra; on the CPU it changes nothing.")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------- measuring
def device_of() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peak() -> None:
    """CUDA: the allocator's peak; CPU: the kernel's peak resident set (VmHWM, reset through clear_refs)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")


def peak_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / GIB
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def profile_step(fn):
    """Run ``fn`` under torch.profiler: (its result, aten operators dispatched, CUDA kernel time in ms, CUDA
    kernels run, host milliseconds of the step's labelled parts: see host_breakdown)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        result = fn()
        synchronize()
    events = prof.events()
    aten = sum(1 for e in events if e.name.startswith("aten::"))
    kernels = device_kernels(events)
    device_us = sum(e.self_device_time_total for e in kernels)
    return result, aten, device_us / 1000.0, len(kernels), host_breakdown(events)


def device_kernels(events) -> list:
    """The device-side events, less the GPU copies of label_parts' record_function ranges: each of those spans
    the kernels inside it, so counting it too would count their time twice (as the H200 run of 2026-11-27 did)."""
    return [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA") and not e.name.startswith(PART)]


PART = "bench::"  # the record_function ranges label_parts opens


def host_breakdown(events) -> dict:
    """Host milliseconds of each labelled part of one step (wall time of its range on the CPU, whatever the device
    does meanwhile), plus the time the host spent blocked on the device in .item() and friends
    (aten::_local_scalar_dense): where a launch-bound step's wall time goes."""
    parts = {}
    for event in events:
        if event.name.startswith(PART):
            name = event.name[len(PART):]
            parts[name] = parts.get(name, 0.0) + event.cpu_time_total / 1000.0
    parts["waits for the device (.item())"] = sum(e.cpu_time_total for e in events
                                                   if e.name == "aten::_local_scalar_dense") / 1000.0
    return {name: round(ms, 2) for name, ms in parts.items()}


def labelled(label: str, fn):
    """``fn`` inside a record_function range named PART + label."""
    def call(*args, **kwargs):
        with record_function(PART + label):
            return fn(*args, **kwargs)
    return call


@contextmanager
def label_parts(script, trainer):
    """Open a named record_function range around the parts of one training step: within the stage's step
    function, the latents (VAE encoding) and the transformer passes; then backward, clipping and the optimizer step.
    Patches the script's and the trainer's callables for the duration only."""
    accelerator, optimizer = trainer.accelerator, trainer.optimizer
    targets = [(script, "batch_latents", "latents (VAE)"), (script, "predict", "transformer passes"),
               (accelerator, "backward", "backward"), (accelerator, "clip_grad_norm_", "clip"),
               (optimizer, "step", "optimizer step")]
    saved = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in targets]
    for owner, name, label in targets:
        setattr(owner, name, labelled(label, getattr(owner, name)))
    try:
        yield
    finally:
        for owner, name, value in saved:
            if value is None:
                delattr(owner, name)  # it was the class's method
            else:
                setattr(owner, name, value)


class StepMeter:
    """Times every call of utils.training.accumulate_batch (one optimizer step at accumulation 1), profiles the one
    after the warm-up, counts text-encoder passes during training, and marks the end of prompt encoding (the
    script's load_diffusion_parts) to split the memory peaks."""

    def __init__(self, warmup: int, mark_cudagraph_steps: bool = False):
        self.warmup, self.times, self.aten, self.device_ms, self.kernels = warmup, [], None, None, None
        self.host_ms, self.mark_cudagraph_steps, self.losses = None, mark_cudagraph_steps, []
        self.encoder_passes, self.training, self.encoding_peak = 0, False, None

    def install(self, script, monkeypatch_list: list):
        real_step, real_load = utils.training.accumulate_batch, script.load_diffusion_parts
        real_clip, real_t5 = utils.prompts.encode_clip, utils.prompts.encode_t5

        def timed_step(trainer, step_fn, *args, **kwargs):
            synchronize()
            if self.mark_cudagraph_steps:  # CUDA-graph trees: this step may overwrite the last one's outputs
                torch.compiler.cudagraph_mark_step_begin()
            start = time.perf_counter()
            if len(self.times) == self.warmup and self.aten is None:
                with label_parts(script, trainer):
                    step_fn = labelled("step function (noise, forward passes, loss)", step_fn)
                    result, self.aten, self.device_ms, self.kernels, self.host_ms = profile_step(
                        lambda: real_step(trainer, step_fn, *args, **kwargs))
            else:
                result = real_step(trainer, step_fn, *args, **kwargs)
            synchronize()
            self.times.append(time.perf_counter() - start)
            self.losses.append(round(float(result["loss"]), 5))
            return result

        def marked_load(*args, **kwargs):
            self.encoding_peak = peak_gib()
            reset_peak()
            self.training = True
            return real_load(*args, **kwargs)

        def counted_clip(*args, **kwargs):
            self.encoder_passes += 2 if self.training else 0  # CLIP-L and CLIP-G
            return real_clip(*args, **kwargs)

        def counted_t5(*args, **kwargs):
            self.encoder_passes += 1 if self.training else 0
            return real_t5(*args, **kwargs)

        for owner, name, value in ((utils.training, "accumulate_batch", timed_step),
                                   (script, "load_diffusion_parts", marked_load),
                                   (utils.prompts, "encode_clip", counted_clip), (utils.prompts, "encode_t5", counted_t5)):
            monkeypatch_list.append((owner, name, getattr(owner, name)))
            setattr(owner, name, value)

    def result(self, steps: int) -> dict:
        timed = self.times[self.warmup:]
        median = statistics.median(timed)
        training_peak = peak_gib()
        return {"median_step_s": median, "first_step_s": self.times[0], "aten_ops_per_step": self.aten,
                "cuda_kernels_per_step": self.kernels,
                "device_ms_per_step": self.device_ms if torch.cuda.is_available() else None,
                "wall_over_device": median * 1000 / self.device_ms if torch.cuda.is_available() and self.device_ms
                else None,
                "text_encoder_passes_per_step": self.encoder_passes / max(1, len(self.times)),
                "training_peak_gib": training_peak,
                "process_peak_gib": max(training_peak, self.encoding_peak or 0.0), "steps_timed": len(timed),
                "host_ms_of_profiled_step": self.host_ms,
                "losses": self.losses}  # the same seeds give the same losses with and without --compile (to bf16 noise)


def run_keeping_process_group(script, argv: list) -> None:
    """``script.main(argv)``. Under `accelerate launch` (DDP, FSDP) the script's end_training would destroy the
    process group that the next script run in this process needs; main() destroys it once at the end."""
    real = PartialState.destroy_process_group
    PartialState.destroy_process_group = lambda self, group=None: None
    try:
        script.main(argv)
    finally:
        PartialState.destroy_process_group = real


def run_script(script, argv: list, warmup: int, steps: int, mark_cudagraph_steps: bool = False) -> dict:
    meter, patches = StepMeter(warmup, mark_cudagraph_steps), []
    reset_peak()
    meter.install(script, patches)
    try:
        run_keeping_process_group(script, argv)
    finally:
        for owner, name, value in patches:
            setattr(owner, name, value)
    result = meter.result(steps)
    gc.collect()
    return result


# ----------------------------------------------------------------------------------------------- the authors' design
def authors_design(model: str, resolution: int, warmup: int, steps: int, extractor: Path, mixed_precision: str) -> dict:
    """The release's stage 2, written out: a trainable transformer with a new LoRA, a second full transformer copy
    holding the stage-1 LoRA as the reference, the three text encoders on the device encoding the batch's prompts,
    base prompts and [target; ""] every step; then the same PureCC loss (utils/purecc_loss.py, fixed lambda)."""
    from accelerate import Accelerator
    from diffusers import StableDiffusion3Pipeline

    from utils.data import read_concept_csv
    from utils.dataset import load_image
    from utils.flow_matching import add_noise, encode_latents, velocity_target
    from utils.lora import add_trainable_lora, load_lora_as_adapter, make_lora_config, transformer_target_modules
    from utils.purecc_loss import extractor_delta, purecc_lambda, purecc_loss

    reset_peak()
    accelerator = Accelerator(mixed_precision=mixed_precision)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    device = accelerator.device
    pipe = StableDiffusion3Pipeline.from_pretrained(model, dtype=dtype).to(device)
    reference = type(pipe.transformer).from_pretrained(model, subfolder="transformer", dtype=dtype).to(device)
    load_lora_as_adapter(reference, extractor, "ref", trainable=False)
    reference.to(device, dtype)
    transformer = pipe.transformer
    for module in (transformer, reference, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        module.requires_grad_(False)
    add_trainable_lora(transformer, make_lora_config(4, transformer_target_modules(None, None)), "default", seed=0)
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    pipe.vae.to(torch.float32)
    rows = read_concept_csv(REPO_ROOT / "data", "robot_toy.csv")
    flags = argparse.Namespace(weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
    passes = {"n": 0}
    for encoder in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
        encoder.register_forward_hook(lambda *_: passes.__setitem__("n", passes["n"] + 1))

    def encode(prompts):
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device, do_classifier_free_guidance=False,
                                                  max_sequence_length=77)
        return embeds, pooled

    def step(index):
        row = rows[index % len(rows)]
        generator = torch.Generator().manual_seed(index)
        pixels = load_image(row.image_path, resolution, True, False, None).unsqueeze(0).to(device)
        with torch.no_grad():
            x0 = encode_latents(pipe.vae, pixels, generator=generator)
        noised = add_noise(x0, pipe.scheduler, flags, generator)
        with torch.no_grad():  # the release encodes every step: prompts, base prompts, [target; ""]
            prompt_embeds, prompt_pooled = encode([row.prompt])
            base_embeds, base_pooled = encode([row.base_prompt])
            ref_embeds, ref_pooled = encode([row.target_prompt, ""])
        x_t, t = noised.repeat(2)
        with accelerator.autocast():
            pred = transformer(hidden_states=x_t, timestep=t, encoder_hidden_states=torch.cat([prompt_embeds, base_embeds]),
                               pooled_projections=torch.cat([prompt_pooled, base_pooled]), return_dict=False)[0]
            with torch.no_grad():
                ref = reference(hidden_states=x_t, timestep=t, encoder_hidden_states=ref_embeds,
                                pooled_projections=ref_pooled, return_dict=False)[0]
        v, v_base = pred.chunk(2)
        delta = extractor_delta(*ref.chunk(2))
        loss = purecc_loss(v, v_base, delta, velocity_target(noised.x0, noised.noise), noised.weights, 2.0,
                           purecc_lambda("fixed", v, v_base, delta)).total
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times, aten, device_ms, kernels = [], None, None, None
    encoding_peak = 0.0  # the encoders never leave: there is no separate encoding phase
    for index in range(warmup + steps):
        synchronize()
        start = time.perf_counter()
        if index == warmup:
            passes["n"] = 0
            _, aten, device_ms, kernels, host_ms = profile_step(lambda: step(index))
            passes_per_step = passes["n"]
        else:
            step(index)
        synchronize()
        times.append(time.perf_counter() - start)
    median = statistics.median(times[warmup:])
    peak = peak_gib()
    del pipe, reference, transformer, optimizer
    gc.collect()
    return {"median_step_s": median, "first_step_s": times[0], "aten_ops_per_step": aten,
            "cuda_kernels_per_step": kernels, "device_ms_per_step": device_ms if torch.cuda.is_available() else None,
            "wall_over_device": median * 1000 / device_ms if torch.cuda.is_available() and device_ms else None,
            "text_encoder_passes_per_step": passes_per_step, "training_peak_gib": peak,
            "process_peak_gib": max(peak, encoding_peak), "steps_timed": steps, "host_ms_of_profiled_step": host_ms}


# ----------------------------------------------------------------------------------------------- inference
def inference(model: str, lora: Path, resolution: int, steps: int, mixed_precision: str) -> dict:
    """One image each from the base model, the LoRA unfused and the LoRA fused, same seed; their times (after a
    warm-up image) and the largest pixel difference fused vs unfused."""
    import numpy as np
    from diffusers import StableDiffusion3Pipeline

    from utils.generation import add_loras, render

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)
    pipe = StableDiffusion3Pipeline.from_pretrained(model, dtype=dtype)
    add_loras(pipe, [lora], [None])
    pipe.to(device_of())
    pipe.set_progress_bar_config(disable=True)

    def timed(label):
        render(pipe, "a photo of sks robot toy on the moon", [0], 2, 7.0, resolution, resolution, 77)  # warm-up
        synchronize()
        start = time.perf_counter()
        image = render(pipe, "a photo of sks robot toy on the moon", [0], steps, 7.0, resolution, resolution, 77)[0]
        synchronize()
        return time.perf_counter() - start, np.asarray(image).astype(np.int16)

    pipe.disable_lora()
    base_s, base_image = timed("base")
    pipe.enable_lora()
    unfused_s, unfused_image = timed("unfused")
    pipe.fuse_lora(components=["transformer"], adapter_names=["lora1"])
    fused_s, fused_image = timed("fused")
    return {"resolution": resolution, "steps": steps, "base_s": base_s, "lora_unfused_s": unfused_s,
            "lora_fused_s": fused_s, "unfused_over_base": unfused_s / base_s, "fused_over_base": fused_s / base_s,
            "fused_vs_unfused_max_pixel_diff": int(np.abs(fused_image - unfused_image).max()),
            "lora_vs_base_max_pixel_diff": int(np.abs(unfused_image - base_image).max())}


# ----------------------------------------------------------------------------------------------- main
def prepare_model(name: str, workdir: Path) -> tuple[Path, int]:
    """(pipeline folder, default resolution)."""
    if name in ("tiny_sd3", "tiny_sd35"):
        return build_tiny_sd3(workdir / name, variant=name[5:]), 32 if name == "tiny_sd3" else 64
    if name == "sd35m":
        require_gpu = torch.cuda.is_available()
        if not require_gpu:
            raise SystemExit("error: --model sd35m builds a 15 GB model on the GPU; there is none here.")
        start = time.time()
        folder = build_sd35m(workdir / "sd35m", device="cuda", dtype=torch.bfloat16)
        print(f"[bench] built sd35m in {time.time() - start:.0f} s", flush=True)
        return folder, 512
    return Path(name), 512


def without_compile(flags: list) -> list:
    """``flags`` less --compile and --compile_backend NAME."""
    kept, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag == "--compile_backend":
            skip = True
        elif flag != "--compile" and not flag.startswith("--compile_backend="):
            kept.append(flag)
    return kept


def announce(name: str, result: dict) -> dict:
    """Print one design's figures as soon as they are measured (a run cut short by a time limit keeps them)."""
    host = ", ".join(f"{part} {ms:.1f}" for part, ms in (result["host_ms_of_profiled_step"] or {}).items())
    print(f"[bench] {name}: median step {result['median_step_s']:.3f} s, first step {result['first_step_s']:.1f} s, "
          f"device {result['device_ms_per_step']} ms, "
          f"aten ops {result['aten_ops_per_step']}, peaks {result['training_peak_gib']:.2f} / "
          f"{result['process_peak_gib']:.2f} GiB; losses {result.get('losses')}; host ms of the profiled step: {host}",
          flush=True)
    return result


def table(results: dict) -> str:
    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = ["| design | median step (s) | device time (ms) | wall / device | aten ops | text-encoder passes | "
             "training peak (GiB) | process peak (GiB) |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['median_step_s']:.3f} | {cell(r['device_ms_per_step'], '.1f')} | "
                     f"{cell(r['wall_over_device'], '.2f')} | {r['aten_ops_per_step']} | "
                     f"{r['text_encoder_passes_per_step']:g} | {r['training_peak_gib']:.2f} | {r['process_peak_gib']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    extra = shlex.split(args.extra)
    if args.inductor_cudagraphs and "--compile" not in extra:
        raise SystemExit('error: --inductor_cudagraphs changes what --compile compiles: add --extra="--compile".')
    torch.manual_seed(0)
    if args.inductor_cudagraphs:
        import torch._inductor.config as inductor_config

        inductor_config.triton.cudagraphs = True
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="purecc-bench-"))
    model, default_resolution = prepare_model(args.model, workdir)
    resolution = args.resolution or default_resolution
    mixed_precision = extra[extra.index("--mixed_precision") + 1] if "--mixed_precision" in extra else "no"
    common = ["--pretrained_model_name_or_path", str(model), "--data_path", str(REPO_ROOT / "data"), "--csv_name",
              "robot_toy.csv", "--resolution", str(resolution), "--max_train_steps", str(args.warmup + args.steps),
              "--checkpointing_steps", "100000", "--report_to", "none", "--learning_rate", "1e-4"]
    designs = args.designs.split(",")
    results = {}
    stage1_out = workdir / "runs" / "base_ckpt" / "robot_toy"
    stage1_argv = common + ["--output_dir", str(stage1_out), "--overwrite_output_dir"]
    if "stage1" in designs:
        results["stage1"] = announce("stage1", run_script(stage1, stage1_argv + extra, args.warmup, args.steps,
                                                          args.inductor_cudagraphs))
    elif "stage2" in designs or "authors" in designs:  # stage 1 only makes their extractor: one eager step, unmeasured
        run_keeping_process_group(stage1, stage1_argv + without_compile(extra) + ["--max_train_steps", "1"])
    if "stage2" in designs:
        results["stage2"] = announce("stage2", run_script(stage2, common + ["--output_dir", str(workdir / "runs"),
                                                                            "--overwrite_output_dir", *extra],
                                                          args.warmup, args.steps, args.inductor_cudagraphs))
    if "authors" in designs:
        results["authors (release)"] = announce("authors (release)", authors_design(
            str(model), resolution, args.warmup, args.steps, stage1_out, mixed_precision))
    report = {"model": args.model, "resolution": resolution, "device": torch.cuda.get_device_name()
              if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)",
              "extra": args.extra, "inductor_cudagraphs": args.inductor_cudagraphs, "torch": torch.__version__,
              "under_fsdp": os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true", "designs": results}
    print(table(results))
    if "stage1" in results and "stage2" in results:
        print(f"stage 2 / stage 1 step time: {results['stage2']['median_step_s'] / results['stage1']['median_step_s']:.2f}")
    if args.infer:
        lora = workdir / "runs" / "robot_toy"
        report["inference"] = inference(str(model), lora if lora.is_dir() else stage1_out, resolution,
                                        args.infer_steps, mixed_precision)
        print(json.dumps(report["inference"], indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
