"""Build a tiny, random-weight Stable Diffusion 3 pipeline folder offline (for tests and smoke runs).

    python -m utils.tiny_sd3 OUT_DIR [--variant sd3|sd35] [--seed N]

or ``build_tiny_sd3(out_dir, variant="sd3", seed=0) -> Path``.

The folder has the diffusers layout (model_index.json + one subfolder per component) and loads with
``StableDiffusion3Pipeline.from_pretrained(out_dir)`` or each component's ``from_pretrained(out_dir,
subfolder=...)``. Nothing is downloaded: the tokenizers are generated here (a CLIP byte-level BPE written as
vocab.json + merges.txt, and a T5 Unigram tokenizer.json with byte fallback), the models get random weights.
Building twice with the same variant and seed gives byte-identical folders.

Variants:
  * ``sd3``  mirrors diffusers' own SD3 pipeline test components (patch 1, 4 latent channels, a one-block VAE
    so the VAE scale factor is 1, CLIP concat width 64 > T5 width 32).
  * ``sd35`` has SD3.5-Medium's architectural features: MMDiT-X dual attention in layer 0, RMS qk-norm,
    patch 2, 16 latent channels, a two-block VAE (scale factor 2), and a T5 width larger than the CLIP concat
    so the pipeline zero-pads the CLIP embeddings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast

VARIANTS = ("sd3", "sd35")
CLIP_MAX_LENGTH = 77
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
CLIP_NUM_MERGES = 1000  # upper bound; the built-in word list runs out after ~600 (every word one token)

# Small built-in English corpus for learning BPE merges / choosing Unigram pieces. Word order and repeats
# only matter for determinism, which Python guarantees for this literal.
_WORDS = """
a an the of in on at to for with and or but from by as is are was be been this that these those it its
photo photograph picture image painting drawing sketch render rendering illustration portrait close up
shot view style art artwork digital oil watercolor pencil cartoon anime realistic detailed high quality
dog cat puppy kitten bird horse cow sheep duck fish rabbit bear lion tiger fox wolf monkey panda
man woman boy girl person people child children face eyes hair smile hat shirt dress glasses
toy teddy backpack bag cup mug bowl vase bottle can clock shoe shoes sneaker boot car truck bike bicycle
chair table sofa bed lamp book books candle teapot robot sunglasses plushie statue sculpture
red blue green yellow orange purple pink black white gray grey brown golden silver colorful dark bright
big small tiny large little old young new happy sad cute beautiful pretty ugly shiny wooden metal glass
sitting standing running jumping sleeping eating playing swimming flying walking lying floating
beach forest mountain mountains river lake sea ocean sky cloud clouds snow rain sun moon night day
city street road house room kitchen garden park field grass flower flowers tree trees desert jungle
water fire stone rock sand wall floor background front behind top under inside outside near next
sks zwx ohwx concept token subject object scene light lighting shadow sunset sunrise morning evening
made wearing holding riding next top bottom left right center middle side one two three four five
square circle triangle cross brick
""".split()


# ----------------------------------------------------------------------------------------------- tokenizers
def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible byte -> printable unicode map (GPT-2 / CLIP)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _learn_bpe_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE on byte-unicode symbols, the last symbol of a word carrying "</w>". Ties break on the pair."""
    b2u = _bytes_to_unicode()
    freqs = Counter(words)
    seqs: dict[tuple[str, ...], int] = {}
    for w, f in sorted(freqs.items()):
        syms = [b2u[b] for b in w.encode("utf-8")]
        syms[-1] = syms[-1] + "</w>"
        seqs[tuple(syms)] = seqs.get(tuple(syms), 0) + f
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for syms, f in seqs.items():
            for a, b in zip(syms, syms[1:]):
                pairs[(a, b)] += f
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        merges.append(best)
        new_seqs: dict[tuple[str, ...], int] = {}
        for syms, f in seqs.items():
            out: list[str] = []
            i = 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            new_seqs[tuple(out)] = new_seqs.get(tuple(out), 0) + f
        seqs = new_seqs
    return merges


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_clip_tokenizer(folder: Path, pad_token: str, max_length: int = CLIP_MAX_LENGTH) -> dict[str, int]:
    """OpenAI CLIP layout: 256 byte symbols, their "</w>" forms, merged symbols, then the two specials."""
    folder.mkdir(parents=True, exist_ok=True)
    b2u = _bytes_to_unicode()
    base = list(b2u.values())
    vocab_list = base + [s + "</w>" for s in base]
    merges = _learn_bpe_merges(_WORDS, CLIP_NUM_MERGES)
    seen = set(vocab_list)
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            vocab_list.append(a + b)
    vocab_list += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    special = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
    }
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(
        folder / "tokenizer_config.json",
        {
            **special,
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": max_length,
            "do_lower_case": True,
            "clean_up_tokenization_spaces": False,
            "errors": "replace",
            "model_input_names": ["input_ids", "attention_mask"],
        },
    )
    return {"bos": vocab[BOS_TOKEN], "eos": vocab[EOS_TOKEN], "pad": vocab[pad_token], "size": len(vocab)}


