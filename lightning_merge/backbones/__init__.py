"""Model families behind one interface; adding an architecture is adding one file here."""

from pathlib import Path

from lightning_merge.backbones.base import EXPORT_MANIFEST, FAMILIES, Backbone, read_manifest
from lightning_merge.backbones.hf_clip import HFCLIPClassifier
from lightning_merge.backbones.hf_gpt2 import HFGPT2Classifier
from lightning_merge.backbones.hf_mlm import HFMaskedLM
from lightning_merge.backbones.hf_text import HFTextClassifier, resolve_model_location
from lightning_merge.backbones.timm_vit import TimmViT


def _family_of_hf_checkpoint(location: str) -> str:
    """The family whose ``hf_model_types`` holds a plain Hugging Face checkpoint's ``model_type`` (GPT-2's
    ``gpt2``), else ``hf_text``; a folder with no Hugging Face config is left to ``hf_text`` to report."""
    try:
        from transformers import AutoConfig

        model_type = AutoConfig.from_pretrained(resolve_model_location(location)).model_type
    except (OSError, ValueError):
        return "hf_text"
    return next((name for name, cls in FAMILIES.items() if model_type in cls.hf_model_types), "hf_text")


def load_backbone(directory: str | Path, family: str | None = None, **options) -> Backbone:
    """Rebuild a backbone from a directory exported by :meth:`Backbone.export`, or from a plain Hugging
    Face folder or hub id (``family`` says which kind when there is no manifest; default: the family that
    claims the checkpoint's ``model_type``, else ``hf_text``). ``options``: further constructor arguments
    of the family (a spec's ``backbone_args``, e.g. the pre-trained ``clip`` of a CLIP image tower)."""
    if family is None:
        family = read_manifest(directory).get("family") if Path(directory).is_dir() else None
        family = family or _family_of_hf_checkpoint(str(directory))
    if family not in FAMILIES:
        raise ValueError(f"{directory}: unknown backbone family {family!r}; known: {sorted(FAMILIES)} (a family "
                         f"registers itself when its module is imported)")
    return FAMILIES[family].from_export(str(directory), **options)


__all__ = ["EXPORT_MANIFEST", "FAMILIES", "Backbone", "HFCLIPClassifier", "HFGPT2Classifier", "HFMaskedLM",
           "HFTextClassifier", "TimmViT", "load_backbone", "read_manifest", "resolve_model_location"]
