"""Stage 1 (train_stage1_sd3.py) run as a user runs it: ``accelerate launch --cpu --num_processes 1``.

Outputs in both LoRA formats with a model card, --lora_blocks/--lora_layers, --train_text_encoder, the memory
flags with prior preservation, real 8-bit Adam state, checkpoint rotation and a bitwise-exact resume, the bad-input
errors, the diffusers <-> PEFT round trip and that training lowers the flow-matching loss.

Every launch pays ~5 s of imports, so the runs are shared: each test names the runs it reads (``NEEDS``), and one
module fixture starts the runs that the selected tests need, two at a time in the background (imports are
single-threaded; the machine has 2 cores), while the in-process checks run in the foreground."""

from __future__ import annotations

import json
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from launch import REPO_ROOT, launch
from safetensors.torch import load_file

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
PEFT_FILE = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
SCRIPT = "train_stage1_sd3.py"
PROMPT = "a photo of sks robot toy"
COMMON = ["--report_to", "none", "--rank", "4"]
RES = {"sd3": "32", "sd35": "64"}  # the smallest sizes: the sd35 variant needs a multiple of 4
# --random_flip and a small resolution; the same flags for the interrupted and the uninterrupted run
RESUME_FLAGS = ["--random_flip", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2"]


# ------------------------------------------------------------------------------------------- helpers
def lora(folder, name=DIFFUSERS_FILE) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / name))


def script_status(result) -> int:
    """The training script's own exit status. ``accelerate launch`` exits 1 whatever its child's status was and
    reports the child's in its CalledProcessError ("returned non-zero exit status N")."""
    if result.returncode == 0:
        return 0
    found = re.findall(r"returned non-zero exit status (\d+)", result.stderr)
    return int(found[-1]) if found else result.returncode


def load_file_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


def error_line(result) -> str:
    """The script's one ``error: ...`` line (utils.inputs.exit_on_bad_input)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def checkpoint_names(folder) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.startswith("checkpoint-"))


def assert_both_formats(out: Path, rank: int = 4):
    """The diffusers file (keys transformer.*) and the PEFT folder hold the same tensors, alpha kept."""
    for name in (DIFFUSERS_FILE, PEFT_FILE, PEFT_CONFIG):
        assert (out / name).is_file(), f"{name} missing in {out}: {sorted(p.name for p in out.iterdir())}"
    diffusers_state = lora(out)
    assert diffusers_state, "empty LoRA"
    assert all("lora" in key and key.startswith("transformer") for key in diffusers_state), list(diffusers_state)[:5]
    peft_state = lora(out, PEFT_FILE)
    assert set(peft_state) == {"base_model.model." + key[len("transformer."):] for key in diffusers_state}
    for key, value in diffusers_state.items():
        assert torch.equal(peft_state["base_model.model." + key[len("transformer."):]], value), key
    config = json.loads((out / PEFT_CONFIG).read_text())
    assert config["r"] == rank and config["lora_alpha"] == rank and config["peft_type"] == "LORA"


# ---------------------------------------------------------------------------------------------- runs
def _train(ctx, name, model, *args, check=True):
    out = ctx.root / name
    result = launch(SCRIPT, "--pretrained_model_name_or_path", ctx.models[model], "--output_dir", out,
                    "--resolution", RES[model], *COMMON, *args, check=check)
    return SimpleNamespace(out=out, result=result)


def job_folder_sd3(ctx):
    """2 steps on the instance folder; lr 1e-2 so that the LoRA moves visibly away from lora_B = 0."""
    return _train(ctx, "folder_sd3", "sd3", "--instance_data_dir", REPO_ROOT / "data" / "robot_toy",
                  "--instance_prompt", PROMPT, "--max_train_steps", "2", "--learning_rate", "1e-2")


def job_folder_sd35(ctx):
    """2 steps on a folder with upper-case .PNG images and a stray notes.txt (which must be skipped)."""
    folder = ctx.root / "mixed_folder"
    folder.mkdir()
    for index, source in enumerate(sorted((REPO_ROOT / "data" / "robot_toy").glob("*.png"))[:3]):
        shutil.copy(source, folder / f"IMG_{index}.PNG")
    (folder / "notes.txt").write_text("not an image\n")
    run = _train(ctx, "folder_sd35", "sd35", "--instance_data_dir", folder, "--instance_prompt", PROMPT,
                 "--max_train_steps", "2", "--learning_rate", "1e-2")
    run.folder = folder
    return run


def job_csv_blocks(ctx):
    """The concept CSV, LoRA narrowed to block 0's attn.to_k (the two asks share one 2-step run)."""
    return _train(ctx, "csv_blocks", "sd3", "--data_path", "data", "--csv_name", "robot_toy.csv",
                  "--max_train_steps", "2", "--lora_blocks", "0", "--lora_layers", "attn.to_k")


