"""Model families behind one interface; adding an architecture is adding one file here."""

from pathlib import Path

from lightning_merge.backbones.base import EXPORT_MANIFEST, FAMILIES, Backbone, read_manifest
from lightning_merge.backbones.hf_mlm import HFMaskedLM
from lightning_merge.backbones.hf_text import HFTextClassifier, resolve_model_location
from lightning_merge.backbones.timm_vit import TimmViT


def load_backbone(directory: str | Path, family: str | None = None) -> Backbone:
    """Rebuild a backbone from a directory exported by :meth:`Backbone.export`, or from a plain Hugging
    Face folder or hub id (``family`` says which kind when there is no manifest; default ``hf_text``)."""
    if family is None:
        family = read_manifest(directory).get("family", "hf_text") if Path(directory).is_dir() else "hf_text"
    if family not in FAMILIES:
        raise ValueError(f"{directory}: unknown backbone family {family!r}; known: {sorted(FAMILIES)} (a family "
                         f"registers itself when its module is imported)")
    return FAMILIES[family].from_export(str(directory))


__all__ = ["EXPORT_MANIFEST", "FAMILIES", "Backbone", "HFMaskedLM", "HFTextClassifier", "TimmViT", "load_backbone",
           "read_manifest", "resolve_model_location"]
