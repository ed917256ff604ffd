"""Stage 1 (train_stage1_sd3.py): outputs in both LoRA formats with a model card, --lora_blocks/--lora_layers,
--train_text_encoder, the memory flags with prior preservation, real 8-bit Adam state, checkpoint rotation and a
bitwise-exact resume, the bad-input errors, the diffusers <-> PEFT round trip and that training lowers the
flow-matching loss.

The runs call ``main(argv)`` in this process (module fixtures, each run once); the authors' command and the
command-line error path go through ``accelerate launch`` / ``python`` as a user types them."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import DATA, checkpoint_names, run_cli, stage1
from safetensors.torch import load_file

from utils.checks import BadInput

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
PEFT_FILE = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
PROMPT = "a photo of sks robot toy"
# --random_flip and a small resolution; the same flags for the interrupted and the uninterrupted run
RESUME_FLAGS = ["--random_flip", "--checkpointing_steps", "2", "--checkpoints_total_limit", "2"]


def lora(folder, name=DIFFUSERS_FILE) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / name))


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
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("stage1_runs")


@pytest.fixture(scope="module")
def tiny_paths(tiny_sd3_path, tiny_sd35_path):
    return {"sd3": tiny_sd3_path, "sd35": tiny_sd35_path}


@pytest.fixture(scope="module")
def folder_sd3(root, tiny_sd3_path):
    """2 steps on the instance folder; lr 1e-2 so that the LoRA moves visibly away from lora_B = 0."""
    stage1(tiny_sd3_path, root / "folder_sd3", "--learning_rate", "1e-2", data="folder")
    return root / "folder_sd3"


@pytest.fixture(scope="module")
def folder_sd35(root, tiny_sd35_path):
    """2 steps on a folder with upper-case .PNG images and a stray notes.txt (which must be skipped)."""
    folder = root / "mixed_folder"
    folder.mkdir()
    for index, source in enumerate(sorted((DATA / "robot_toy").glob("*.png"))[:3]):
        shutil.copy(source, folder / f"IMG_{index}.PNG")
    (folder / "notes.txt").write_text("not an image\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stage1(tiny_sd35_path, root / "folder_sd35", "--learning_rate", "1e-2", data=folder)
    return SimpleNamespace(out=root / "folder_sd35", warnings=[str(w.message) for w in caught])


@pytest.fixture(scope="module")
def folder_sd35_out(folder_sd35):
    return folder_sd35.out


@pytest.fixture(scope="module")
def csv_blocks(root, tiny_sd3_path):
    """The concept CSV, LoRA narrowed to block 0's attn.to_k."""
    stage1(tiny_sd3_path, root / "csv_blocks", "--lora_blocks", "0", "--lora_layers", "attn.to_k")
    return root / "csv_blocks"


# ---------------------------------------------------------------------------------------------- tests
def test_authors_stage1_command(tiny_sd35_path, tmp_path, fresh_accelerator_state):
    """purecc_readme's stage-1 command, only paths, steps and (tiny model) resolution changed: bf16, batch 1 x
    accumulation 4, constant lr 4e-4, rank 4. In this process (the ~20 s of a launch saved for the suite's 5
    minutes); test_release.py runs both scripts through ``accelerate launch``."""
    import train_stage1_sd3

    out = tmp_path / "output" / "base_ckpt" / "robot_toy"
    train_stage1_sd3.main([f"--pretrained_model_name_or_path={tiny_sd35_path}",
                           f"--instance_data_dir={DATA / 'robot_toy'}", f"--output_dir={out}", '--mixed_precision=bf16',
                           f"--instance_prompt={PROMPT}", "--resolution=64", "--train_batch_size=1",
                           "--gradient_accumulation_steps=4", "--learning_rate=4e-4", '--lr_scheduler=constant',
                           "--lr_warmup_steps=0", "--max_train_steps=2", "--rank=4", "--seed=0", "--report_to=none"])
    assert_both_formats(out)
    assert "| steps | 2 |" in (out / "README.md").read_text()


@pytest.mark.parametrize("fixture", ["folder_sd3", "folder_sd35_out", "csv_blocks"])
def test_two_steps_write_both_formats_and_card(request, fixture):
    out = request.getfixturevalue(fixture)
    assert_both_formats(out)
    card = (out / "README.md").read_text()
    assert "load_lora_weights" in card and "| steps | 2 |" in card, card


