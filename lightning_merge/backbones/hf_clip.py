"""CLIP vision classifiers: Hugging Face's CLIP image tower with its projection, and a head on the
normalized image embedding, the setup of task-arithmetic papers and FusionBench's CLIP benchmarks.

The head is ``logit_scale · normalize(image_embeds) @ Wᵀ``. ``zero_shot`` builds ``W`` from the CLIP
text tower: each class name is put in every prompt template, the normalized text embeddings are
averaged and normalized again (CLIP's zero-shot classifier); it stays frozen, so fine-tuning and
merging change the image tower alone. ``linear`` is a trainable ``W`` (random start), for towers
without a text side (the offline tiny variant).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from lightning_merge.backbones.base import Backbone, read_manifest
from lightning_merge.backbones.hf_text import from_pretrained, resolve_model_location
from lightning_merge.backbones.mask_sites import FFN, HEADS, AddedParameter, MaskSite

HEAD_FILE = "head.safetensors"
DEFAULT_TEMPLATES = ("a photo of a {}.",)
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
LOGIT_SCALE = 100.0  # exp(logit_scale) of the OpenAI CLIPs (trained to its clamp): the zero-shot temperature


class CLIPClassifierModel(nn.Module):
    """``vision`` (CLIP's image tower + ``visual_projection``) and ``head`` (``num_labels × projection``)."""

    def __init__(self, vision: CLIPVisionModelWithProjection, num_labels: int, logit_scale: float) -> None:
        super().__init__()
        self.vision = vision
        self.head = nn.Linear(vision.config.projection_dim, num_labels, bias=False)
        self.logit_scale = logit_scale

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        embeds = self.vision(pixel_values=pixel_values).image_embeds
        return self.logit_scale * self.head(embeds / embeds.norm(dim=-1, keepdim=True))


def zero_shot_weights(clip: str, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """CLIP's zero-shot classifier: per class, the mean over templates of the normalized text embeddings
    of ``template.format(name)``, normalized."""
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    tokenizer = from_pretrained(AutoTokenizer, clip)
    text = from_pretrained(CLIPTextModelWithProjection, clip).eval()
    rows = []
    with torch.no_grad():
        for name in class_names:
            tokens = tokenizer([t.format(name) for t in templates], padding=True, return_tensors="pt")
            embeds = text(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).text_embeds
            mean = (embeds / embeds.norm(dim=-1, keepdim=True)).mean(0)
            rows.append(mean / mean.norm())
    return torch.stack(rows)


class HFCLIPClassifier(Backbone):
    """A CLIP image classifier.

    Args:
        name_or_path: the image tower: a CLIP checkpoint (hub id such as ``openai/clip-vit-base-patch32``,
            or a folder), a fine-tuned tower (FusionBench's ``tanganke/clip-vit-base-patch32_<task>``), or
            ``None`` with ``config`` (a random tower from a ``CLIPVisionConfig``: the offline tiny variant).
        clip: the pre-trained CLIP whose text tower builds the zero-shot head and whose projection a
            tower saved without one gets (default: ``name_or_path``).
        head: ``zero_shot`` (frozen, from ``class_names`` × ``templates``) or ``linear`` (trained);
            default: an export's own, else ``zero_shot``.
        class_names: the classes, in label order; for ``zero_shot`` they may instead come from the data
            (its ``label_names``, when the stage starts).
        num_labels: the head size of a ``linear`` head.
        templates: prompt templates with one ``{}`` for the class name.
    """

    family = "hf_clip"
    hf_model_types = ("clip", "clip_vision_model")

    def __init__(self, name_or_path: str | None = None, clip: str | None = None,
                 head: Literal["zero_shot", "linear"] | None = None, class_names: list[str] | None = None,
                 num_labels: int | None = None, templates: Sequence[str] | None = None,
                 config: dict | None = None) -> None:
        super().__init__()
        saved = read_manifest(name_or_path) if name_or_path is not None and Path(name_or_path).is_dir() else {}
        head = head or saved.get("head", "zero_shot")  # an export keeps its head kind, CLIP and templates
        clip = clip or saved.get("clip")
        templates = templates or saved.get("templates", DEFAULT_TEMPLATES)
        if head not in ("zero_shot", "linear"):
            raise ValueError(f"HFCLIPClassifier(head={head!r}): choose 'zero_shot' or 'linear'")
        if name_or_path is None and config is None:
            raise ValueError("HFCLIPClassifier needs name_or_path (a CLIP checkpoint) or config (a random tower)")
        self.name_or_path, self.clip, self.kind = name_or_path, clip or name_or_path, head
        self.templates = list(templates)
        vision = self._load_vision(name_or_path, config)
        exported = Path(name_or_path) / HEAD_FILE if name_or_path is not None else None
        exported = exported if exported is not None and exported.is_file() else None  # an export's own head
        size = len(class_names) if class_names else num_labels
        if head == "linear" and size is None and exported is None:
            raise ValueError("HFCLIPClassifier(head='linear') needs num_labels (or class_names)")
        self.model = CLIPClassifierModel(vision, size or 1, LOGIT_SCALE if head == "zero_shot" else 1.0)
        self.head_prefixes = ("head.",)
        self.built = head == "linear"
        if class_names:
            self.label_names = list(class_names)
            if head == "zero_shot":
                self._build_zero_shot(class_names)
        if exported is not None:
            self._load_head(exported)
            self.label_names = saved.get("label_names", self.label_names)
        processor = Path(resolve_model_location(self.clip)) / "preprocessor_config.json" if self.clip else None
        settings = json.loads(processor.read_text()) if processor is not None and processor.is_file() else {}
        self.image_normalization = (tuple(settings.get("image_mean", OPENAI_MEAN)),
                                    tuple(settings.get("image_std", OPENAI_STD)))

    def _load_vision(self, name_or_path: str | None, config: dict | None) -> CLIPVisionModelWithProjection:
        if name_or_path is None:
            return CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
        vision, loading = from_pretrained(CLIPVisionModelWithProjection, name_or_path, output_loading_info=True)
        if "visual_projection.weight" in loading.get("missing_keys", ()):  # a tower saved without projection
            if self.clip == name_or_path:
                raise ValueError(f"{name_or_path} has no visual projection: give `clip`, the pre-trained CLIP "
                                 f"it was fine-tuned from")
            source = from_pretrained(CLIPVisionModelWithProjection, self.clip)
            vision.visual_projection.load_state_dict(source.visual_projection.state_dict())
        return vision

    def _build_zero_shot(self, class_names: Sequence[str]) -> None:
        weights = zero_shot_weights(self.clip, class_names, self.templates)
        self.model.head = nn.Linear(weights.shape[1], len(class_names), bias=False)
        self.model.head.weight.data.copy_(weights)
        self.model.head.requires_grad_(False)  # frozen: fine-tuning and merging move the image tower only
        self.model.logit_scale = LOGIT_SCALE
        self.built = True

    def _load_head(self, path: Path) -> None:
        saved = load_file(path)
        self.model.head = nn.Linear(saved["weight"].shape[1], saved["weight"].shape[0], bias=False)
        self.model.head.weight.data.copy_(saved["weight"])
        self.model.head.requires_grad_(self.kind == "linear")
        self.model.logit_scale = float(saved["logit_scale"])
        self.built = True

    def describe_task(self, label_names: list[str] | None, preprocessing: dict | None = None) -> None:
        """A zero-shot head not yet built is built from the data's class names."""
        if not self.built and label_names:
            self._build_zero_shot(label_names)
        super().describe_task(label_names, preprocessing)

    @property
    def num_labels(self) -> int:
        return self.model.head.out_features

    @property
    def img_size(self) -> int:
        return self.model.vision.config.image_size

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not self.built:
            raise RuntimeError("HFCLIPClassifier: the zero-shot head has no classes yet: give class_names, or "
                               "data whose label_names name them")
        return self.model(batch["pixel_values"])

    def added_parameters(self) -> list[AddedParameter]:
        """``cat(class_embedding, patches) + position_embedding``: the class embedding is the first token of
        the embeddings' output."""
        return [AddedParameter("vision.vision_model.embeddings", "vision.vision_model.embeddings.class_embedding",
                               tokens=1)]

    def mask_sites(self) -> list[MaskSite]:
        """Heads on the input of ``self_attn.out_proj``, MLP units on the input of ``mlp.fc2``."""
        config = self.model.vision.config
        heads, sites = config.num_attention_heads, []
        for i, layer in enumerate(self.model.vision.vision_model.encoder.layers):
            base = f"vision.vision_model.encoder.layers.{i}"
            sites.append(MaskSite(f"{HEADS}:{base}.self_attn", HEADS, heads, layer.self_attn.out_proj, pre=True,
                                  head_dim=config.hidden_size // heads,
                                  qk=[(f"{base}.self_attn.q_proj", 0), (f"{base}.self_attn.k_proj", 0)],
                                  v=(f"{base}.self_attn.v_proj", 0), out=f"{base}.self_attn.out_proj"))
            sites.append(MaskSite(f"{FFN}:{base}.mlp", FFN, config.intermediate_size, layer.mlp.fc2, pre=True,
                                  gated=f"{base}.mlp.fc1", out=f"{base}.mlp.fc2"))
        return sites

    def _export_files(self, directory: Path) -> dict:
        self.model.vision.save_pretrained(directory, safe_serialization=True)
        save_file({"weight": self.model.head.weight.detach().contiguous().cpu(),
                   "logit_scale": torch.tensor(self.model.logit_scale)}, str(directory / HEAD_FILE))
        clip = self.clip if self.clip is None or not Path(self.clip).exists() else str(Path(self.clip).resolve())
        return {"clip": clip, "head": self.kind, "templates": self.templates}
