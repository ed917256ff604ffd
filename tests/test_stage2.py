"""Stage 2 (train_stage2_v2_sd3.py): the authors' command, the extractor, eta 0 == stage 1, frozen weights, one
transformer, lambda logging, the frozen original branch and the missing-extractor error.

Most runs call ``main(argv)`` in-process (the same code ``accelerate launch`` runs, minus ~5 s of imports per
process); the authors' command itself goes through ``accelerate launch --cpu`` as a user runs it."""

from __future__ import annotations

import csv
import functools
import shutil
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT, error_line, launch, lora_tensors, run_cli, script_status
from helpers import stage2 as run_stage2

import train_stage1_sd3 as stage1
import train_stage2_v2_sd3 as stage2
from utils.lora import DIFFUSERS_WEIGHT_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHT_NAME, adapters_disabled, tuner_layers

TINY = ["--resolution", "64", "--report_to", "none", "--rank", "4"]


def same_prompt_csv(folder: Path) -> Path:
    """The example concept with target_prompt == prompt, absolute image paths: stage 1 (which trains on
    target_prompt) and stage 2 (prompt) then see exactly the same captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = list(csv.DictReader(open(REPO_ROOT / "data" / "robot_toy.csv")))
    with open(folder / "same.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow(dict(row, target_prompt=row["prompt"], image_path=str(REPO_ROOT / "data" / row["image_path"])))
    return folder / "same.csv"


def test_authors_stage2_command_writes_both_formats_and_logs(tiny_sd35_path, extractors, tmp_path, monkeypatch,
                                                             fresh_accelerator_state):
    """purecc_readme.txt's stage-2 command, only paths, steps and (tiny model) resolution changed, from the repository
    root. In this process (the ~20 s of a launch saved for the suite's 5 minutes); test_release.py runs both scripts
    through ``accelerate launch``."""
    out = tmp_path / "output"
    shutil.copytree(extractors[0], out / "base_ckpt" / "robot_toy")  # where stage 1 puts it by default
    monkeypatch.chdir(REPO_ROOT)
    stage2.main(["--pretrained_model_name_or_path", str(tiny_sd35_path), "--data_path", "data", "--csv_name",
                 "robot_toy.csv", "--output_dir", str(out), "--max_train_steps", "4", "--learning_rate", "1e-4",
                 "--rank", "4", "--eta", "2.0", "--mixed_precision", "bf16", "--resolution", "64"])
    concept = out / "robot_toy"
    for name in (DIFFUSERS_WEIGHT_NAME, PEFT_WEIGHT_NAME, PEFT_CONFIG_NAME, "README.md"):
        assert (concept / name).is_file(), name
    card = (concept / "README.md").read_text()
    assert "| eta | 2.0 |" in card and "| lambda_mode | adaptive |" in card
    assert str(out / "base_ckpt" / "robot_toy") in card
    diffusers_keys = set(lora_tensors(concept))
    assert diffusers_keys and all("lora" in key for key in diffusers_keys)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((concept / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss", "diff_loss", "pri_loss", "lambda", "lambda_at_min", "lambda_at_max", "lr"} <= scalars
    assert [e.step for e in events.Scalars("lambda")] == [1, 2, 3, 4]


def test_command_line_error_through_accelerate_launch(tiny_sd35_path, tmp_path):
    """A direct ``accelerate launch`` user with a bad flag sees the script's one error line (status 2, reported in
    accelerate's own CalledProcessError), and nothing is written."""
    out = tmp_path / "output"
    launched = launch("train_stage2_v2_sd3.py", "--pretrained_model_name_or_path", tiny_sd35_path, "--data_path", "data",
                      "--csv_name", "robot_toy.csv", "--output_dir", out, "--resolution", "64", "--eta", "nan",
                      check=False)
    assert script_status(launched) == 2
    assert "--eta" in error_line(launched)
    assert not out.exists()


def test_extractor_lora_matters_and_base_mode_ignores_it(tiny_sd35_path, extractors, tmp_path):
    def trained(extractor, mode):
        out = tmp_path / f"{extractor.name}-{mode}"
        run_stage2(tiny_sd35_path, out, "--extractor_lora", str(extractor), "--extractor_mode", mode,
                   "--lambda_mode", "fixed")
        return lora_tensors(out / "robot_toy")

    with_a, with_b = trained(extractors[0], "lora"), trained(extractors[1], "lora")
    assert any(not torch.equal(with_a[k], with_b[k]) for k in with_a), "the stage-1 LoRA had no effect"
    base_a, base_b = trained(extractors[0], "base"), trained(extractors[1], "base")
    assert all(torch.equal(base_a[k], base_b[k]) for k in base_a), "--extractor_mode base still used the LoRA"
    assert any(not torch.equal(with_a[k], base_a[k]) for k in with_a)


def test_eta_zero_is_stage1_flow_matching(tiny_sd35_path, tmp_path):
    csv_path = same_prompt_csv(tmp_path / "data")
    flags = ["--pretrained_model_name_or_path", str(tiny_sd35_path), "--data_path", str(csv_path.parent),
             "--csv_name", csv_path.name, "--max_train_steps", "6", "--learning_rate", "1e-3", "--seed", "3",
             "--precondition_outputs", "0", "--random_flip", *TINY]
    first = stage1.main(flags + ["--output_dir", str(tmp_path / "s1")])
    second = stage2.main(flags + ["--output_dir", str(tmp_path / "s2"), "--eta", "0", "--extractor_mode", "base"])
    assert [h["loss"] for h in first.history] == pytest.approx([h["diff_loss"] for h in second.history], rel=1e-5)
    a, b = lora_tensors(tmp_path / "s1"), lora_tensors(tmp_path / "s2" / "same")
    assert a.keys() == b.keys()
    # Stage 2 runs [prompt; base_prompt] as one batch of 2 where stage 1 runs a batch of 1: the same maths,
    # but CPU kernels may block a batch-2 matmul differently and round the last bits (float32 eps 1.2e-7 of
    # values ~1). After 6 Adam steps of lr 1e-3 the LoRAs must agree far inside one step's size.
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst


def test_frozen_weights_stay_bitwise_and_only_new_adapter_trains(tiny_sd35_path, extractors, tmp_path):
    from diffusers import SD3Transformer2DModel

    result = run_stage2(tiny_sd35_path, tmp_path, "--extractor_lora", str(extractors[0]))
    transformer = result.transformer
    trainable = [name for name, p in transformer.named_parameters() if p.requires_grad]
    assert trainable and all(f".{stage2.TRAINABLE}." in name for name in trainable)

    fresh = SD3Transformer2DModel.from_pretrained(tiny_sd35_path, subfolder="transformer").state_dict()
    params = transformer.state_dict()
    for name, value in fresh.items():  # base weights live at <module>.base_layer.weight once LoRA wraps them
        key = name if name in params else name.replace(".weight", ".base_layer.weight").replace(
            ".bias", ".base_layer.bias")
        assert key in params, name
        assert torch.equal(params[key].detach(), value), name

    saved = lora_tensors(extractors[0])
    for key, value in saved.items():
        live = params[key.replace(".weight", f".{stage2.EXTRACTOR}.weight")]
        assert torch.equal(live.detach(), value), key
    new = lora_tensors(tmp_path / "robot_toy")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in new.items()), "new LoRA never moved"


