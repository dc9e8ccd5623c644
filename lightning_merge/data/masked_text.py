"""Plain text for the Fisher of masked-LM checkpoints: each example has ~15% of its tokens masked
(seeded per example, so every run and every rank masks the same positions); the labels are the
original tokens there. Used with :class:`lightning_merge.backbones.HFMaskedLM` (NeurIPS paper §3.4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader

from lightning_merge.data.batch import EXAMPLE_INDEX, IGNORE, LABELS, MASKED_POSITIONS
from lightning_merge.data.glue import check_text_file, subsample

TEXT_SUFFIXES = {".txt": "text", ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json"}


class MaskedTextDataModule(pl.LightningDataModule):
    """Text examples with masked tokens, for ``trainer.predict`` (Fisher estimation).

    Args:
        source: a local ``.txt`` (one example a line), ``.csv``/``.tsv``/``.json(l)`` file, or a hub
            dataset name (with ``config`` and ``split``).
        text_column: the column holding the text (``text`` for ``.txt`` files).
        mask_probability: share of each example's (non-special) tokens to mask, at least one.
        max_predict_examples: examples to use (seeded subsample; paper §3.1.1 uses 4096).
    """

    def __init__(self, source: str, text_column: str = "text", config: str | None = None, split: str = "train",
                 tokenizer: str | None = None, max_length: int = 128, mask_probability: float = 0.15,
                 max_predict_examples: int | None = 4096, batch_size: int = 16, seed: int = 0,
                 num_workers: int = 0) -> None:
        super().__init__()
        if not 0 < mask_probability < 1:
            raise ValueError(f"mask_probability must be in (0, 1), got {mask_probability}")
        self.save_hyperparameters()
        self.tokenizer = None
        self.raw: datasets.Dataset | None = None
        self._dataset: datasets.Dataset | None = None

    @property
    def num_labels(self) -> None:
        return None  # the model's vocabulary

    def attach_model(self, backbone) -> None:
        if self.tokenizer is None and self.hparams.tokenizer is None:
            self.tokenizer = getattr(backbone, "tokenizer", None)

    def _load(self) -> datasets.Dataset:
        hp = self.hparams
        path = Path(hp.source)
        if path.is_file():
            kind = TEXT_SUFFIXES.get(path.suffix)
            if kind is None:
                raise ValueError(f"{path}: unsupported text file type; use one of {sorted(TEXT_SUFFIXES)}")
            kwargs = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
            check_text_file(path)
            ds = datasets.load_dataset(kind, data_files=str(path), split="train", **kwargs)
        else:
            ds = datasets.load_dataset(hp.source, hp.config, split=hp.split)
        if hp.text_column not in ds.column_names:
            raise ValueError(f"{hp.source} has no column {hp.text_column!r}; it has {ds.column_names}")
        ds = ds.filter(lambda row: bool(row[hp.text_column] and row[hp.text_column].strip()))
        if len(ds) == 0:
            raise ValueError(f"{hp.source} holds no text")
        return ds

    def _resolve_tokenizer(self):
        if self.tokenizer is None and self.hparams.tokenizer is not None:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.hparams.tokenizer)
        if self.tokenizer is None or self.tokenizer.mask_token_id is None:
            raise ValueError("MaskedTextDataModule needs a tokenizer with a mask token (`tokenizer`, or a model's "
                             "attached with attach_model(backbone))")
        return self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.raw is not None:
            return
        hp = self.hparams
        raw = self._load()
        if hp.max_predict_examples is not None and hp.max_predict_examples > len(raw):
            rank_zero_warn(f"Asked for {hp.max_predict_examples} examples but {hp.source} has {len(raw)}: using all")
        self.raw = subsample(raw, hp.max_predict_examples, hp.seed)

    @property
    def dataset(self) -> datasets.Dataset:
        """Tokenized and masked at first use: the model (and so its tokenizer) is attached after setup."""
        if self._dataset is None:
            hp, raw, tokenizer = self.hparams, self.raw, self._resolve_tokenizer()
            encoded = raw.map(lambda b: tokenizer(b[hp.text_column], truncation=True, max_length=hp.max_length),
                              batched=True, remove_columns=raw.column_names)
            self._dataset = encoded.map(self._mask, with_indices=True)
        return self._dataset

    def _mask(self, example: dict[str, Any], index: int) -> dict[str, Any]:
        ids = list(example["input_ids"])
        special = set(self.tokenizer.all_special_ids)
        candidates = [t for t, token in enumerate(ids) if token not in special]
        if not candidates:
            candidates = list(range(len(ids)))
        generator = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + index)
        count = max(1, round(self.hparams.mask_probability * len(candidates)))
        chosen = sorted(candidates[i] for i in torch.randperm(len(candidates), generator=generator)[:count].tolist())
        labels = [ids[t] for t in chosen]
        for t in chosen:
            ids[t] = self.tokenizer.mask_token_id
        return {"input_ids": ids, MASKED_POSITIONS: chosen, LABELS: labels, EXAMPLE_INDEX: index}

    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f[MASKED_POSITIONS]) for f in features)
        extra = (MASKED_POSITIONS, LABELS, EXAMPLE_INDEX)
        batch = dict(self.tokenizer.pad([{k: v for k, v in f.items() if k not in extra} for f in features],
                                        return_tensors="pt"))
        pad = lambda values, fill: values + [fill] * (width - len(values))  # noqa: E731
        batch[MASKED_POSITIONS] = torch.tensor([pad(f[MASKED_POSITIONS], -1) for f in features])
        batch[LABELS] = torch.tensor([pad(f[LABELS], IGNORE) for f in features])
        batch[EXAMPLE_INDEX] = torch.tensor([f[EXAMPLE_INDEX] for f in features])
        return batch

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.hparams.batch_size, collate_fn=self.collate,
                          num_workers=self.hparams.num_workers)
