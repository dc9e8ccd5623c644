"""timm Vision Transformers, by name (hub weights with ``pretrained``) or from a local checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models._hub import save_config_for_hf
from torch import nn

from lightning_merge.backbones.base import Backbone, read_manifest
from lightning_merge.backbones.mask_sites import FFN, HEADS, AddedParameter, MaskSite

WEIGHTS_FILE = "model.safetensors"
TIMM_CONFIG = "config.json"
_PREPROCESSING = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode", "label_names")


def _exported_pretrained_cfg(checkpoint: Path) -> dict[str, Any]:
    """The preprocessing and class names an export recorded in timm's ``config.json`` (none for others)."""
    config = checkpoint / TIMM_CONFIG if checkpoint.is_dir() else None
    if config is None or not config.is_file():
        return {}
    saved = json.loads(config.read_text())
    cfg = dict(saved.get("pretrained_cfg", {}))
    if "label_names" in saved:  # timm keeps the class names at the top level
        cfg["label_names"] = saved["label_names"]
    return {k: tuple(v) if isinstance(v, list) and k != "label_names" else v
            for k, v in cfg.items() if k in _PREPROCESSING}


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"ViT checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def vit_added_parameters(model: nn.Module) -> list[AddedParameter]:
    """timm's ``x = cat(cls_token, patches) + pos_embed`` precedes ``pos_drop``: ``pos_embed`` is added at
    every position of its output, ``cls_token`` is its first token."""
    if getattr(model, "no_embed_class", False) or getattr(model, "num_reg_tokens", 0):
        raise NotImplementedError(f"{type(model).__name__} without a class-token position embedding")
    added = [AddedParameter("pos_drop", "pos_embed")] if getattr(model, "pos_embed", None) is not None else []
    if getattr(model, "cls_token", None) is not None:
        added.append(AddedParameter("pos_drop", "cls_token", tokens=1))
    return added


class TimmViT(Backbone):
    """A ``timm`` ViT classifier.

    Args:
        model_name: timm architecture, e.g. ``vit_base_patch16_224``. With ``checkpoint`` pointing at
            an export of this project it may be left out (the export names it).
        num_classes: head size (``None``: the checkpoint's, or timm's default).
        pretrained: load timm's hub weights (needs the hub; tests build models from scratch).
        img_size / patch_size / in_chans: for small images, e.g. 8x8 digits with 2x2 patches.
        model_kwargs: any other ``timm.create_model`` argument (``embed_dim``, ``depth``, ...).
        checkpoint: an export directory of this project, or a state-dict file (.safetensors / .pt).
    """

    family = "timm_vit"

    def __init__(self, model_name: str | None = None, num_classes: int | None = None, pretrained: bool = False,
                 img_size: int | None = None, patch_size: int | None = None, in_chans: int | None = None,
                 model_kwargs: dict[str, Any] | None = None, checkpoint: str | None = None,
                 reinit_head: bool = False) -> None:
        super().__init__()
        args: dict[str, Any] = {}
        state = None
        overlay: dict[str, Any] = {}
        if checkpoint is not None:
            manifest = read_manifest(checkpoint)
            args.update(manifest.get("model_args", {}))
            model_name = model_name or manifest.get("model_name")
            state = _load_state_dict(Path(checkpoint))
            overlay = _exported_pretrained_cfg(Path(checkpoint))
        if model_name is None:
            raise ValueError("TimmViT needs model_name (or a checkpoint exported by lightning_merge)")
        args.update(model_kwargs or {})
        for key, value in (("img_size", img_size), ("patch_size", patch_size), ("in_chans", in_chans)):
            if value is not None:
                args[key] = value
        checkpoint_classes = args.get("num_classes")
        if num_classes is not None:
            args["num_classes"] = num_classes
        size, patch = args.get("img_size"), args.get("patch_size")
        if size is not None and patch is not None and size % patch != 0:
            raise ValueError(f"TimmViT: img_size={size} is not divisible by patch_size={patch}")
        self.model_name, self.model_args, self.checkpoint = model_name, args, checkpoint
        self.model = timm.create_model(model_name, pretrained=pretrained and state is None,
                                       **({"pretrained_cfg_overlay": overlay} if overlay else {}), **args)
        if overlay.get("label_names"):
            self.label_names = list(overlay["label_names"])
        self.head_prefixes = (self.model.default_cfg.get("classifier", "head") + ".",)
        if state is not None:
            self._load_checkpoint(state, checkpoint, checkpoint_classes, reinit_head)

    def _load_checkpoint(self, state, checkpoint, checkpoint_classes, reinit_head) -> None:
        head = [k for k in state if self.is_head(k)]
        own = self.model.state_dict()
        mismatched = [k for k in head if k in own and own[k].shape != state[k].shape]
        if mismatched and not reinit_head:
            raise ValueError(
                f"{checkpoint}: the checkpoint's head ({checkpoint_classes or state[mismatched[0]].shape[0]} "
                f"classes) differs from num_classes={self.num_labels}; set reinit_head: true to train a new head"
            )
        if mismatched:
            state = {k: v for k, v in state.items() if k not in mismatched}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in mismatched]
        if missing or unexpected:
            raise ValueError(f"{checkpoint} does not match {self.model_name}: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")

    @classmethod
    def from_export(cls, directory: str, **options) -> TimmViT:
        return cls(checkpoint=str(directory), **options)

    @property
    def num_labels(self) -> int:
        return self.model.num_classes

    def added_parameters(self) -> list[AddedParameter]:
        return vit_added_parameters(self.model)

    @property
    def img_size(self) -> int:
        return self.model.patch_embed.img_size[0]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(batch["pixel_values"])

    def mask_sites(self) -> list[MaskSite]:
        """Heads on the input of ``attn.proj`` (the per-head context, fused attention or not), FFN units
        on the input of ``mlp.fc2``. Q, K, V are the three row blocks of the fused ``attn.qkv``."""
        sites = []
        for i, block in enumerate(self.model.blocks):
            base, attn = f"blocks.{i}", block.attn
            if not hasattr(attn, "qkv"):
                raise NotImplementedError(f"{base}.attn has no fused qkv layer")
            dim = attn.num_heads * attn.head_dim
            sites.append(MaskSite(f"{HEADS}:{base}.attn", HEADS, attn.num_heads, attn.proj, pre=True,
                                  head_dim=attn.head_dim, qk=[(f"{base}.attn.qkv", 0), (f"{base}.attn.qkv", dim)],
                                  v=(f"{base}.attn.qkv", 2 * dim), out=f"{base}.attn.proj"))
            sites.append(MaskSite(f"{FFN}:{base}.mlp", FFN, block.mlp.fc1.out_features, block.mlp.fc2, pre=True,
                                  gated=f"{base}.mlp.fc1", out=f"{base}.mlp.fc2"))
        return sites

    def _export_files(self, directory: Path) -> dict:
        state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        save_file(state, directory / WEIGHTS_FILE, metadata={"format": "pt"})
        model_args = {**self.model_args, "num_classes": self.num_labels}
        # timm's own config.json (architecture, args, pretrained_cfg with the preprocessing): the folder
        # loads with `timm.create_model("local-dir:<folder>")`, and `timm.data.resolve_data_config`
        # gives the input size, mean/std and interpolation the model was trained with.
        save_config_for_hf(self.model, str(directory / TIMM_CONFIG), model_args=model_args,
                           data_config=self.preprocessing,
                           model_config={"label_names": self.label_names} if self.label_names else None)
        return {"model_name": self.model_name, "model_args": model_args}
