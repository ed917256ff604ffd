r"""PureCC stage 2: pure learning. A new LoRA trained with flow matching plus the eta-weighted PureCC loss, guided by
the frozen representation extractor E = base model + stage-1 LoRA (docs/method.md section 4, paper Eqs. 10-15).

One copy of the base transformer serves every branch: the trainable LoRA ("purecc") and the frozen extractor LoRA
("extractor") are two named adapters on it (docs/method.md section 5). Accepts the authors' stage-2 command verbatim:

    accelerate launch train_stage2_v2_sd3.py --pretrained_model_name_or_path SD3.5 --data_path data \
        --csv_name robot_toy.csv --output_dir ./output --max_train_steps 800 --learning_rate 1e-4 --rank 4 \
        --eta 2.0 --mixed_precision bf16
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch

from utils.args import (RunConfig, add_ignored_args, add_shared_args, check_shared_args, report_check,
                        warn_ignored_flags)
from utils.checkpoint import list_checkpoints, plan_run
from utils.checks import BadInput, exit_on_error, require, require_non_negative, require_not_nan
from utils.concept_token import read_learned_token, register_token
from utils.data import fill_placeholder, read_concept_csv, resolve_placeholders, rows_to_items
from utils.dataset import batch_latents, class_group, ensure_class_images
from utils.flow_matching import add_noise, flow_matching_loss, flow_target, prediction_space
from utils.lora import (activate_adapter, adapters_disabled, add_trainable_lora, load_lora_as_adapter,
                        load_text_encoder_loras, lora_format, lora_misfit, switch_adapter, transformer_lora_config,
                        tuner_layers)
from utils.outputs import TrainedWeights, finish_run, make_validator
from utils.prompts import PromptEncoder, load_text_pipeline, run_prompts
from utils.purecc_loss import clamped_fractions, extractor_delta, purecc_lambda, purecc_loss
from utils.training import (compiled_if, load_diffusion_parts, start_run, predict, prepare_training,
                            scaled_learning_rate, train_loop, trainable_to_fp32, weight_dtype_of)

TRAINABLE, EXTRACTOR = "purecc", "extractor"
PROMPT_COLUMNS = ("prompt", "base_prompt", "target_prompt")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shared_args(parser, learning_rate=1e-4, precondition_default=0, output_dir_default="./output")
    parser.set_defaults(max_train_steps=800)
    parser.add_argument("--eta", type=float, default=2.0, help="Weight of the PureCC loss (paper best: 1.0).")
    parser.add_argument("--lambda_mode", default="adaptive", choices=["adaptive", "fixed"],
                        help="adaptive: the paper's lambda* (Eqs. 10-12); fixed: --fix_lambda (the release).")
    parser.add_argument("--fix_lambda", type=float, default=1.0)
    parser.add_argument("--lambda_min", type=float, default=0.0, help="Clamp of lambda* below (-inf: none).")
    parser.add_argument("--lambda_max", type=float, default=5.0, help="Clamp of lambda* above (inf: none).")
    parser.add_argument("--original_branch", default="trainable", choices=["trainable", "frozen", "detached"],
                        help="trainable: v_base from the trainable LoRA, with gradient (the paper's dual branch); "
                             "frozen: from the base model (supplement section 14); detached: from the trainable "
                             "LoRA without gradient (a diagnostic: L_pure then moves only v).")
    parser.add_argument("--stage1_output_dir", "--extractor_lora", dest="stage1_output_dir", default=None,
                        help="The stage-1 output folder (either LoRA format; its learned token too, if it has one). "
                             "Default: <output_dir>/base_ckpt/<csv stem>, else <output_dir>/base_ckpt.")
    parser.add_argument("--extractor_mode", default="lora", choices=["lora", "base"],
                        help="lora: E = base + stage-1 LoRA; base: E = base model (the release's behaviour).")
    add_ignored_args(parser, STAGE2_IGNORED)
    return parser.parse_args(argv)


STAGE2_IGNORED = {
    "--instance_data_dir": "stage 2 trains on the concept CSV (--data_path, --csv_name)",
    "--instance_prompt": "stage 2 takes its prompts from the concept CSV",
    "--train_text_encoder": "stage 2 trains the transformer LoRA only; CLIP LoRAs belong to stage 1, whose "
                            "extractor uses them",
    "--text_encoder_lr": "stage 2 trains no text encoder",
}


def stage1_root(args, concept: str) -> Path | None:
    """Where stage 1 wrote: --stage1_output_dir (alias --extractor_lora), else <output_dir>/base_ckpt/<concept>, else
    the release's layout <output_dir>/base_ckpt (used when it holds a stage-1 run)."""
    if args.stage1_output_dir:
        return Path(args.stage1_output_dir)
    ours, release = Path(args.output_dir) / "base_ckpt" / concept, Path(args.output_dir) / "base_ckpt"
    if not (lora_format(ours) or list_checkpoints(ours)) and (lora_format(release) or list_checkpoints(release)):
        return release
    return ours


