"""The learned concept token (the release's stage-1 recipe; a one-token simplification of the paper's Eq. 7).

Stage 1 with ``--new_concept_token <new1>`` adds the token to both CLIP tokenizers (T5 is untouched, as in the
release), initialises its embedding in CLIP-L and CLIP-G from the instance word (the mean of the word's token
embeddings) and trains that one row of each table with ``--embedding_lr``; every other row stays exactly frozen
because it is not a parameter at all (``ConceptEmbedding``). The rows are saved as ``learned_embeds.safetensors``
beside the LoRA, with the token and the initializer in its metadata; stage 2 and ``infer.py`` register them in the
pipeline's tokenizers and encoders before any prompt is encoded. The release pickles the same data as
``learned_embeds.pt``; a pickle is never read here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .checks import BadInput
from .lora import save_safetensors

EMBEDS_NAME = "learned_embeds.safetensors"
RELEASE_EMBEDS_NAME = "learned_embeds.pt"
# (tokenizer, text encoder, tensor name): CLIP-L and CLIP-G, the release's key names
CLIP_PARTS = (("tokenizer", "text_encoder", "embedding_one"), ("tokenizer_2", "text_encoder_2", "embedding_two"))


@dataclass(frozen=True)
class LearnedToken:
    token: str
    initializer: str
    embeddings: dict  # "embedding_one" (CLIP-L row), "embedding_two" (CLIP-G row): float32 CPU tensors


class ConceptEmbedding(torch.nn.Module):
    """A CLIP token-embedding table whose rows are all frozen except the concept token's, which is a parameter of
    its own: ids equal to ``token_id`` read ``row``, every other id the frozen table."""

    def __init__(self, table: torch.nn.Embedding, token_id: int):
        super().__init__()
        self.table, self.token_id = table.requires_grad_(False), token_id
        self.row = torch.nn.Parameter(table.weight[token_id].detach().float().clone())

    @property
    def weight(self) -> torch.Tensor:  # what transformers reads the width and dtype from
        return self.table.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        frozen = self.table(input_ids)
        return torch.where((input_ids == self.token_id).unsqueeze(-1), self.row.to(frozen.dtype), frozen)


def add_token(tokenizer, text_encoder, token: str) -> int:
    """Add ``token`` to a CLIP tokenizer and grow the encoder's table by one row; returns its id. CLIP configs with
    the legacy eos_token_id 2 pool at the highest token id, which the new token would then be: pooling is pinned
    to the real end-of-text token."""
    if tokenizer.add_tokens([token]) != 1:
        raise BadInput(f"--new_concept_token {token} is already a word of the CLIP vocabulary: pick a new string, "
                       f"e.g. <new1>.")
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    text_encoder.text_model.eos_token_id = tokenizer.eos_token_id
    return tokenizer.convert_tokens_to_ids(token)


def add_trainable_token(text_pipe, token: str, initializer: str) -> list[ConceptEmbedding]:
    """Stage 1: the token in both CLIP tokenizers, its rows initialised from ``initializer`` and made the only
    trainable part of each embedding table. Returns the two ConceptEmbedding modules (their ``row`` trains)."""
    modules = []
    for tokenizer_name, encoder_name, _ in CLIP_PARTS:
        tokenizer, encoder = getattr(text_pipe, tokenizer_name), getattr(text_pipe, encoder_name)
        init_ids = tokenizer(initializer, add_special_tokens=False).input_ids
        if not init_ids:
            raise BadInput(f"--initializer_token {initializer!r} has no tokens in the CLIP vocabulary.")
        token_id = add_token(tokenizer, encoder, token)
        table = encoder.get_input_embeddings()
        with torch.no_grad():  # the mean of the initializer's token embeddings (the release takes its first token)
            table.weight[token_id] = table.weight[init_ids].float().mean(dim=0).to(table.weight.dtype)
        module = ConceptEmbedding(table, token_id)
        encoder.text_model.embeddings.token_embedding = module
        modules.append(module)
    return modules


def learned_token(token: str, initializer: str, modules: list[ConceptEmbedding]) -> LearnedToken:
    return LearnedToken(token, initializer, {name: module.row.detach().float().cpu().clone()
                                             for (_, _, name), module in zip(CLIP_PARTS, modules)})


def register_token(text_pipe, learned: LearnedToken) -> None:
    """Stage 2 / inference: the learned token in both CLIP tokenizers with its rows set, frozen (as the release's
    stage 2 and inference snippet do)."""
    for tokenizer_name, encoder_name, name in CLIP_PARTS:
        tokenizer, encoder = getattr(text_pipe, tokenizer_name), getattr(text_pipe, encoder_name)
        token_id = add_token(tokenizer, encoder, learned.token)
        table = encoder.get_input_embeddings()
        row = learned.embeddings[name]
        if row.shape != table.weight.shape[1:]:
            raise BadInput(f"the learned token {learned.token} has a {encoder_name} embedding of width {row.shape[0]}, "
                           f"this model's is {table.weight.shape[1]}: it was learned on another base model.")
        with torch.no_grad():
            table.weight[token_id] = row.to(table.weight.dtype)


def restore_rows(modules: list[ConceptEmbedding], learned: LearnedToken) -> None:
    """Resume: put a checkpoint's rows back into the training modules."""
    with torch.no_grad():
        for (_, _, name), module in zip(CLIP_PARTS, modules):
            module.row.copy_(learned.embeddings[name])


def save_learned_token(folder, learned: LearnedToken) -> None:
    save_safetensors({name: tensor.contiguous() for name, tensor in learned.embeddings.items()},
                     Path(folder) / EMBEDS_NAME, metadata={"new_concept_token": learned.token,
                                                            "initializer_token": learned.initializer})


def read_learned_token(folder) -> LearnedToken | None:
    """The learned token saved in a stage-1 (or stage-2) output folder or checkpoint; None if it has none."""
    path = Path(folder) / EMBEDS_NAME
    if not path.is_file():
        if (Path(folder) / RELEASE_EMBEDS_NAME).is_file():
            raise BadInput(f"{folder} holds the release's {RELEASE_EMBEDS_NAME}, a pickle, which is never read here "
                           f"(unpickling runs code). Retrain stage 1 here with --new_concept_token, which writes "
                           f"{EMBEDS_NAME}.")
        return None
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "new_concept_token" not in metadata:
        raise BadInput(f"{path} names no token in its metadata (new_concept_token): it was not written by stage 1.")
    return LearnedToken(metadata["new_concept_token"], metadata.get("initializer_token", ""), load_file(str(path)))