def test_switching_adapters_keeps_the_trainable_lora_trainable():
    """Stage 2 runs the frozen extractor adapter (or no adapter: --extractor_mode base, --original_branch frozen)
    between passes of the trainable one. peft's set_adapter and enable_adapters re-mark requires_grad (activating
    the frozen extractor froze the trainable LoRA); switch_adapter and adapters_disabled change only what runs, so
    FSDP2, which reads the marks at its first forward, sees the trainable LoRA trainable (the bf16 failure of FSDP
    on an H100)."""
    from peft import LoraConfig, inject_adapter_in_model

    from utils.lora import activate_adapter, switch_adapter
    from utils.quiet import several_adapters_on_purpose

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["0", "1"])
    with several_adapters_on_purpose():
        for name in ("extractor", "purecc"):
            inject_adapter_in_model(config, model, name)
    with torch.no_grad():  # non-zero B: every adapter changes the output
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    activate_adapter(model, "purecc", trainable=True)

    def marks():
        return {name: param.requires_grad for name, param in model.named_parameters() if "lora_" in name}

    trainable = marks()
    assert all(v == ("purecc" in k) for k, v in trainable.items())
    x, layers = torch.randn(3, 4), tuner_layers(model)
    assert len(layers) == 2
    with torch.no_grad():
        purecc = model(x)
        switch_adapter(layers, "extractor")
        extractor = model(x)
        assert marks() == trainable and not torch.allclose(extractor, purecc)
        with stage2.adapters_disabled(layers):
            assert marks() == trainable
            base = model(x)
        assert marks() == trainable and not torch.allclose(base, purecc) and not torch.allclose(base, extractor)
        assert torch.equal(model(x), extractor)  # leaving the context restores what ran before
        switch_adapter(layers, "purecc")
        assert marks() == trainable and torch.equal(model(x), purecc)
        for mode in ("lora", "base"):  # stage 2's extractor pass, both modes
            with stage2.extractor_weights(layers, mode):
                assert marks() == trainable and not torch.allclose(model(x), purecc)
            assert marks() == trainable and torch.equal(model(x), purecc)