def job_text_encoder(ctx):
    return _train(ctx, "text_encoder", "sd3", "--instance_data_dir", REPO_ROOT / "data" / "robot_toy",
                  "--instance_prompt", PROMPT, "--max_train_steps", "2", "--train_text_encoder")


def job_memory_flags(ctx):
    """--cache_latents --use_8bit_adam --gradient_checkpointing --with_prior_preservation in one run; the class
    folder starts empty, so its 2 images are generated with the base model. A checkpoint keeps the optimizer."""
    class_dir = ctx.root / "class_images"
    run = _train(ctx, "memory_flags", "sd3", "--instance_data_dir", REPO_ROOT / "data" / "robot_toy",
                 "--instance_prompt", PROMPT, "--max_train_steps", "2", "--checkpointing_steps", "2",
                 "--cache_latents", "--use_8bit_adam", "--gradient_checkpointing", "--with_prior_preservation",
                 "--class_data_dir", class_dir, "--class_prompt", "a photo of robot toy", "--num_class_images", "2",
                 "--sample_batch_size", "2")
    run.class_dir = class_dir
    return run


def job_six_steps(ctx):
    run = _train(ctx, "six_steps", "sd3", "--instance_data_dir", REPO_ROOT / "data" / "robot_toy",
                 "--instance_prompt", PROMPT, "--max_train_steps", "6", *RESUME_FLAGS)
    run.checkpoints = checkpoint_names(run.out)
    return run


def job_uninterrupted(ctx):
    return _train(ctx, "uninterrupted", "sd3", "--instance_data_dir", REPO_ROOT / "data" / "robot_toy",
                  "--instance_prompt", PROMPT, "--max_train_steps", "8", *RESUME_FLAGS)


def job_resumed(ctx):
    """4 steps (as if killed), resume from checkpoint-4 to 8, then ask for a checkpoint that does not exist."""
    flags = ["--instance_data_dir", REPO_ROOT / "data" / "robot_toy", "--instance_prompt", PROMPT, *RESUME_FLAGS]
    first = _train(ctx, "resumed", "sd3", *flags, "--max_train_steps", "4")
    after_first = checkpoint_names(first.out)
    lora_at_4 = lora(first.out)
    second = _train(ctx, "resumed", "sd3", *flags, "--max_train_steps", "8", "--resume_from_checkpoint",
                    "checkpoint-4")
    after_resume = checkpoint_names(second.out)
    final_bytes = (second.out / DIFFUSERS_FILE).read_bytes()
    missing = _train(ctx, "resumed", "sd3", *flags, "--max_train_steps", "10", "--resume_from_checkpoint",
                     "checkpoint-99", check=False)
    return SimpleNamespace(out=first.out, after_first=after_first, lora_at_4=lora_at_4, resume=second.result,
                           after_resume=after_resume, final_bytes=final_bytes, missing=missing.result,
                           after_missing=checkpoint_names(first.out))


def job_learning(ctx):
    """30 steps, rank 4. lr 1e-2: with 1e-3 the tiny random model's loss drops only ~0.5% (2.362 -> 2.350)."""
    return _train(ctx, "learning", "sd3", "--data_path", "data", "--csv_name", "robot_toy.csv",
                  "--max_train_steps", "30", "--learning_rate", "1e-2")


def job_empty_folder(ctx):
    folder = ctx.root / "empty_folder"
    folder.mkdir()
    run = _train(ctx, "never_empty", "sd3", "--instance_data_dir", folder, "--instance_prompt", PROMPT,
                 "--max_train_steps", "2", check=False)
    run.folder = folder
    return run


def job_no_prompt(ctx):
    return _train(ctx, "never_no_prompt", "sd3", "--instance_data_dir", REPO_ROOT / "data" / "robot_toy",
                  "--max_train_steps", "2", check=False)


def job_bad_resolution(ctx):
    out = ctx.root / "never_bad_resolution"
    result = launch(SCRIPT, "--pretrained_model_name_or_path", ctx.models["sd35"], "--output_dir", out,
                    "--resolution", "66", *COMMON, "--instance_data_dir", REPO_ROOT / "data" / "robot_toy",
                    "--instance_prompt", PROMPT, "--max_train_steps", "2", check=False)
    return SimpleNamespace(out=out, result=result)