def find_extractor(args, root: Path) -> Path:
    """The stage-1 LoRA in ``root``: its final weights, else its newest checkpoint (with a warning: stage 1 has not
    finished). It must fit the base model."""
    if lora_format(root):
        return checked_extractor(args, root)
    checkpoints = [(step, path) for step, path in list_checkpoints(root) if lora_format(path)]
    if checkpoints:
        step, path = checkpoints[-1]
        warnings.warn(f"{root} holds no final stage-1 LoRA: using its newest checkpoint, {path.name} (step {step}), "
                      f"as the extractor. Finish stage 1 first if that is not what you want.", stacklevel=2)
        return checked_extractor(args, path)
    raise BadInput(f"no stage-1 LoRA (the extractor) in {root}: neither final weights nor a checkpoint-N folder. "
                   f"Train stage 1 into it first (train_stage1_sd3.py --output_dir {root}), or point "
                   f"--stage1_output_dir at the folder that holds it, or use --extractor_mode base.")


def checked_extractor(args, folder: Path) -> Path:
    misfit = lora_misfit(folder, args.pretrained_model_name_or_path)
    require(misfit is None, f"the stage-1 LoRA {folder} does not fit --pretrained_model_name_or_path "
            f"{args.pretrained_model_name_or_path}: {misfit}. Was it trained on another base model?")
    return folder


def check_inputs(args) -> tuple[RunConfig, list[dict]]:
    """Every check, before any model is loaded: the run's folders (output, resume, extractor) and its items."""
    check_shared_args(args)
    require(args.csv_name is not None, "Stage 2 needs the concept CSV: give --data_path and --csv_name "
            "(docs/method.md section 1).")
    require_non_negative(args, "eta")
    require_not_nan(args, "fix_lambda", "lambda_min", "lambda_max")
    require(args.lambda_min <= args.lambda_max, f"--lambda_min {args.lambda_min} is above --lambda_max {args.lambda_max}.")
    warn_ignored_flags(args, STAGE2_IGNORED)
    concept = Path(args.csv_name).stem
    # the stage-1 folder: the extractor (unless --extractor_mode base) and the learned token, if stage 1 made one
    stage1_dir = (find_extractor(args, stage1_root(args, concept))
                  if args.extractor_mode == "lora" or args.stage1_output_dir else None)
    token = read_learned_token(stage1_dir) if stage1_dir else None
    rows = resolve_placeholders(read_concept_csv(args.data_path, args.csv_name), token.token if token else None,
                                Path(args.data_path) / args.csv_name)
    items = rows_to_items(rows)
    validation_prompt = fill_placeholder(args.validation_prompt, token.token if token else rows[0].instance_word) \
        if args.validation_prompt else None
    output_dir = Path(args.output_dir) / concept  # as the authors' script: <output_dir>/<csv stem>/
    run = plan_run(args, output_dir, items, stage=2, extractor_dir=stage1_dir if args.extractor_mode == "lora" else None,
                   validation_prompt=validation_prompt)
    return dataclasses.replace(run, learned_token=token), items