def test_one_transformer_in_the_process(tiny_sd35_path, extractors, tmp_path, monkeypatch):
    from diffusers import SD3Transformer2DModel

    created = []
    original_init = SD3Transformer2DModel.__init__

    @functools.wraps(original_init)  # diffusers reads the config keys off __init__'s signature
    def counting_init(self, *args, **kwargs):
        created.append(self)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(SD3Transformer2DModel, "__init__", counting_init)
    run_stage2(tiny_sd35_path, tmp_path, "--extractor_lora", str(extractors[0]), "--original_branch", "frozen",
               steps=1)
    assert len(created) == 1


@pytest.mark.parametrize("mode", ["adaptive", "fixed"])
def test_lambda_logged(tiny_sd35_path, extractors, tmp_path, mode):
    extra = ["--lambda_mode", mode, "--fix_lambda", "0.7", "--lambda_min", "0.01", "--lambda_max", "0.2"]
    history = run_stage2(tiny_sd35_path, tmp_path, "--extractor_lora", str(extractors[0]), *extra, steps=3).history
    lambdas = [h["lambda"] for h in history]
    assert len(lambdas) == 3
    if mode == "fixed":
        assert lambdas == [pytest.approx(0.7, abs=1e-7)] * 3
        assert all(h["lambda_at_min"] == h["lambda_at_max"] == 0.0 for h in history)
    else:
        assert all(0.01 - 1e-7 <= lam <= 0.2 + 1e-7 for lam in lambdas), lambdas
        # batch 1: lambda* is either inside the range or at exactly one bound, and the fractions say which
        for h in history:
            at_bound = h["lambda_at_min"] + h["lambda_at_max"]
            assert at_bound in (0.0, 1.0)
            assert (h["lambda"] == pytest.approx(0.01, abs=1e-7)) == (h["lambda_at_min"] == 1.0)
            assert (h["lambda"] == pytest.approx(0.2, abs=1e-7)) == (h["lambda_at_max"] == 1.0)
    assert all(h["loss"] == pytest.approx(h["diff_loss"] + 2.0 * h["pri_loss"], rel=1e-5) for h in history)