def test_default_targets_cover_every_block(folder_sd3, tiny_sd3_path):
    keys = lora(folder_sd3)
    for layer in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj"):
        assert any(f".{layer}.lora_A" in key for key in keys), layer
    num_layers = json.loads((tiny_sd3_path / "transformer" / "config.json").read_text())["num_layers"]
    assert {key.split(".")[2] for key in keys} == {str(block) for block in range(num_layers)}


@pytest.mark.parametrize("variant", ["sd3", "sd35"])
def test_roundtrip_diffusers_and_peft_give_the_same_model(request, tiny_paths, variant):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from peft import PeftModel

    out = request.getfixturevalue("folder_sd3" if variant == "sd3" else "folder_sd35_out")
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


def test_training_lowers_the_flow_matching_loss(root, tiny_sd3_path):
    """The loss stage 1 optimises (x0-preconditioned flow matching) on fixed (noise, timestep) pairs over the
    concept's images: base transformer vs base + a 30-step LoRA (rank 4, lr 1e-2: with 1e-3 the tiny random model's
    loss drops only ~0.5%)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    from utils.data import read_concept_csv
    from utils.dataset import load_image
    from utils.flow_matching import Noised, encode_latents, flow_matching_loss, noisy_latents
    from utils.lora import load_lora_as_adapter
    from utils.prompts import PromptEncoder, load_text_pipeline

    out = root / "learning"
    stage1(tiny_sd3_path, out, "--learning_rate", "1e-2", steps=30)
    rows = read_concept_csv(DATA, "robot_toy.csv")
    prompts = [row.target_prompt for row in rows]
    embeds, pooled = PromptEncoder(load_text_pipeline(str(tiny_sd3_path)), prompts, "cpu", 77).cache().lookup(
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
            noised = Noised(x0, noise, noisy_latents(x0, noise, sigmas), scheduler.timesteps[index], sigmas, None)
            with torch.no_grad():
                pred = transformer(hidden_states=noised.x_t, timestep=noised.timesteps, encoder_hidden_states=embeds,
                                   pooled_projections=pooled, return_dict=False)[0]
            losses.append(flow_matching_loss(pred, noised, True).item())
        return sum(losses) / len(losses)

    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3_path, subfolder="transformer")
    before = loss_of(transformer)
    load_lora_as_adapter(transformer, out, "learned")
    after = loss_of(transformer)
    print(f"flow-matching loss on fixed (noise, t): base {before:.4f} -> trained LoRA {after:.4f}")
    assert after < 0.97 * before, (before, after)


def test_lora_blocks_and_layers_narrow_the_lora(csv_blocks):
    keys = list(lora(csv_blocks))
    assert keys
    assert all(key.startswith("transformer.transformer_blocks.0.") and "attn.to_k" in key for key in keys), keys


def test_train_text_encoder_adds_clip_loras(root, tiny_sd3_path):
    out = root / "text_encoder"
    stage1(tiny_sd3_path, out, "--train_text_encoder", data="folder")
    state = lora(out)
    prefixes = {key.split(".")[0] for key in state}
    assert prefixes == {"transformer", "text_encoder", "text_encoder_2"}, prefixes  # never text_encoder_3 (T5)
    for prefix in ("text_encoder.", "text_encoder_2."):  # the CLIP LoRAs really trained (lora_B starts at 0)
        assert any(value.abs().max() > 0 for key, value in state.items()
                   if key.startswith(prefix) and "lora_B" in key), prefix


def test_memory_flags_with_prior_preservation(root, tiny_sd3_path):
    """--cache_latents --use_8bit_adam --gradient_checkpointing --with_prior_preservation in one run; the class
    folder starts empty, so its 2 images are generated with the base model. A checkpoint keeps the optimizer."""
    out, class_dir = root / "memory_flags", root / "class_images"
    result = stage1(tiny_sd3_path, out, "--checkpointing_steps", "2", "--cache_latents", "--use_8bit_adam",
                    "--gradient_checkpointing", "--with_prior_preservation", "--class_data_dir", class_dir,
                    "--class_prompt", "a photo of robot toy", "--num_class_images", "2", "--sample_batch_size", "2",
                    data="folder")
    assert sorted(p.name for p in class_dir.glob("*.png")) == ["class-00000.png", "class-00001.png"]
    assert_both_formats(out)
    assert all(h["prior_loss"] > 0 for h in result.history)  # the prior term was used ...
    assert all(h["loss"] == pytest.approx(h["instance_loss"] + h["prior_loss"], rel=1e-6) for h in result.history)
    # --use_8bit_adam is real in the script: the saved optimizer state is 8-bit
    optimizer = torch.load(out / "checkpoint-2" / "optimizer.bin", weights_only=True)
    # bitsandbytes 0.50 nests its quantised tensors under one key in state_dict() (for FSDP)
    dtypes = [{**state, **state.get("__bnb_optimizer_quant_state__", {})}["state1"].dtype
              for state in optimizer["state"].values()]
    assert dtypes and set(dtypes) == {torch.uint8}, dtypes


@pytest.mark.parametrize("min_size, expected", [(1, torch.uint8), (4096, torch.float32)])
def test_8bit_adam_min_size(min_size, expected):
    """bitsandbytes keeps fp32 state below min_8bit_size (default 4096): every tensor of a small LoRA would stay
    fp32 under --use_8bit_adam, which is why --adam_8bit_min_size exists (default 1)."""
    from utils.training import make_optimizer

    args = SimpleNamespace(optimizer="adamw", use_8bit_adam=True, adam_8bit_min_size=min_size, adam_beta1=0.9, adam_beta2=0.999,
                           adam_weight_decay=1e-4, adam_epsilon=1e-8)
    param = torch.nn.Parameter(torch.randn(4, 32, generator=torch.Generator().manual_seed(0)))
    before = param.detach().clone()
    optimizer = make_optimizer(args, [{"params": [param], "lr": 1e-2}])
    param.grad = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    optimizer.step()
    assert optimizer.state[param]["state1"].dtype == expected
    assert not torch.equal(param.detach(), before)


def test_checkpoint_rotation_keeps_the_lora_only(root, tiny_sd3_path):
    out = root / "six_steps"
    stage1(tiny_sd3_path, out, *RESUME_FLAGS, steps=6, data="folder")
    checkpoints = checkpoint_names(out)
    assert checkpoints == ["checkpoint-4", "checkpoint-6"]  # no checkpoint-2, no checkpoint-N.tmp
    for name in checkpoints:
        files = {p.name for p in (out / name).iterdir()}
        assert {DIFFUSERS_FILE, PEFT_FILE, PEFT_CONFIG} <= files, files
        assert not {"model.safetensors", "pytorch_model.bin", "diffusion_pytorch_model.safetensors"} & files, files
        assert {f for f in files if f.endswith((".safetensors", ".bin"))} == \
            {DIFFUSERS_FILE, PEFT_FILE, "optimizer.bin", "scheduler.bin"}, files
    final = lora(out)
    assert all(torch.equal(final[key], value) for key, value in lora(out / "checkpoint-6").items())


@pytest.fixture(scope="module")
def resumed(root, tiny_sd3_path):
    """8 steps uninterrupted; a copy of its first 4 steps (checkpoint-2 and -4, as if killed after step 4) resumed
    from checkpoint-4 to 8; then a checkpoint that does not exist is asked for."""
    straight, out = root / "uninterrupted", root / "resumed"
    stage1(tiny_sd3_path, straight, *RESUME_FLAGS, "--checkpoints_total_limit", "4", steps=8, data="folder")
    for name in ("checkpoint-2", "checkpoint-4"):
        shutil.copytree(straight / name, out / name)
    after_first, lora_at_4 = checkpoint_names(out), lora(out / "checkpoint-4")
    resume = stage1(tiny_sd3_path, out, *RESUME_FLAGS, "--resume_from_checkpoint", "checkpoint-4", steps=8,
                    data="folder")
    after_resume, final_bytes = checkpoint_names(out), (out / DIFFUSERS_FILE).read_bytes()
    with pytest.raises(BadInput) as missing:
        stage1(tiny_sd3_path, out, *RESUME_FLAGS, "--resume_from_checkpoint", "checkpoint-99", steps=8, data="folder")
    return SimpleNamespace(out=out, after_first=after_first, lora_at_4=lora_at_4, resume=resume,
                           after_resume=after_resume, final_bytes=final_bytes, missing=str(missing.value),
                           after_missing=checkpoint_names(out), uninterrupted=straight)


def test_resume_rotates_and_is_bitwise_equal_to_uninterrupted(resumed):
    from safetensors.torch import load

    assert resumed.after_first == ["checkpoint-2", "checkpoint-4"]
    assert [h["step"] for h in resumed.resume.history] == [5, 6, 7, 8]
    assert resumed.after_resume == ["checkpoint-6", "checkpoint-8"]  # rotated to --checkpoints_total_limit 2
    assert checkpoint_names(resumed.uninterrupted) == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]
    expected = lora(resumed.uninterrupted)
    got = load(resumed.final_bytes)
    assert set(got) == set(expected)
    unequal = [key for key in expected if not torch.equal(got[key], expected[key])]
    assert not unequal, f"resumed run differs from the uninterrupted one in {len(unequal)} tensors, e.g. " \
                        f"{unequal[0]}: max diff {(got[unequal[0]] - expected[unequal[0]]).abs().max()}"
    # and the resume trained on: steps 5-8 changed the LoRA of step 4
    assert any(not torch.equal(got[key], resumed.lora_at_4[key]) for key in got)


def test_missing_checkpoint_fails_before_training(resumed):
    assert "--resume_from_checkpoint checkpoint-99" in resumed.missing
    assert "checkpoint-6, checkpoint-8" in resumed.missing  # it lists what there is
    assert resumed.after_missing == ["checkpoint-6", "checkpoint-8"]  # nothing rotated away
    assert (resumed.out / DIFFUSERS_FILE).read_bytes() == resumed.final_bytes


def test_txt_and_upper_case_png_folder_trains(folder_sd35):
    warning = [message for message in folder_sd35.warnings if "notes.txt" in message]
    assert warning and "skipping" in warning[0], folder_sd35.warnings  # the warning names the stray file
    assert ".PNG" not in warning[0]  # the upper-case images were not skipped
    assert (folder_sd35.out / DIFFUSERS_FILE).is_file()


def test_empty_folder_fails(tmp_path, tiny_sd3_path):
    import train_stage1_sd3

    folder = tmp_path / "empty_folder"
    folder.mkdir()
    with pytest.raises(BadInput) as err:
        train_stage1_sd3.main(["--pretrained_model_name_or_path", str(tiny_sd3_path), "--output_dir",
                               str(tmp_path / "out"), "--instance_data_dir", str(folder), "--instance_prompt", PROMPT,
                               "--resolution", "32"])
    assert str(folder) in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, named", [
    (["--instance_data_dir", str(DATA / "robot_toy"), "--resolution", "64"], "--instance_prompt"),
    (["--instance_data_dir", str(DATA / "robot_toy"), "--instance_prompt", PROMPT, "--resolution", "66"],
     "--resolution 66"),
])
def test_missing_prompt_and_bad_resolution_fail(tmp_path, tiny_sd35_path, flags, named):
    import train_stage1_sd3

    with pytest.raises(BadInput) as err:
        train_stage1_sd3.main(["--pretrained_model_name_or_path", str(tiny_sd35_path), "--output_dir",
                               str(tmp_path / "out"), *flags])
    assert named in str(err.value)
    assert not (tmp_path / "out").exists()


def test_command_line_error_is_one_line_with_status_2(tmp_path, tiny_sd35_path, monkeypatch, capsys):
    """What a user sees from ``python train_stage1_sd3.py`` with a bad flag (``accelerate launch``: test_stage2)."""
    import train_stage1_sd3

    out = tmp_path / "out"
    code, stderr = run_cli(train_stage1_sd3.main, "--pretrained_model_name_or_path", tiny_sd35_path, "--output_dir",
                           out, "--instance_data_dir", DATA / "robot_toy", "--instance_prompt", PROMPT,
                           "--resolution", "66", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and "Traceback" not in stderr
    assert stderr.splitlines() == ["error: --resolution 66 must be a multiple of 4 for this model (VAE downsampling "
                                   "x patch size); try 64."]
    assert not out.exists()
