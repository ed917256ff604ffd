"""The authors' current interface (lzc-sg/PureCC HEAD): the learned concept token, [v] in CSVs, --stage1_output_dir,
--stage1_prompt_column, Prodigy, and every flag of the release's two scripts accepted."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from helpers import DATA, REPO_ROOT, launch, lora_tensors, stage1, stage2
from safetensors import safe_open

import train_stage1_sd3
import train_stage2_v2_sd3
from utils.checks import BadInput
from utils.concept_token import EMBEDS_NAME, read_learned_token

# Every flag of the release's training/train_stage1_sd3.py and training/train_stage2_sd3.py (HEAD fcec0bf)
RELEASE_STAGE1_FLAGS = """--pretrained_model_name_or_path --revision --variant --new_concept_token --embedding_lr --data_path
--csv_name --dataset_name --dataset_config_name --instance_data_dir --cache_dir --image_column --caption_column --repeats
--class_data_dir --instance_prompt --class_prompt --max_sequence_length --validation_prompt --num_validation_images
--validation_epochs --rank --lora_dropout --with_prior_preservation --prior_loss_weight --num_class_images --output_dir
--seed --resolution --center_crop --random_flip --train_batch_size --sample_batch_size --num_train_epochs
--max_train_steps --checkpointing_steps --checkpoints_total_limit --resume_from_checkpoint --gradient_accumulation_steps
--gradient_checkpointing --learning_rate --text_encoder_lr --scale_lr --lr_scheduler --lr_warmup_steps --lr_num_cycles
--lr_power --dataloader_num_workers --weighting_scheme --logit_mean --logit_std --mode_scale --precondition_outputs
--optimizer --use_8bit_adam --adam_beta1 --adam_beta2 --prodigy_beta3 --prodigy_decouple --adam_weight_decay
--adam_weight_decay_text_encoder --lora_layers --lora_blocks --adam_epsilon --prodigy_use_bias_correction
--prodigy_safeguard_warmup --max_grad_norm --push_to_hub --hub_token --hub_model_id --logging_dir --allow_tf32
--cache_latents --report_to --mixed_precision --upcast_before_saving --prior_generation_precision --local_rank""".split()
RELEASE_STAGE2_FLAGS = """--pretrained_model_name_or_path --revision --variant --dataset_name --data_path --csv_name
--dataset_config_name --instance_data_dir --cache_dir --image_column --caption_column --repeats --class_data_dir
--instance_prompt --class_prompt --max_sequence_length --validation_prompt --num_validation_images --validation_epochs
--rank --lora_dropout --with_prior_preservation --prior_loss_weight --eta --fix_lambda --stage1_output_dir
--num_class_images --output_dir --seed --resolution --center_crop --random_flip --train_text_encoder --train_batch_size
--sample_batch_size --num_train_epochs --max_train_steps --checkpointing_steps --checkpoints_total_limit
--resume_from_checkpoint --gradient_accumulation_steps --gradient_checkpointing --learning_rate --text_encoder_lr
--scale_lr --lr_scheduler --lr_warmup_steps --lr_num_cycles --lr_power --dataloader_num_workers --weighting_scheme
--logit_mean --logit_std --mode_scale --precondition_outputs --optimizer --use_8bit_adam --adam_beta1 --adam_beta2
--prodigy_beta3 --prodigy_decouple --adam_weight_decay --adam_weight_decay_text_encoder --lora_layers --lora_blocks
--adam_epsilon --prodigy_use_bias_correction --prodigy_safeguard_warmup --max_grad_norm --push_to_hub --hub_token
--hub_model_id --logging_dir --allow_tf32 --cache_latents --report_to --mixed_precision --upcast_before_saving
--prior_generation_precision --local_rank""".split()
# a value each flag accepts (the release's own types); flags not listed take "1"
VALUES = {"--optimizer": "prodigy", "--mixed_precision": "no", "--lr_scheduler": "constant", "--weighting_scheme":
          "logit_normal", "--report_to": "none", "--lora_layers": "attn.to_q", "--lora_blocks": "0",
          "--prodigy_decouple": "False", "--prodigy_use_bias_correction": "True", "--prodigy_safeguard_warmup": "true",
          "--precondition_outputs": "0"}
STORE_TRUE = {"--center_crop", "--random_flip", "--with_prior_preservation", "--gradient_checkpointing", "--scale_lr",
              "--use_8bit_adam", "--push_to_hub", "--allow_tf32", "--cache_latents", "--upcast_before_saving",
              "--train_text_encoder"}


def release_csv(folder: Path) -> Path:
    """The example concept written the release's way: [v] in prompt and target_prompt, a class word as the
    instance_word (the token's initializer)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = list(csv.DictReader(open(DATA / "robot_toy.csv")))
    with open(folder / "robot_toy.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow(dict(row, image_path=str(DATA / row["image_path"]),
                                 prompt=row["prompt"].replace("sks robot toy", "[v]"),
                                 target_prompt=row["target_prompt"].replace("sks robot toy", "[v]"),
                                 instance_word="robot toy"))
    return folder / "robot_toy.csv"


