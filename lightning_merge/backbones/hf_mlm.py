"""Hugging Face masked-LM checkpoints (``AutoModelForMaskedLM``): domain-adapted models whose Fisher
(sampled tokens at masked positions) lets them be Fisher-merged with classifiers (NeurIPS paper §3.4).

The "label" of an example is the token at each of its masked positions; ``forward`` returns logits
only at those positions, ``(B, M, V)`` with ``M`` the most masked positions of any example in the
batch (unused slots are padding, marked by ``labels == -100``), so the vocabulary projection is not
computed where no gradient is wanted.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForMaskedLM

from lightning_merge.backbones.hf_text import HFBackbone, from_pretrained, text_inputs
from lightning_merge.data.batch import MASKED_POSITIONS


class HFMaskedLM(HFBackbone):
    """A masked language model from the hub, a local ``save_pretrained`` folder or ``pkg:``.

    The task head is the LM head (everything outside the encoder); its decoder is usually tied to the
    word embeddings, which the Fisher engine handles (per-example gradients summed before squaring).
    """

    family = "hf_mlm"
    several_outputs = True

    def __init__(self, name_or_path: str, tokenizer: str | None = None) -> None:
        super().__init__()
        self.name_or_path = name_or_path
        self.model = from_pretrained(AutoModelForMaskedLM, name_or_path)
        self._attach_tokenizer_and_head(tokenizer)
        heads = [m for n, m in self.model.named_children() if n != self.model.base_model_prefix]
        if len(heads) != 1:
            raise NotImplementedError(f"{type(self.model).__name__}: expected one LM head beside the encoder")
        self.lm_head = heads[0]

    @property
    def num_labels(self) -> int:
        return self.model.get_output_embeddings().out_features

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.model.base_model(**text_inputs(batch))[0]  # (B, T, H)
        positions = batch[MASKED_POSITIONS]
        gathered = hidden.gather(1, positions.clamp(min=0).unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
        return self.lm_head(gathered)  # (B, M, V)