def _t5_pieces() -> list[tuple[str, float]]:
    """Unigram pieces: specials, the 256 byte-fallback pieces, then "▁", letters, digits and word pieces."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"<0x{i:02X}>", 0.0) for i in range(256)]
    seen = {p for p, _ in pieces}

    def add(piece: str, score: float) -> None:
        if piece not in seen:  # duplicates make len(tokenizer) version-dependent
            seen.add(piece)
            pieces.append((piece, score))

    add("▁", -2.0)
    for ch in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'\"-:;()":
        add(ch, -6.0)
    counts = Counter(_WORDS)
    for w in sorted(counts):
        add("▁" + w, -3.0 - 1.0 / counts[w] - 0.01 * len(w))
    return pieces


def _write_t5_tokenizer(folder: Path) -> int:
    pieces = _t5_pieces()
    tok = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "tokenizer.json"
        tok.save(str(raw))
        t5 = T5TokenizerFast(
            tokenizer_file=str(raw), extra_ids=0, additional_special_tokens=[], model_max_length=512
        )
    folder.mkdir(parents=True, exist_ok=True)
    t5.save_pretrained(str(folder))
    return len(pieces)


# ----------------------------------------------------------------------------------------------- configs
def _variant_config(variant: str) -> dict:
    if variant == "sd3":
        return dict(
            transformer=dict(
                sample_size=32,
                patch_size=1,
                in_channels=4,
                num_layers=1,
                attention_head_dim=8,
                num_attention_heads=4,
                caption_projection_dim=32,
                joint_attention_dim=32,
                pooled_projection_dim=64,
                out_channels=4,
                pos_embed_max_size=96,
            ),
            vae=dict(
                block_out_channels=(4,),
                down_block_types=("DownEncoderBlock2D",),
                up_block_types=("UpDecoderBlock2D",),
                latent_channels=4,
                norm_num_groups=1,
                layers_per_block=1,
                sample_size=32,
                shift_factor=0.0609,
                scaling_factor=1.5035,
            ),
            clip_l=dict(hidden=32, proj=32),
            clip_g=dict(hidden=32, proj=32),
            t5_d_model=32,
        )
    if variant == "sd35":
        return dict(
            transformer=dict(
                sample_size=32,
                patch_size=2,
                in_channels=16,
                num_layers=2,
                attention_head_dim=8,
                num_attention_heads=4,
                caption_projection_dim=32,
                joint_attention_dim=128,
                pooled_projection_dim=80,
                out_channels=16,
                pos_embed_max_size=96,
                dual_attention_layers=(0,),
                qk_norm="rms_norm",
            ),
            vae=dict(
                block_out_channels=(8, 16),
                down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
                latent_channels=16,
                norm_num_groups=4,
                layers_per_block=1,
                sample_size=64,
                shift_factor=0.0609,
                scaling_factor=1.5305,
            ),
            clip_l=dict(hidden=32, proj=32),
            clip_g=dict(hidden=48, proj=48),
            t5_d_model=128,
        )
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


# ----------------------------------------------------------------------------------------------- builder
def _seed(seed: int, offset: int) -> None:
    torch.manual_seed(seed * 1000 + offset)


def write_text_encoders(out: Path, variant: str = "sd35", seed: int = 0, clip_max_length: int = CLIP_MAX_LENGTH) -> dict:
    """The tiny tokenizers and text encoders of a variant into ``out`` (tokenizer*/, text_encoder*/); returns the
    model_index.json entries they need. ``clip_max_length`` is the CLIP tokenizers' padded length (the weights keep
    77 positions, so a shorter length only shortens the sequence)."""
    cfg = _variant_config(variant)
    # tokenizer (CLIP-L) pads with <|endoftext|>, tokenizer_2 (CLIP-G) pads with "!" like SD3.
    ids_1 = _write_clip_tokenizer(out / "tokenizer", pad_token=EOS_TOKEN, max_length=clip_max_length)
    ids_2 = _write_clip_tokenizer(out / "tokenizer_2", pad_token="!", max_length=clip_max_length)
    for i, (sub, ids, dims) in enumerate(
        [("text_encoder", ids_1, cfg["clip_l"]), ("text_encoder_2", ids_2, cfg["clip_g"])]
    ):
        _seed(seed, 1 + i)
        clip_cfg = CLIPTextConfig(
            vocab_size=ids["size"],
            hidden_size=dims["hidden"],
            intermediate_size=2 * dims["hidden"],
            projection_dim=dims["proj"],
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=CLIP_MAX_LENGTH,
            hidden_act="gelu",
            bos_token_id=ids["bos"],
            eos_token_id=ids["eos"],
            pad_token_id=ids["pad"],
        )
        CLIPTextModelWithProjection(clip_cfg).eval().save_pretrained(out / sub, safe_serialization=True)
    t5_vocab = _write_t5_tokenizer(out / "tokenizer_3")
    _seed(seed, 3)
    t5_cfg = T5Config(
        vocab_size=t5_vocab,
        d_model=cfg["t5_d_model"],
        d_kv=8,
        d_ff=2 * cfg["t5_d_model"],
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=True,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    T5EncoderModel(t5_cfg).eval().save_pretrained(out / "text_encoder_3", safe_serialization=True)
    return {
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
    }


def write_model_index(out: Path, components: dict) -> None:
    """model_index.json of a StableDiffusion3Pipeline folder with the given component entries."""
    _write_json(out / "model_index.json", {"_class_name": "StableDiffusion3Pipeline",
                                           "_diffusers_version": diffusers.__version__,
                                           "feature_extractor": [None, None], "image_encoder": [None, None],
                                           **components})


def build_tiny_sd3(out_dir, variant: str = "sd3", seed: int = 0) -> Path:
    """Write a tiny random-weight SD3 pipeline folder to ``out_dir`` (replaced if it exists); return its Path."""
    cfg = _variant_config(variant)
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)

    components = write_text_encoders(out, variant, seed)

    _seed(seed, 4)
    SD3Transformer2DModel(**cfg["transformer"]).save_pretrained(out / "transformer", safe_serialization=True)

    _seed(seed, 5)
    AutoencoderKL(
        in_channels=3, out_channels=3, use_quant_conv=False, use_post_quant_conv=False, **cfg["vae"]
    ).save_pretrained(out / "vae", safe_serialization=True)

    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(out / "scheduler")

    write_model_index(out, {**components, "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                            "transformer": ["diffusers", "SD3Transformer2DModel"],
                            "vae": ["diffusers", "AutoencoderKL"]})
    return out


# SD3.5 Medium's published configs (stabilityai/stable-diffusion-3.5-medium): for benchmarks at the real size.
SD35M = dict(
    transformer=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                     num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                     pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
                     dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    vae=dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), latent_channels=16,
             down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
             layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
             use_quant_conv=False, use_post_quant_conv=False),
    clip_l=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                projection_dim=768, hidden_act="quick_gelu"),
    clip_g=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                projection_dim=1280, hidden_act="gelu"),
    t5=dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, num_decoder_layers=24,
            relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu"),
)


def build_sd35m(out_dir, device="cuda", dtype=torch.bfloat16, seed: int = 0) -> Path:
    """A random-weight pipeline folder with SD3.5 Medium's real model configs (2.24 B transformer, SD3 VAE, CLIP-L,
    CLIP-G, T5-XXL: ~15 GB in bf16), for benchmarks; the tokenizers are the tiny generated ones (the vocabularies
    keep their real sizes). Built directly on ``device`` in ``dtype`` (a GPU builds it in about a minute)."""
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    ids_1 = _write_clip_tokenizer(out / "tokenizer", pad_token=EOS_TOKEN)
    ids_2 = _write_clip_tokenizer(out / "tokenizer_2", pad_token="!")
    _write_t5_tokenizer(out / "tokenizer_3")
    torch.manual_seed(seed)
    with torch.device(device):
        for sub, ids, dims in (("text_encoder", ids_1, SD35M["clip_l"]), ("text_encoder_2", ids_2, SD35M["clip_g"])):
            config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=ids["bos"],
                                    eos_token_id=ids["eos"], pad_token_id=ids["pad"], **dims)
            CLIPTextModelWithProjection(config).to(dtype).save_pretrained(out / sub, safe_serialization=True)
        T5EncoderModel(T5Config(vocab_size=32128, is_encoder_decoder=True, pad_token_id=0, eos_token_id=1,
                                decoder_start_token_id=0, **SD35M["t5"])).to(dtype).save_pretrained(
            out / "text_encoder_3", safe_serialization=True)
        SD3Transformer2DModel(**SD35M["transformer"]).to(dtype).save_pretrained(out / "transformer",
                                                                              safe_serialization=True)
        AutoencoderKL(**SD35M["vae"]).to(dtype).save_pretrained(out / "vae", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).save_pretrained(out / "scheduler")
    write_model_index(out, {"scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
                            "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
                            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                            "text_encoder_3": ["transformers", "T5EncoderModel"],
                            "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                            "tokenizer_3": ["transformers", "T5TokenizerFast"],
                            "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--variant", choices=VARIANTS, default="sd3")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    out = build_tiny_sd3(a.out_dir, variant=a.variant, seed=a.seed)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