@pytest.mark.parametrize("script, flags", [(train_stage1_sd3, RELEASE_STAGE1_FLAGS),
                                           (train_stage2_v2_sd3, RELEASE_STAGE2_FLAGS)])
def test_every_release_flag_is_accepted(script, flags):
    argv = []
    for flag in flags:
        argv += [flag] if flag in STORE_TRUE else [flag, VALUES.get(flag, "1")]
    args = script.parse_args(argv)
    assert args.optimizer == "prodigy" and args.prodigy_decouple is False and args.prodigy_safeguard_warmup is True


@pytest.mark.parametrize("flag", ["--push_to_hub", "--hub_token", "--local_rank", "--dataset_name",
                                  "--upcast_before_saving", "--prior_generation_precision", "--cache_dir"])
def test_ignored_release_flags_warn_in_one_line(flag, tiny_sd35_path, tmp_path):
    argv = ["--pretrained_model_name_or_path", str(tiny_sd35_path), "--data_path", str(DATA), "--csv_name",
            "robot_toy.csv", "--output_dir", str(tmp_path), "--resolution", "64", "--check_only", flag]
    if flag not in STORE_TRUE:
        argv.append("x")
    with pytest.warns(UserWarning, match=rf"^{flag} is ignored: "):
        train_stage1_sd3.main(argv)


def test_release_readme_commands_run_verbatim(tiny_sd35_path, tmp_path, fresh_accelerator_state):
    """The release README's stage-1 and stage-2 commands (paths, steps and the tiny model's resolution aside) on a
    release-style CSV: stage 1 (in this process: the suite's 5 minutes; run_concept.sh and the DDP tests launch it)
    learns <new1>, stage 2 through ``accelerate launch`` as ``train_stage2_sd3.py`` (the release's name) finds it
    through --stage1_output_dir and copies it beside its LoRA."""
    data = release_csv(tmp_path / "dataset").parent
    out = tmp_path / "output"
    train_stage1_sd3.main([f"--pretrained_model_name_or_path={tiny_sd35_path}", f"--data_path={data}",
                           "--csv_name=robot_toy.csv", f"--output_dir={out / 'base_ckpt'}",
                           "--new_concept_token=<new1>", "--embedding_lr=5e-3", "--learning_rate=1e-4", "--rank=4",
                           "--resolution=64", "--train_batch_size=4", "--max_train_steps=2", "--mixed_precision=bf16",
                           "--seed=0", "--report_to=none"])
    launch("train_stage2_sd3.py", "--pretrained_model_name_or_path", tiny_sd35_path, "--data_path", data,
           "--csv_name", "robot_toy.csv", "--output_dir", out, "--stage1_output_dir", out / "base_ckpt",
           "--max_train_steps", "2", "--learning_rate", "1e-4", "--rank", "4", "--eta", "2.0", "--mixed_precision",
           "bf16", "--resolution", "64", "--report_to", "none")
    token = read_learned_token(out / "base_ckpt")
    assert token.token == "<new1>" and token.initializer == "robot toy"
    assert read_learned_token(out / "robot_toy").embeddings.keys() == token.embeddings.keys()
    assert all(torch.equal(read_learned_token(out / "robot_toy").embeddings[k], v) for k, v in token.embeddings.items())
    card = (out / "robot_toy" / "README.md").read_text()
    assert "| concept token | <new1> |" in card and str(out / "base_ckpt") in card


# ----------------------------------------------------------------------------------------------- the token
@pytest.fixture(scope="module")
def token_run(tiny_sd35_path, tmp_path_factory):
    """Stage 1 with <new1> on the release-style CSV, 4 steps, checkpoints every 2; and its text pipeline."""
    root = tmp_path_factory.mktemp("token")
    data = release_csv(root / "dataset")
    result = stage1(tiny_sd35_path, root / "stage1", "--data_path", data.parent, "--csv_name", data.name,
                    "--new_concept_token", "<new1>", "--embedding_lr", "5e-2", "--checkpointing_steps", "2",
                    "--learning_rate", "1e-2", steps=4, data=None)
    return dict(root=root, data=data, out=root / "stage1", result=result)


