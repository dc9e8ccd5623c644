"""GPT-2 sequence classifiers (``GPT2ForSequenceClassification``): the GLUE setup of FusionBench's GPT-2
benchmark, read with the same ``from_pretrained`` paths as every Hugging Face family.

What differs from an encoder: the logits are the score layer at each example's *last real token*
(Hugging Face finds it as the last position that is not the pad token, so padding must be on the right
and a pad token must exist: GPT-2 ships none, the end-of-text token stands in); and GPT-2's linear
layers are ``transformers``' ``Conv1D``, ``y = x W + b`` with ``W`` stored ``(in, out)``, the transpose of
``nn.Linear``'s, which this family declares so the Fisher and Gram engines read them in that layout.
"""

from __future__ import annotations

from transformers.pytorch_utils import Conv1D

from lightning_merge.backbones.hf_text import HFTextClassifier
from lightning_merge.backbones.mask_sites import FFN, HEADS, MaskSite


class HFGPT2Classifier(HFTextClassifier):
    """A GPT-2 classifier from the hub (``gpt2``, FusionBench's fine-tuned GLUE checkpoints) or a local
    ``save_pretrained`` folder; arguments as :class:`HFTextClassifier`. The task head is ``score``."""

    family = "hf_gpt2"
    hf_model_types = ("gpt2",)
    transposed_linear = (Conv1D,)

    def __init__(self, name_or_path: str, num_labels: int | None = None, tokenizer: str | None = None,
                 reinit_head: bool = False) -> None:
        super().__init__(name_or_path, num_labels, tokenizer, reinit_head)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"  # the last real token is found as the last non-pad one
        self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def resize_head(self, num_labels: int) -> None:
        super().resize_head(num_labels)
        self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def mask_sites(self) -> list[MaskSite]:
        """Heads on the input of ``attn.c_proj`` (the merged heads), MLP units on the input of
        ``mlp.c_proj`` (after the activation); query/key/value are column blocks of the fused ``c_attn``."""
        config = self.model.config
        hidden, heads = config.n_embd, config.n_head
        inner = config.n_inner or 4 * hidden
        sites = []
        for i, block in enumerate(self.model.transformer.h):
            base = f"transformer.h.{i}"
            sites.append(MaskSite(f"{HEADS}:{base}.attn", HEADS, heads, block.attn.c_proj, pre=True,
                                  head_dim=hidden // heads,
                                  qk=[(f"{base}.attn.c_attn", 0), (f"{base}.attn.c_attn", hidden)],
                                  v=(f"{base}.attn.c_attn", 2 * hidden), out=f"{base}.attn.c_proj", columns=True))
            sites.append(MaskSite(f"{FFN}:{base}.mlp", FFN, inner, block.mlp.c_proj, pre=True,
                                  gated=f"{base}.mlp.c_fc", out=f"{base}.mlp.c_proj", columns=True))
        return sites
