"""New text tokens for a policy: add them to the tokenizer and grow the text embeddings and head to fit.

GoT-R1 adds its four layout markers with ``tokenizer.add_tokens`` (``src/processor/processor.py``):
ordinary (non-special) added tokens, so ``decode(..., skip_special_tokens=True)`` keeps them and the
rewards see them in the plan text. Janus-Pro's text vocabulary (102,400 rows) is larger than its
tokenizer (~100,015 entries), so there the new ids already have rows; a model whose tokenizer fills its
vocabulary (the toy world) gets its input embedding and text head resized.

New rows are the mean of the existing rows (input embedding and text head alike), deterministically:
transformers' ``resize_token_embeddings`` samples them from a normal fitted to the old rows instead.
The model's ``text_config.vocab_size`` follows, so a saved checkpoint loads with its new size.
"""

from __future__ import annotations

import torch
from torch import nn


def _grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    extra = weight.detach().mean(0, keepdim=True).expand(rows - weight.shape[0], -1)
    return torch.cat([weight.detach(), extra.to(weight.dtype)], 0)


@torch.no_grad()
def resize_text_vocab(policy, size: int) -> None:
    """Grow the policy's text embedding and text head to ``size`` rows (new rows: the old rows' mean).
    Shrinking is refused (it would drop trained rows)."""
    model = policy.hf_model
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    old = emb.weight.shape[0]
    if size < old:
        raise ValueError(f"resize_text_vocab: {size} rows < the current {old} (shrinking is not supported)")
    if size == old:
        return
    new_emb = nn.Embedding(size, emb.weight.shape[1], padding_idx=emb.padding_idx, device=emb.weight.device,
                           dtype=emb.weight.dtype)
    new_emb.weight.copy_(_grow_rows(emb.weight, size))
    new_emb.weight.requires_grad_(emb.weight.requires_grad)
    model.set_input_embeddings(new_emb)
    new_head = nn.Linear(head.in_features, size, bias=head.bias is not None, device=head.weight.device,
                         dtype=head.weight.dtype)
    new_head.weight.copy_(_grow_rows(head.weight, size))
    if head.bias is not None:
        new_head.bias.copy_(torch.cat([head.bias, head.bias.new_zeros(size - old)]))
    new_head.weight.requires_grad_(head.weight.requires_grad)
    model.set_output_embeddings(new_head)
    model.config.text_config.vocab_size = size
    if hasattr(model.config, "vocab_size"):
        model.config.vocab_size = size
    policy.text_vocab_size = size


def add_text_tokens(policy, tokens, *, special: bool = False) -> list[int]:
    """Add ``tokens`` (strings) to the policy's tokenizer as added tokens (``special=False``: kept by
    ``skip_special_tokens`` decoding, as GoT-R1 adds them) and resize the text embedding / head when
    an id falls outside them. Tokens already present keep their ids. Returns the ids, in order."""
    tokens = list(tokens)
    if not tokens or not all(isinstance(t, str) and t.strip() for t in tokens):
        raise ValueError(f"add_text_tokens: tokens must be non-empty strings, got {tokens!r}")
    tok = policy.tokenizer
    if tok is None:
        raise ValueError("add_text_tokens: the policy has no tokenizer")
    tok.add_tokens(tokens, special_tokens=special)
    ids = tok.convert_tokens_to_ids(tokens)
    for t, i in zip(tokens, ids):
        if i is None or (tok.unk_token_id is not None and i == tok.unk_token_id):
            raise ValueError(f"add_text_tokens: the tokenizer did not take {t!r}")
        if tok.encode(t, add_special_tokens=False) != [i]:
            raise ValueError(f"add_text_tokens: {t!r} does not encode to its one id {i}")
    if max(ids) >= policy.text_vocab_size:
        resize_text_vocab(policy, max(max(ids) + 1, len(tok)))
    return list(ids)



def _one_token(policy, text: str, key: str) -> int:
    tok = policy.tokenizer
    ids = tok.encode(text, add_special_tokens=False) if tok is not None else []
    if len(ids) != 1 or (tok.unk_token_id is not None and ids[0] == tok.unk_token_id):
        raise ValueError(f"{key}: {text!r} is not one token of the tokenizer ({ids})")
    return ids[0]


def apply_model_tokens(policy, add_tokens=(), cot_end_token: str | None = None, cot_stop_tokens=()):
    """A ModelConfig's token settings on a built policy: ``add_tokens`` (``add_text_tokens``);
    ``cot_end_token``, the token whose sampling ends the CoT in place of EOS (the rollout stops on it,
    the training targets end with it; GoT-R1 ends its plan with ``<begin_of_image>``); and
    ``cot_stop_tokens``, other tokens whose sampling also ends the CoT and which are then recorded (and
    trained) as the end token -- "eos" names the model's own EOS (ReasonGen-R1 stops on EOS or BOI and
    replaces EOS by BOI). Returns the policy."""
    if add_tokens:
        add_text_tokens(policy, add_tokens)
    model_eos = policy.eos_token_id
    stops = [model_eos if t == "eos" else _one_token(policy, t, "model.cot_stop_tokens") for t in cot_stop_tokens]
    if cot_end_token is not None:
        policy.eos_token_id = _one_token(policy, cot_end_token, "model.cot_end_token")
    policy.cot_stop_ids = tuple(dict.fromkeys(i for i in stops if i != policy.eos_token_id))
    return policy


__all__ = ["add_text_tokens", "apply_model_tokens", "resize_text_vocab"]