def test_only_the_token_rows_train(token_run, tiny_sd35_path):
    from transformers import CLIPTextModelWithProjection

    text_pipe = token_run["result"].text_pipe
    saved = read_learned_token(token_run["out"])
    for tokenizer, encoder, name in (("tokenizer", "text_encoder", "embedding_one"),
                                     ("tokenizer_2", "text_encoder_2", "embedding_two")):
        token_id = getattr(text_pipe, tokenizer).convert_tokens_to_ids("<new1>")
        module = getattr(text_pipe, encoder).text_model.embeddings.token_embedding
        original = CLIPTextModelWithProjection.from_pretrained(tiny_sd35_path, subfolder=encoder).get_input_embeddings()
        assert torch.equal(module.table.weight[:token_id], original.weight)  # every old row exactly as loaded
        init_ids = getattr(text_pipe, tokenizer)("robot toy", add_special_tokens=False).input_ids
        start = original.weight[init_ids].mean(dim=0)
        assert torch.allclose(module.table.weight[token_id], start)  # the frozen copy keeps the start value
        assert not torch.allclose(module.row, start, atol=1e-4)  # the trained row moved
        assert torch.equal(saved.embeddings[name], module.row.detach())
    with safe_open(str(token_run["out"] / EMBEDS_NAME), framework="pt") as handle:
        assert handle.metadata() == {"new_concept_token": "<new1>", "initializer_token": "robot toy"}
    assert (token_run["out"] / "checkpoint-2" / EMBEDS_NAME).is_file()


def test_stage2_sees_the_token_and_no_placeholder_reaches_a_text_encoder(token_run, tiny_sd35_path, tmp_path,
                                                                         monkeypatch):
    """Stage 2 with --stage1_output_dir registers stage 1's token (its saved rows) before any prompt is encoded, and
    every prompt it encodes has [v] filled with it."""
    from utils.prompts import PromptEncoder

    encoded, registered = [], []
    real_init = PromptEncoder.__init__

    def spy_init(self, pipe, prompts, *args, **kwargs):
        encoded.extend(prompts)
        token_id = pipe.tokenizer.convert_tokens_to_ids("<new1>")
        registered.append(pipe.text_encoder.get_input_embeddings().weight[token_id].detach().clone())
        real_init(self, pipe, prompts, *args, **kwargs)

    monkeypatch.setattr(PromptEncoder, "__init__", spy_init)
    stage2(tiny_sd35_path, tmp_path, "--stage1_output_dir", token_run["out"], steps=1, csv=token_run["data"])
    assert encoded and not [p for p in encoded if "[v]" in p]
    assert "a photo of <new1> on a wooden table" in encoded and "a photo of <new1>" in encoded
    assert torch.equal(registered[0], read_learned_token(token_run["out"]).embeddings["embedding_one"])


def test_token_resume_is_bitwise(token_run, tiny_sd35_path, tmp_path):
    import shutil

    killed = tmp_path / "killed"
    shutil.copytree(token_run["out"] / "checkpoint-2", killed / "checkpoint-2")
    stage1(tiny_sd35_path, killed, "--data_path", token_run["data"].parent, "--csv_name", token_run["data"].name,
           "--new_concept_token", "<new1>", "--embedding_lr", "5e-2", "--checkpointing_steps", "2",
           "--learning_rate", "1e-2", "--resume_from_checkpoint", "latest", steps=4, data=None)
    straight, again = read_learned_token(token_run["out"]), read_learned_token(killed)
    assert all(torch.equal(straight.embeddings[k], again.embeddings[k]) for k in straight.embeddings)
    a, b = lora_tensors(token_run["out"]), lora_tensors(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_prompt_column_and_placeholder_without_a_token(tmp_path, tiny_sd35_path):
    data = release_csv(tmp_path / "dataset")
    common = ["--pretrained_model_name_or_path", str(tiny_sd35_path), "--data_path", str(data.parent), "--csv_name",
              data.name, "--output_dir", str(tmp_path / "out"), "--resolution", "64"]
    by_target = train_stage1_sd3.training_items(train_stage1_sd3.parse_args(common))
    by_prompt = train_stage1_sd3.training_items(train_stage1_sd3.parse_args(common + ["--stage1_prompt_column",
                                                                                       "prompt"]))
    # without a learned token, [v] becomes the row's instance word
    assert {item["prompt"] for item in by_target} == {"a photo of robot toy"}
    assert by_prompt[0]["prompt"] == "a photo of robot toy on a wooden table"
    with_token = train_stage1_sd3.training_items(train_stage1_sd3.parse_args(common + ["--new_concept_token", "<v1>"]))
    assert {item["prompt"] for item in with_token} == {"a photo of <v1>"}
    bad = data.read_text().replace("a photo of a robot toy on a wooden table", "a photo of [v] on a wooden table", 1)
    data.write_text(bad)
    with pytest.raises(BadInput, match="data row 1, column 'base_prompt' contains \\[v\\]"):
        train_stage1_sd3.training_items(train_stage1_sd3.parse_args(common))


def test_prodigy_trains(tiny_sd3_path, tmp_path):
    out = tmp_path / "prodigy"
    stage1(tiny_sd3_path, out, "--optimizer", "prodigy", "--learning_rate", "1.0", "--prodigy_decouple", "false",
           "--checkpointing_steps", "2", steps=2)
    state = torch.load(out / "checkpoint-2" / "optimizer.bin", weights_only=True)
    group = state["param_groups"][0]
    assert group["decouple"] is False and group["d"] > 0  # Prodigy's own state: its step-size estimate
    assert any(v.abs().max() > 0 for k, v in lora_tensors(out).items() if "lora_B" in k)
