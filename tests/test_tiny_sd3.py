"""The offline tiny SD3 builder (utils/tiny_sd3.py) yields loadable, deterministic, small pipeline folders."""

import json

import pytest
import torch

from utils.tiny_sd3 import CLIP_MAX_LENGTH, build_tiny_sd3

MAX_BYTES = 5 * 1024 * 1024
LONG_PROMPT = " ".join(["a", "photo", "of", "sks", "dog", "on", "the", "beach", "at", "sunset"] * 20)  # 200 words
SUBFOLDERS = ["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
              "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"]


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _folder_bytes(root):
    return sum(len(b) for b in _files(root).values())


@pytest.fixture(scope="module")
def pipes(tiny_sd3_path, tiny_sd35_path):
    from diffusers import StableDiffusion3Pipeline

    return {v: StableDiffusion3Pipeline.from_pretrained(p) for v, p in
            [("sd3", tiny_sd3_path), ("sd35", tiny_sd35_path)]}


def test_layout_and_size(tiny_model_path):
    index = json.loads((tiny_model_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    for sub in SUBFOLDERS:
        assert (tiny_model_path / sub).is_dir(), sub
    names = _files(tiny_model_path)
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    assert sum(n.endswith(".safetensors") for n in names) == 5
    for n in ("tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer_2/vocab.json", "tokenizer_3/tokenizer.json"):
        assert n in names
    assert 0 < _folder_bytes(tiny_model_path) < MAX_BYTES
    text = b"".join(b for n, b in names.items() if n.endswith(".json")).decode()
    assert str(tiny_model_path) not in text and "/tmp" not in text


def test_every_component_loads(tiny_model_path):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    p = tiny_model_path
    tr = SD3Transformer2DModel.from_pretrained(p, subfolder="transformer")
    vae = AutoencoderKL.from_pretrained(p, subfolder="vae")
    te1 = CLIPTextModelWithProjection.from_pretrained(p, subfolder="text_encoder")
    te2 = CLIPTextModelWithProjection.from_pretrained(p, subfolder="text_encoder_2")
    te3 = T5EncoderModel.from_pretrained(p, subfolder="text_encoder_3")
    tok1 = CLIPTokenizer.from_pretrained(p, subfolder="tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(p, subfolder="tokenizer_2")
    tok3 = T5TokenizerFast.from_pretrained(p, subfolder="tokenizer_3")
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(p, subfolder="scheduler")

    assert sched.config.shift == 3.0
    assert tr.config.in_channels == vae.config.latent_channels
    assert vae.config.shift_factor is not None and vae.config.scaling_factor != 1.0
    assert tr.config.pooled_projection_dim == te1.config.projection_dim + te2.config.projection_dim
    assert tr.config.joint_attention_dim == te3.config.d_model
    for tok, te in ((tok1, te1), (tok2, te2)):
        assert tok.model_max_length == CLIP_MAX_LENGTH == te.config.max_position_embeddings
        assert te.config.eos_token_id == tok.eos_token_id != 2
        assert te.config.bos_token_id == tok.bos_token_id
        assert te.config.pad_token_id == tok.pad_token_id
        assert te.config.vocab_size == len(tok)
    assert tok1.pad_token == "<|endoftext|>" and tok2.pad_token == "!"
    assert (tok3.pad_token_id, tok3.eos_token_id, tok3.unk_token_id) == (0, 1, 2)
    assert te3.config.vocab_size == len(tok3)
    ids = tok3("a photo of a dog").input_ids
    assert ids[-1] == 1 and 2 not in ids
    # Byte-level CLIP BPE: any text, including non-ASCII, maps to known tokens (unk is eos, so count eos).
    ids = tok1("zebra ü 日本 😀 naïve café").input_ids
    assert ids.count(tok1.eos_token_id) == 1 and ids[0] == tok1.bos_token_id
    assert tok1.tokenize("a photo of a dog") == ["a</w>", "photo</w>", "of</w>", "a</w>", "dog</w>"]  # merges learned


def test_generates_64px_image(pipes):
    for variant, pipe in pipes.items():
        out = pipe("a photo of sks dog", height=64, width=64, num_inference_steps=2, output_type="pil",
                   generator=torch.Generator().manual_seed(0))
        img = out.images[0]
        assert img.size == (64, 64), variant
        assert img.mode == "RGB"


def test_long_prompt_truncates_and_encodes(pipes):
    assert len(LONG_PROMPT.split()) == 200
    for variant, pipe in pipes.items():
        for tok in (pipe.tokenizer, pipe.tokenizer_2):
            ids = tok(LONG_PROMPT, padding="max_length", max_length=pipe.tokenizer_max_length,
                      truncation=True).input_ids
            assert len(ids) == 77 and ids[-1] == tok.eos_token_id
        with torch.no_grad():
            pe, npe, pooled, npooled = pipe.encode_prompt(LONG_PROMPT, LONG_PROMPT, LONG_PROMPT, device="cpu",
                                                          max_sequence_length=128)
        tr = pipe.transformer.config
        assert pe.shape == (1, 77 + 128, tr.joint_attention_dim), variant
        assert pooled.shape == (1, tr.pooled_projection_dim)
        assert torch.isfinite(pe).all() and torch.isfinite(pooled).all()


def test_sd35_features(pipes):
    pipe = pipes["sd35"]
    cfg = pipe.transformer.config
    assert pipe.vae_scale_factor > 1
    clip_width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert cfg.joint_attention_dim > clip_width
    assert cfg.patch_size == 2 and cfg.in_channels == 16 and cfg.qk_norm == "rms_norm"
    assert tuple(cfg.dual_attention_layers) and cfg.num_layers == 2
    # The CLIP part of the prompt embeds is zero-padded up to the T5 width.
    with torch.no_grad():
        pe = pipe.encode_prompt("a dog", "a dog", "a dog", device="cpu", max_sequence_length=16)[0]
    assert torch.all(pe[:, :77, clip_width:] == 0) and pe[:, :77, :clip_width].abs().sum() > 0
    assert pipes["sd3"].vae_scale_factor == 1 and pipes["sd3"].transformer.config.patch_size == 1


def test_build_is_deterministic(tmp_path, tiny_sd35_path):
    a = _files(build_tiny_sd3(tmp_path / "a", variant="sd35", seed=0))
    assert a == _files(tiny_sd35_path)
    b = _files(build_tiny_sd3(tmp_path / "b", variant="sd35", seed=1))
    assert a.keys() == b.keys()
    assert a["transformer/diffusion_pytorch_model.safetensors"] != b["transformer/diffusion_pytorch_model.safetensors"]
    assert a["tokenizer/vocab.json"] == b["tokenizer/vocab.json"]


def test_build_sd3_twice_identical(tmp_path):
    assert _files(build_tiny_sd3(tmp_path / "a")) == _files(build_tiny_sd3(tmp_path / "b"))


def test_cli(tmp_path, capsys):
    """``python -m utils.tiny_sd3 OUT --variant sd35`` (its main, in this process)."""
    from utils.tiny_sd3 import main

    out = tmp_path / "cli"
    assert main([str(out), "--variant", "sd35", "--seed", "0"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert (out / "model_index.json").is_file()
    cfg = json.loads((out / "transformer" / "config.json").read_text())
    assert cfg["patch_size"] == 2 and cfg["qk_norm"] == "rms_norm"
    with pytest.raises(SystemExit) as bad:
        main([str(tmp_path / "x"), "--variant", "nope"])
    assert bad.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err
