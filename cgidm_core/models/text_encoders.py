"""Two text encoders held as one module, for the families that condition on two (SDXL, Flux).

The SD adapter treats a model's text encoder as ONE module: it releases it after the prompt is
encoded, reads it back for a new prompt, switches its adapter with the denoiser's and counts its
bytes. Holding a two-encoder family's pair of encoders in one ``torch.nn.Module`` keeps all of
that unchanged; each family says only how it turns token ids into embeddings (:meth:`encode`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # annotations only; mypy reads transformers as Any (pyproject.toml)
    from transformers import PreTrainedTokenizerBase


def tokenize(tokenizer: PreTrainedTokenizerBase, prompt: str, max_length: int | None = None) -> Any:
    """``prompt`` padded and truncated to ``max_length`` tokens (the tokenizer's own length by
    default), as every diffusers text-to-image pipeline tokenizes: the encoders were trained on
    fixed-length inputs, so the padding is part of the conditioning."""
    return tokenizer(
        prompt,
        padding="max_length",
        max_length=tokenizer.model_max_length if max_length is None else max_length,
        truncation=True,
        return_tensors="pt",
    )


class TwoTextEncoders(torch.nn.Module):
    """``text_encoder`` and ``text_encoder_2`` as one module. A fine-tune that changed only one
    of them shares the other module with its base (the same object in both pairs' modules)."""

    def __init__(self, text_encoder: torch.nn.Module, text_encoder_2: torch.nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2

    @property
    def dtype(self) -> torch.dtype:
        """The first parameter's dtype, as diffusers' and transformers' models report theirs."""
        return next(self.parameters()).dtype

    def encode(self, ids: torch.Tensor, ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden states, pooled embedding)`` of one prompt's token ids, as the family's
        pipeline computes them."""
        raise NotImplementedError