# Start order: the three-launch resume chain first (one worker), then the runs whose outputs the in-process
# tests (round trip, loss) read, so that those overlap with the remaining launches.
JOBS = {"resumed": job_resumed, "folder_sd3": job_folder_sd3, "folder_sd35": job_folder_sd35,
        "csv_blocks": job_csv_blocks, "learning": job_learning, "uninterrupted": job_uninterrupted,
        "memory_flags": job_memory_flags, "six_steps": job_six_steps, "text_encoder": job_text_encoder,
        "empty_folder": job_empty_folder, "no_prompt": job_no_prompt, "bad_resolution": job_bad_resolution}

NEEDS = {
    "test_two_steps_write_both_formats_and_card": ["folder_sd3", "folder_sd35", "csv_blocks"],
    "test_lora_blocks_and_layers_narrow_the_lora": ["csv_blocks"],
    "test_train_text_encoder_adds_clip_loras": ["text_encoder"],
    "test_memory_flags_with_prior_preservation": ["memory_flags"],
    "test_checkpoint_rotation_keeps_the_lora_only": ["six_steps"],
    "test_resume_rotates_and_is_bitwise_equal_to_uninterrupted": ["resumed", "uninterrupted"],
    "test_missing_checkpoint_fails_before_training": ["resumed"],
    "test_roundtrip_diffusers_and_peft_give_the_same_model": ["folder_sd3", "folder_sd35"],
    "test_training_lowers_the_flow_matching_loss": ["learning"],
    "test_txt_and_upper_case_png_folder_trains": ["folder_sd35"],
    "test_empty_folder_fails": ["empty_folder"],
    "test_missing_prompt_and_bad_resolution_fail": ["no_prompt", "bad_resolution"],
}


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory, tiny_sd3_path, tiny_sd35_path):
    """Starts the runs the selected tests of this module need; ``runs("name")`` waits for one and returns it
    (or re-raises its failure, with the script's output, in the test that reads it)."""
    selected = {item.originalname for item in request.session.items
                if getattr(getattr(item, "module", None), "__file__", None) == __file__}
    wanted = {name for test in selected for name in NEEDS.get(test, [])}
    ctx = SimpleNamespace(root=tmp_path_factory.mktemp("stage1_runs"),
                          models={"sd3": tiny_sd3_path, "sd35": tiny_sd35_path})
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="stage1-run")
    futures = {name: pool.submit(job, ctx) for name, job in JOBS.items() if name in wanted}
    try:
        yield lambda name: futures[name].result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def tiny_paths(tiny_sd3_path, tiny_sd35_path):
    return {"sd3": tiny_sd3_path, "sd35": tiny_sd35_path}


# ---------------------------------------------------------------------------------------------- tests
def test_two_steps_write_both_formats_and_card(runs, tiny_paths):
    for name in ("folder_sd3", "folder_sd35", "csv_blocks"):
        out = runs(name).out
        assert_both_formats(out)
        card = (out / "README.md").read_text()
        assert "load_lora_weights" in card and "| steps | 2 |" in card, card
    # the folder runs use the default targets: every attention projection of every block
    keys = lora(runs("folder_sd3").out)
    for layer in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj"):
        assert any(f".{layer}.lora_A" in key for key in keys), layer
    num_layers = json.loads((tiny_paths["sd3"] / "transformer" / "config.json").read_text())["num_layers"]
    assert {key.split(".")[2] for key in keys} == {str(block) for block in range(num_layers)}


@pytest.mark.parametrize("variant", ["sd3", "sd35"])
def test_roundtrip_diffusers_and_peft_give_the_same_model(runs, tiny_paths, variant):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from peft import PeftModel

    out = runs(f"folder_{variant}").out
    tiny = tiny_paths[variant]
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny)
    config = pipe.transformer.config
    generator = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, config.in_channels, 8, 8, generator=generator),
                  encoder_hidden_states=torch.randn(1, 7, config.joint_attention_dim, generator=generator),
                  pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=generator),
                  timestep=torch.tensor([500.0]), return_dict=False)
    with torch.no_grad():
        base = pipe.transformer(**inputs)[0]
        pipe.load_lora_weights(out)
        via_diffusers = pipe.transformer(**inputs)[0]
        peft_model = PeftModel.from_pretrained(SD3Transformer2DModel.from_pretrained(tiny, subfolder="transformer"),
                                               out)
        via_peft = peft_model(**inputs)[0]
    assert torch.allclose(via_diffusers, via_peft, atol=1e-6), (via_diffusers - via_peft).abs().max()
    assert not torch.allclose(via_diffusers, base, atol=1e-4), (via_diffusers - base).abs().max()