@contextmanager
def extractor_weights(lora_layers: list, extractor_mode: str):
    """E for one no-grad pass: the stage-1 adapter alone (or every adapter off for --extractor_mode base), then the
    trainable adapter again; the trainable LoRA stays marked trainable throughout (utils.lora.switch_adapter)."""
    if extractor_mode == "base":
        with adapters_disabled(lora_layers):
            yield
        return
    switch_adapter(lora_layers, EXTRACTOR)
    try:
        yield
    finally:
        switch_adapter(lora_layers, TRAINABLE)


def main(argv=None):
    args = parse_args(argv)
    run, items = check_inputs(args)
    if args.check_only:
        return report_check(run, items)
    accelerator = start_run(args, run)
    device, weight_dtype = accelerator.device, weight_dtype_of(accelerator)
    class_items = ensure_class_images(args, accelerator, weight_dtype) if args.with_prior_preservation else None

    # Text: every distinct prompt of the CSV (prompt, base_prompt, target_prompt) plus "" encoded once, after stage 1's
    # learned token (if any) is registered, so both branches see it. The extractor is all of stage 1: if stage 1
    # trained CLIP LoRAs, the extractor's prompts are encoded through them.
    text_pipe = load_text_pipeline(args.pretrained_model_name_or_path, args.revision, args.variant, weight_dtype)
    if run.learned_token is not None:
        register_token(text_pipe, run.learned_token)
    encoder = PromptEncoder(text_pipe, run_prompts(args, run, [item[key] for item in items for key in PROMPT_COLUMNS]),
                            device, args.max_sequence_length, args.text_encoder_device)
    prompt_cache = extractor_cache = encoder.cache()
    if run.extractor_dir is not None and load_text_encoder_loras(text_pipe, run.extractor_dir, EXTRACTOR):
        extractor_cache = encoder.cache([item["target_prompt"] for item in items])
    encoder.close()

    # Model: ONE frozen base transformer, a new trainable LoRA and the frozen stage-1 LoRA as named adapters.
    noise_scheduler, vae, transformer = load_diffusion_parts(args, device, weight_dtype)
    add_trainable_lora(transformer, transformer_lora_config(args), TRAINABLE, seed=args.seed)
    if run.extractor_dir is not None:  # peft places it beside the base weights (a quantised base refuses .to(dtype))
        load_lora_as_adapter(transformer, run.extractor_dir, EXTRACTOR, trainable=False)
    activate_adapter(transformer, TRAINABLE, trainable=True)
    weights = TrainedWeights({"transformer": (transformer, TRAINABLE)}, args.pretrained_model_name_or_path,
                             copied_token=run.learned_token)
    param_groups = [{"params": trainable_to_fp32(transformer), "lr": scaled_learning_rate(args, accelerator)}]
    trainer = prepare_training(args, run, accelerator, weights, param_groups, items, class_items, vae,
                               "purecc-stage2")
    precondition = bool(args.precondition_outputs)
    lora_layers = tuner_layers(transformer)  # every adapter is on the transformer by now
    lambda_of, loss_of = compiled_if(args, purecc_lambda), compiled_if(args, purecc_loss)
    prior_of = compiled_if(args, flow_matching_loss)

    def extractor_delta_of(noised, target_prompts):
        """delta = E(x_t, t, target_prompt) - E(x_t, t, ""): one no-grad pass of the frozen extractor."""
        with torch.no_grad(), extractor_weights(lora_layers, args.extractor_mode):
            e_cond, e_uncond = predict(trainer.model, extractor_cache, [(noised, target_prompts),
                                                                        (noised, [""] * len(target_prompts))],
                                       weight_dtype)
        return extractor_delta(*(prediction_space(e, noised, precondition) for e in (e_cond, e_uncond)))

    def concept_and_original(noised, batch, klass):
        """v = F_theta(x_t, t, prompt) and v_base = F_theta(x_t, t, base_prompt) in one pass with the class images
        (the paper's dual branch); with --original_branch frozen, v_base is the base model's, no grad (supplement
        section 14); with detached, the trainable model's without gradient."""
        if args.original_branch == "frozen":
            with torch.no_grad(), adapters_disabled(lora_layers):
                [v_base] = predict(trainer.model, prompt_cache, [(noised, batch["base_prompt"])], weight_dtype)
            v, *class_pred = predict(trainer.model, prompt_cache, [(noised, batch["prompt"]), *klass], weight_dtype)
        else:
            v, v_base, *class_pred = predict(trainer.model, prompt_cache, [(noised, batch["prompt"]),
                                                                           (noised, batch["base_prompt"]), *klass],
                                             weight_dtype)
            if args.original_branch == "detached":
                v_base = v_base.detach()
        return v, v_base, class_pred

    def step(batch, generator):
        """Algorithm 1, lines 9-16: one PureCC step, the same x_t and t for every branch."""
        noised = add_noise(batch_latents(vae, batch, trainer.latent_cache, generator, device), noise_scheduler, args,
                           generator)                                                     # lines 9-10
        klass = class_group(batch, vae, noise_scheduler, args, generator, device)         # prior preservation
        delta = extractor_delta_of(noised, batch["target_prompt"])                        # line 11
        v, v_base, class_pred = concept_and_original(noised, batch, klass)                # lines 12-13
        v, v_base = (prediction_space(p, noised, precondition) for p in (v, v_base))
        lam = lambda_of(args.lambda_mode, v, v_base, delta, args.fix_lambda, args.lambda_min,
                        args.lambda_max)                                                  # line 14, Eqs. 10-12
        terms = loss_of(v, v_base, delta, flow_target(noised, precondition), noised.weights, args.eta,
                        lam)                                                              # line 15, Eqs. 13-15
        at_min, at_max = clamped_fractions(args.lambda_mode, lam, args.lambda_min, args.lambda_max)
        logs = {"loss": terms.total.item(), "diff_loss": terms.diff_loss.item(), "pri_loss": terms.pure_loss.item(),
                "lambda": lam.mean().item(), "lambda_at_min": at_min, "lambda_at_max": at_max}
        loss = terms.total
        if klass:  # DreamBooth prior preservation, added to Eq. 15
            prior = prior_of(class_pred[0], klass[0][0], precondition)
            loss = loss + args.prior_loss_weight * prior
            logs.update(prior_loss=prior.item(), loss=loss.item())
        return loss, logs                                                                 # line 16: the update

    validate = make_validator(args, run, accelerator, transformer, vae, noise_scheduler, prompt_cache)
    step_count, history = train_loop(trainer, step, on_epoch_end=validate)
    finish_run(run, accelerator, trainer.model, weights, f"PureCC stage 2: {run.output_dir.name}",
               {"stage": 2, "steps": step_count, "eta": args.eta, "lambda_mode": args.lambda_mode,
                "fix_lambda": args.fix_lambda if args.lambda_mode == "fixed" else "-",
                "lambda range": f"[{args.lambda_min}, {args.lambda_max}]", "original_branch": args.original_branch,
                "extractor_mode": args.extractor_mode,
                "extractor": str(run.extractor_dir) if run.extractor_dir else "base model",
                "concept token": run.learned_token.token if run.learned_token else "-",
                "rank": args.rank, "learning_rate": args.learning_rate,
                "precondition_outputs": args.precondition_outputs, "seed": args.seed},
               f'pipe.transformer = PeftModel.from_pretrained(pipe.transformer, "{run.output_dir}")', validate,
               step_count, trainer.schedule.num_train_epochs - 1)
    return SimpleNamespace(transformer=transformer, step=step_count, history=history, output_dir=run.output_dir)


if __name__ == "__main__":
    exit_on_error(main)