@pytest.mark.parametrize("branch", ["trainable", "frozen", "detached"])
def test_original_branch_gradient(tiny_sd35_path, extractors, tmp_path, monkeypatch, branch):
    """Eq. 9's v_base carries gradient from the trainable branch; the supplement's frozen branch and the detached
    diagnostic carry none."""
    seen = []
    real_loss = stage2.purecc_loss

    def spy(v, v_base, delta, *args, **kwargs):
        seen.append((v.requires_grad, v_base.requires_grad, delta.requires_grad))
        return real_loss(v, v_base, delta, *args, **kwargs)

    monkeypatch.setattr(stage2, "purecc_loss", spy)
    run_stage2(tiny_sd35_path, tmp_path, "--extractor_lora", str(extractors[0]), "--original_branch", branch, steps=1)
    assert seen == [(True, branch == "trainable", False)]


def test_missing_extractor_is_a_clear_error_that_writes_nothing(tiny_sd35_path, tmp_path, monkeypatch, capsys):
    out = tmp_path / "output"
    code, stderr = run_cli(stage2.main, "--pretrained_model_name_or_path", tiny_sd35_path, "--data_path",
                           REPO_ROOT / "data", "--csv_name", "robot_toy.csv", "--output_dir", out,
                           "--max_train_steps", "2", "--resolution", "64", monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2
    assert stderr.startswith("error: ") and str(out / "base_ckpt" / "robot_toy") in stderr
    assert stderr.strip().count("\n") == 0  # one line
    assert "train_stage1_sd3.py" in stderr and "--stage1_output_dir" in stderr and "Traceback" not in stderr
    assert not out.exists()


def test_killed_run_resumes_to_the_identical_lora(tiny_sd35_path, extractors, tmp_path):
    flags = ["--extractor_lora", str(extractors[0]), "--checkpointing_steps", "2", "--random_flip"]
    run_stage2(tiny_sd35_path, tmp_path / "straight", *flags, steps=4)
    # "killed" after its step-2 checkpoint: only that survives
    shutil.copytree(tmp_path / "straight" / "robot_toy" / "checkpoint-2", tmp_path / "killed" / "robot_toy" / "checkpoint-2")
    resumed = run_stage2(tiny_sd35_path, tmp_path / "killed", *flags, "--resume_from_checkpoint", "latest", steps=4)
    assert [h["step"] for h in resumed.history] == [3, 4]
    straight, again = lora_tensors(tmp_path / "straight" / "robot_toy"), lora_tensors(tmp_path / "killed" / "robot_toy")
    assert straight.keys() == again.keys()
    assert all(torch.equal(straight[k], again[k]) for k in straight)


def test_memory_flags_prior_preservation_and_preconditioning(tiny_sd35_path, extractors, tmp_path):
    """Stage 2 shares stage 1's flags: 8-bit Adam, gradient checkpointing, cached latents, prior preservation
    (class images generated by the base model) and x0-space outputs all run through the PureCC step."""
    class_dir = tmp_path / "class"
    result = run_stage2(tiny_sd35_path, tmp_path / "out", "--extractor_lora", str(extractors[0]), "--use_8bit_adam",
                        "--gradient_checkpointing", "--cache_latents", "--with_prior_preservation",
                        "--class_data_dir", str(class_dir), "--class_prompt", "a photo of a robot toy",
                        "--num_class_images", "2", "--sample_batch_size", "2", "--precondition_outputs", "1",
                        "--original_branch", "frozen", steps=2)
    assert len(list(class_dir.glob("*.png"))) == 2
    assert all(h["prior_loss"] > 0 for h in result.history)
    assert all(h["loss"] == pytest.approx(h["diff_loss"] + 2.0 * h["pri_loss"] + h["prior_loss"], rel=1e-5)
               for h in result.history)
    assert (tmp_path / "out" / "robot_toy" / DIFFUSERS_WEIGHT_NAME).is_file()


def test_extractor_is_all_of_stage_1_text_encoder_loras_included(tiny_sd35_path, tmp_path, monkeypatch):
    """Stage 1 with --train_text_encoder: stage 2's extractor velocity for (x_t, t, target_prompt) and for "" is
    exactly what the stage-1 pipeline (transformer + CLIP LoRAs) predicts for them, and differs from the prediction
    with the base CLIP encoders (what loading only the transformer LoRA gave)."""
    from diffusers import StableDiffusion3Pipeline

    stage1_dir = tmp_path / "stage1"
    stage1.main(["--pretrained_model_name_or_path", str(tiny_sd35_path), "--data_path", str(REPO_ROOT / "data"),
                 "--csv_name", "robot_toy.csv", "--output_dir", str(stage1_dir), "--max_train_steps", "2",
                 "--learning_rate", "1e-2", "--train_text_encoder", "--text_encoder_lr", "1e-1", *TINY])
    calls = []
    real_predict = stage2.predict

    def spy(model, cache, groups, dtype):
        out = real_predict(model, cache, groups, dtype)
        if len(groups) == 2 and set(groups[1][1]) == {""}:  # the extractor's [target_prompt; ""] pass
            calls.append((groups[0][0].x_t.clone(), groups[0][0].timesteps.clone(), list(groups[0][1]),
                          [o.detach().clone() for o in out]))
        return out

    monkeypatch.setattr(stage2, "predict", spy)
    run_stage2(tiny_sd35_path, tmp_path / "out", "--extractor_lora", str(stage1_dir), steps=1)
    [(x_t, timesteps, prompts, (e_cond, e_uncond))] = calls

    def pipeline_velocity(with_clip_lora: bool):
        pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd35_path)
        pipe.load_lora_weights(stage1_dir)
        clip_off = [adapters_disabled(tuner_layers(encoder)) if not with_clip_lora else nullcontext()
                    for encoder in (pipe.text_encoder, pipe.text_encoder_2)]
        with torch.no_grad(), clip_off[0], clip_off[1]:
            embeds, _, pooled, _ = pipe.encode_prompt(prompts + [""], None, None, do_classifier_free_guidance=False,
                                                      max_sequence_length=77)
        with torch.no_grad():
            return pipe.transformer(hidden_states=x_t.repeat(2, 1, 1, 1), timestep=timesteps.repeat(2),
                                    encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)[0]

    expected = pipeline_velocity(with_clip_lora=True)
    assert (e_cond - expected[:1]).abs().max().item() < 1e-6
    assert (e_uncond - expected[1:]).abs().max().item() < 1e-6
    base_clip = pipeline_velocity(with_clip_lora=False)
    assert (e_cond - base_clip[:1]).abs().max().item() > 1e-4  # the CLIP LoRAs matter at these settings


