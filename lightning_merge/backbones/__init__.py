"""Model families behind one interface; adding an architecture is adding one file here."""

from pathlib import Path

from lightning_merge.backbones.base import EXPORT_MANIFEST, Backbone, read_manifest
from lightning_merge.backbones.hf_text import HFTextClassifier, resolve_model_location
from lightning_merge.backbones.timm_vit import TimmViT


def load_backbone(directory: str | Path) -> Backbone:
    """Rebuild a backbone from a directory exported by :meth:`Backbone.export` (or a plain HF one)."""
    family = read_manifest(directory).get("family", "hf_text")
    if family == "timm_vit":
        return TimmViT(checkpoint=str(directory))
    if family == "hf_text":
        return HFTextClassifier(str(directory))
    raise ValueError(f"{directory}: unknown backbone family {family!r}")


__all__ = ["EXPORT_MANIFEST", "Backbone", "HFTextClassifier", "TimmViT", "load_backbone",
           "read_manifest", "resolve_model_location"]
