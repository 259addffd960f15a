"""Policy: what the rollout engine, the trainer and the evaluator use of a policy.

``JanusPolicy`` is the implementation (tests/test_models.py checks that it satisfies this Protocol,
call signatures included). The list is the union of every ``policy.<member>`` read in
fastbicot/rollout, fastbicot/trainer, fastbicot/evaluate.py and fastbicot/vq.py; keep it that way:
a new use there adds a member here, a member nothing uses any more leaves.

Shapes: N rows, L positions, H = hidden_size, D = head_dim.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .janus import DecoderLayer


@runtime_checkable
class Policy(Protocol):
    # ---- tokens and shapes ------------------------------------------------------------------------
    tokenizer: Any  # a transformers tokenizer (encode / decode / convert_tokens_to_ids)
    bos_token_id: int
    eos_token_id: int  # the token that ends the CoT (model.cot_end_token; the model's EOS by default)
    cot_stop_ids: tuple  # other tokens whose sampling also ends the CoT, recorded as eos_token_id
    pad_token_id: int
    boi_token_id: int  # begin-of-image: the last context token before the image tokens
    num_image_tokens: int  # image tokens per image (the VQ latent grid, flattened)
    image_vocab_size: int  # the VQ codebook size
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    # ---- the model's pieces -----------------------------------------------------------------------
    hf_model: nn.Module  # the wrapped transformers model (checkpoints, LoRA and FSDP wrapping)

    @property
    def language_model(self) -> nn.Module:
        """The decoder trunk as one module (embed_tokens, layers, norm, rotary_emb)."""

    @property
    def lm_head(self) -> nn.Linear: ...

    @property
    def image_head_linear(self) -> nn.Linear:
        """The image head's final Linear (hidden -> image vocabulary)."""

    @property
    def vqmodel(self) -> nn.Module:
        """The VQ decoder of image tokens (decoded by fastbicot.vq.vq_decode)."""

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Text-token ids [...] -> trunk input [..., H]."""

    def embed_image(self, ids: torch.Tensor) -> torch.Tensor:
        """Image-token ids [...] -> trunk input [..., H]."""

    def trunk(self, inputs_embeds, *, position_ids=None, attention_mask=None, past_key_values=None,
              use_cache=False):
        """The decoder trunk: (last hidden states [N, L, H], cache or None)."""

    def text_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def image_head_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Trunk output -> input of ``image_head_linear``."""

    def image_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def unconditional_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The classifier-free-guidance row: every token but BOS and BOI replaced by the pad token."""

    def check_token_ids(self, ids, name: str = "ids", *, vocab: str = "text"):
        """Raise a ValueError naming ``name`` unless every id is inside the vocabulary; returns ``ids``."""

    # ---- the trunk by role (fastbicot's own decoder forward, rollout/trunk.py) --------------------
    @property
    def max_positions(self) -> int: ...

    @property
    def mlp_activation(self) -> str: ...

    @property
    def attention_scale(self) -> float: ...

    @property
    def rms_norm_eps(self) -> float: ...

    @property
    def final_norm(self) -> nn.Module: ...

    def decoder_layers(self) -> list[DecoderLayer]: ...

    def rope_tables(self, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [num_positions, D]."""

    # ---- nn.Module (train / eval mode, the parameters to optimise) --------------------------------
    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...

    def train(self, mode: bool = True): ...

    def eval(self): ...