def test_extractor_that_does_not_fit_the_model_is_named_before_loading(tiny_sd35_path, extractors, tmp_path):
    from safetensors.torch import load_file, save_file

    from utils.checks import BadInput

    source = extractors[0] / DIFFUSERS_WEIGHT_NAME
    tensors = load_file(str(source))
    key = sorted(k for k in tensors if k.endswith("attn.to_q.lora_A.weight"))[0]
    for case in ("unknown_module", "wrong_width"):
        broken = dict(tensors)
        if case == "unknown_module":
            broken[key.replace("transformer_blocks.0", "transformer_blocks.7")] = tensors[key].clone()  # fits partly
        else:
            broken[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)
        folder = tmp_path / case
        folder.mkdir()
        from safetensors import safe_open

        with safe_open(str(source), framework="pt") as handle:
            save_file(broken, str(folder / DIFFUSERS_WEIGHT_NAME), metadata=handle.metadata())
        with pytest.raises(BadInput) as err:
            run_stage2(tiny_sd35_path, tmp_path / "out", "--extractor_lora", str(folder))
        message = str(err.value)
        assert str(folder) in message and "does not fit" in message
        if case == "unknown_module":
            assert "transformer_blocks.7" in message
        else:
            assert key[len("transformer."):] in message and str(tensors[key].shape[1] + 3) in message
    assert not (tmp_path / "out").exists()