def test_training_lowers_the_flow_matching_loss(runs, tiny_sd3_path):
    """The loss stage 1 optimises (x0-preconditioned flow matching) on fixed (noise, timestep) pairs over the
    concept's images: base transformer vs base + the 30-step LoRA."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from utils.data import load_image, read_concept_csv
    from utils.flow_matching import encode_latents, flow_matching_loss, noisy_latents
    from utils.lora import load_lora_as_adapter
    from utils.prompts import PromptCache, load_text_pipeline

    out = runs("learning").out
    rows = read_concept_csv(REPO_ROOT / "data", "robot_toy.csv")
    prompts = [row.target_prompt for row in rows]
    embeds, pooled = PromptCache(load_text_pipeline(str(tiny_sd3_path)), prompts, "cpu", 77).lookup(
        prompts, "cpu", torch.float32)
    vae = AutoencoderKL.from_pretrained(tiny_sd3_path, subfolder="vae")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_sd3_path, subfolder="scheduler")
    pixels = torch.stack([load_image(row.image_path, 32, True, False, None) for row in rows])
    with torch.no_grad():
        x0 = encode_latents(vae, pixels, generator=torch.Generator().manual_seed(0))

    def loss_of(transformer) -> float:
        losses = []
        for seed in range(4):
            generator = torch.Generator().manual_seed(seed)
            noise = torch.randn(x0.shape, generator=generator)
            index = torch.randint(50, 950, (x0.shape[0],), generator=generator)
            sigmas = scheduler.sigmas[index]
            x_t = noisy_latents(x0, noise, sigmas)
            with torch.no_grad():
                pred = transformer(hidden_states=x_t, timestep=scheduler.timesteps[index], encoder_hidden_states=embeds,
                                   pooled_projections=pooled, return_dict=False)[0]
            losses.append(flow_matching_loss(pred, x0, noise, x_t, sigmas, None, True).item())
        return sum(losses) / len(losses)

    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3_path, subfolder="transformer")
    before = loss_of(transformer)
    load_lora_as_adapter(transformer, out, "learned")
    after = loss_of(transformer)
    print(f"flow-matching loss on fixed (noise, t): base {before:.4f} -> trained LoRA {after:.4f}")
    assert after < 0.97 * before, (before, after)


def test_lora_blocks_and_layers_narrow_the_lora(runs):
    keys = list(lora(runs("csv_blocks").out))
    assert keys
    assert all(key.startswith("transformer.transformer_blocks.0.") and "attn.to_k" in key for key in keys), keys


def test_train_text_encoder_adds_clip_loras(runs):
    state = lora(runs("text_encoder").out)
    prefixes = {key.split(".")[0] for key in state}
    assert prefixes == {"transformer", "text_encoder", "text_encoder_2"}, prefixes  # never text_encoder_3 (T5)
    for prefix in ("text_encoder.", "text_encoder_2."):  # the CLIP LoRAs really trained (lora_B starts at 0)
        assert any(value.abs().max() > 0 for key, value in state.items()
                   if key.startswith(prefix) and "lora_B" in key), prefix


def test_memory_flags_with_prior_preservation(runs):
    run = runs("memory_flags")
    assert sorted(p.name for p in run.class_dir.glob("*.png")) == ["class-00000.png", "class-00001.png"]
    assert_both_formats(run.out)
    assert "prior_loss" in run.result.stderr  # the progress bar logs the prior term: it was used
    # --use_8bit_adam is real in the script: the saved optimizer state is 8-bit
    optimizer = torch.load(run.out / "checkpoint-2" / "optimizer.bin", weights_only=True)
    # bitsandbytes 0.50 nests its quantised tensors under one key in state_dict() (for FSDP)
    dtypes = [{**state, **state.get("__bnb_optimizer_quant_state__", {})}["state1"].dtype
              for state in optimizer["state"].values()]
    assert dtypes and set(dtypes) == {torch.uint8}, dtypes


@pytest.mark.parametrize("min_size, expected", [(1, torch.uint8), (4096, torch.float32)])
def test_8bit_adam_min_size(min_size, expected):
    """bitsandbytes keeps fp32 state below min_8bit_size (default 4096): every tensor of a small LoRA would stay
    fp32 under --use_8bit_adam, which is why --adam_8bit_min_size exists (default 1)."""
    from utils.training import make_optimizer

    args = SimpleNamespace(use_8bit_adam=True, adam_8bit_min_size=min_size, adam_beta1=0.9, adam_beta2=0.999,
                           adam_weight_decay=1e-4, adam_epsilon=1e-8)
    param = torch.nn.Parameter(torch.randn(4, 32, generator=torch.Generator().manual_seed(0)))
    before = param.detach().clone()
    optimizer = make_optimizer(args, [{"params": [param], "lr": 1e-2}])
    param.grad = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    optimizer.step()
    assert optimizer.state[param]["state1"].dtype == expected
    assert not torch.equal(param.detach(), before)


def test_checkpoint_rotation_keeps_the_lora_only(runs):
    run = runs("six_steps")
    assert run.checkpoints == ["checkpoint-4", "checkpoint-6"]  # no checkpoint-2, no checkpoint-N.tmp
    for name in run.checkpoints:
        files = {p.name for p in (run.out / name).iterdir()}
        assert {DIFFUSERS_FILE, PEFT_FILE, PEFT_CONFIG} <= files, files
        assert not {"model.safetensors", "pytorch_model.bin", "diffusion_pytorch_model.safetensors"} & files, files
        assert {f for f in files if f.endswith((".safetensors", ".bin"))} == \
            {DIFFUSERS_FILE, PEFT_FILE, "optimizer.bin", "scheduler.bin"}, files
    final = lora(run.out)
    assert all(torch.equal(final[key], value) for key, value in lora(run.out / "checkpoint-6").items())


def test_resume_rotates_and_is_bitwise_equal_to_uninterrupted(runs):
    resumed, uninterrupted = runs("resumed"), runs("uninterrupted")
    assert resumed.after_first == ["checkpoint-2", "checkpoint-4"]
    assert "Resuming from" in resumed.resume.stdout + resumed.resume.stderr
    assert resumed.after_resume == ["checkpoint-6", "checkpoint-8"]
    assert checkpoint_names(uninterrupted.out) == ["checkpoint-6", "checkpoint-8"]
    expected = lora(uninterrupted.out)
    got = load_file_bytes(resumed.final_bytes)
    assert set(got) == set(expected)
    unequal = [key for key in expected if not torch.equal(got[key], expected[key])]
    assert not unequal, f"resumed run differs from the uninterrupted one in {len(unequal)} tensors, e.g. " \
                        f"{unequal[0]}: max diff {(got[unequal[0]] - expected[unequal[0]]).abs().max()}"
    # and the resume trained on: steps 5-8 changed the LoRA of step 4
    assert any(not torch.equal(got[key], resumed.lora_at_4[key]) for key in got)


def test_missing_checkpoint_fails_before_training(runs):
    run = runs("resumed")
    output = run.missing.stdout + run.missing.stderr
    assert script_status(run.missing) == 2, output[-3000:]
    assert "--resume_from_checkpoint checkpoint-99" in error_line(run.missing)
    assert "Resuming" not in output and "Steps:" not in output
    assert run.after_missing == ["checkpoint-6", "checkpoint-8"]  # nothing rotated away
    assert (run.out / DIFFUSERS_FILE).read_bytes() == run.final_bytes


def test_txt_and_upper_case_png_folder_trains(runs):
    run = runs("folder_sd35")
    warning = [line for line in run.result.stderr.splitlines() if "notes.txt" in line]
    assert warning and "skipping" in warning[0], run.result.stderr[-3000:]  # the warning names the stray file
    assert ".PNG" not in warning[0]  # the upper-case images were not skipped
    assert (run.out / DIFFUSERS_FILE).is_file()


def test_empty_folder_fails(runs):
    run = runs("empty_folder")
    assert script_status(run.result) == 2, run.result.stderr[-3000:]
    assert str(run.folder) in error_line(run.result)
    assert not run.out.exists()


def test_missing_prompt_and_bad_resolution_fail(runs):
    for name, flag in (("no_prompt", "--instance_prompt"), ("bad_resolution", "--resolution 66")):
        run = runs(name)
        assert script_status(run.result) == 2, run.result.stderr[-3000:]
        assert flag in error_line(run.result)
        assert not run.out.exists(), name
