"""GLUE as a LightningDataModule: hub or local files (TSV as released, CSV, JSON) → tokenized batches."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Sampler

from lightning_merge.data.batch import EXAMPLE_INDEX
from lightning_merge.data.buckets import LengthGroupedSampler
from lightning_merge.data.glue_tasks import (
    GlueTask,
    get_glue_task,
    num_labels_for,
    stsb_bucket_centers,
    stsb_to_bucket,
)
from lightning_merge.evaluation.metrics import TaskMetrics

HUB_DATASET = "nyu-mll/glue"
_EVAL_ROLES = {"validate": "validation", "test": "test"}
TEXT_A, TEXT_B, LABEL = "text_a", "text_b", "label"


def check_text_file(path: Path) -> None:
    """Errors that name the file (and line) for what the ``datasets`` builders report only as
    "An error occurred while generating the dataset": an empty file, bytes that are not UTF-8."""
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty")
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{path}, line {number}: not UTF-8 text (byte {line[err.start]:#04x} at column "
                                 f"{err.start + 1}); re-save the file as UTF-8") from None


def _read_file(path: Path, task: GlueTask) -> datasets.Dataset:
    """Read one local file with the ``datasets`` builders; the format follows the suffix."""
    check_text_file(path)
    try:
        ds = _load_file(path, task)
    except ValueError as err:
        if "corresponds to no data" not in str(err):
            raise
        ds = None
    except datasets.exceptions.DatasetGenerationError as err:
        cause = err.__cause__ or err.__context__ or err
        raise ValueError(f"{path} cannot be read as a {path.suffix} table: {cause}") from err
    if ds is None or len(ds) == 0:
        raise ValueError(f"{path} has no examples (only a header, or nothing but blank lines)")
    return ds


def _load_file(path: Path, task: GlueTask) -> datasets.Dataset:
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".txt", ".csv"):
        options: dict[str, Any] = dict(
            sep="\t" if suffix in (".tsv", ".txt") else ",",
            # GLUE TSVs contain unbalanced quotes; "null"/"NA" are real words, not missing values.
            quoting=csv.QUOTE_NONE if suffix in (".tsv", ".txt") else csv.QUOTE_MINIMAL,
            keep_default_na=False, na_filter=False, encoding="utf-8-sig",
        )
        if not task.header and suffix in (".tsv", ".txt"):
            options.update(header=None, column_names=list(task.headerless_columns))
        return datasets.load_dataset("csv", data_files=str(path), split="train", **options)
    if suffix in (".json", ".jsonl"):
        return datasets.load_dataset("json", data_files=str(path), split="train")
    raise ValueError(f"Unsupported data file {path}: expected .tsv, .txt, .csv, .json or .jsonl")


def _pick_column(columns: list[str], candidates: tuple[str, ...], what: str, source: str) -> str:
    for name in candidates:
        if name in columns:
            return name
    raise ValueError(
        f"{source}: missing column for {what}; expected one of {list(candidates)}, found {columns}"
    )


def to_canonical(raw: datasets.Dataset, task: GlueTask, source: str, *, stsb_buckets: bool,
                 require_labels: bool = True) -> datasets.Dataset:
    """Rename a split's columns to ``text_a``/``text_b``/``label`` and turn labels into class ids.

    Labels given as names (``entailment``) are mapped through ``task.label_names``; STS-B scores
    become buckets when ``stsb_buckets`` (paper §3.1.1). Unlabeled splits (GLUE test) get ``-1``.
    """
    columns = list(raw.column_names)
    text_cols = [
        _pick_column(columns, aliases, f"text field {i + 1} of {task.name}", source)
        for i, aliases in enumerate(task.text_columns)
    ]
    label_col = next((c for c in task.label_columns if c in columns), None)
    if label_col is None and require_labels:
        _pick_column(columns, task.label_columns, f"the label of {task.name}", source)
    index = {name: i for i, name in enumerate(task.label_names or ())}

    def convert_label(value: Any, row: int) -> float | int:
        try:
            label = _convert_label(value)
        except ValueError as err:
            raise ValueError(f"{source}, example {row + 1}: {err}") from None
        if label == -1 and require_labels:
            raise ValueError(f"{source}, example {row + 1}: label -1 (unlabeled) in a split used for training or "
                             f"evaluation; {task.name}'s labels are {list(index) or 'scores'}")
        return label

    def _convert_label(value: Any) -> float | int:
        if task.is_regression:
            score = float(value)
            return int(stsb_to_bucket(score)) if stsb_buckets else score
        if isinstance(value, str):
            value = value.strip()
            if value in index:
                return index[value]
            if value.lstrip("-").isdigit():
                value = int(value)
            else:
                raise ValueError(f"label {value!r} is not one of {list(index)}")
        value = int(value)
        if not 0 <= value < len(index) and value != -1:
            raise ValueError(f"label {value} is out of range for {task.name} ({len(index)} classes)")
        return value

    def convert(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out = {TEXT_A: [str(t) for t in batch[text_cols[0]]]}
        if len(text_cols) > 1:
            out[TEXT_B] = [str(t) for t in batch[text_cols[1]]]
        n = len(out[TEXT_A])
        out[LABEL] = [convert_label(v, i) for v, i in zip(batch[label_col], indices)] if label_col else [-1] * n
        return out

    features = {TEXT_A: datasets.Value("string")}
    if len(text_cols) > 1:
        features[TEXT_B] = datasets.Value("string")
    regression = task.is_regression and not stsb_buckets
    features[LABEL] = datasets.Value("float32" if regression else "int64")
    return raw.map(convert, batched=True, with_indices=True, remove_columns=columns,
                   features=datasets.Features(features))


def subsample(ds: datasets.Dataset, max_examples: int | None, seed: int) -> datasets.Dataset:
    """The first ``max_examples`` of a seeded shuffle; all of them *in file order* when ``None`` (or
    more than there are), so "the first 2048 validation examples" (paper §3.1.1) means what it says."""
    if max_examples is not None and max_examples > len(ds):
        rank_zero_warn(f"Asked for {max_examples} examples but the split has {len(ds)}: using all {len(ds)}")
    if max_examples is None or max_examples >= len(ds):
        return ds
    return ds.shuffle(seed=seed).select(range(max_examples))


class TokenizedSplits(dict):
    """role -> tokenized split, tokenized at first use from ``raw`` (role -> canonical split)."""

    def __init__(self, tokenize) -> None:
        super().__init__()
        self.raw: dict[str, datasets.Dataset] = {}
        self.tokenize = tokenize

    def __missing__(self, role: str) -> datasets.Dataset:
        if role not in self.raw:
            raise KeyError(f"no {role} split: call setup() for its stage first")
        self[role] = tokenized = self.tokenize(self.raw[role])
        return tokenized

    def __contains__(self, role: object) -> bool:
        return dict.__contains__(self, role) or role in self.raw


class GlueDataModule(pl.LightningDataModule):
    """A GLUE task for fine-tuning, Fisher estimation and evaluation.

    Data comes from the hub (``nyu-mll/glue``) unless ``data_dir`` (a folder holding the task's
    released files, e.g. ``glue/RTE/train.tsv`` or ``RTE/train.tsv``) or explicit ``*_file`` paths
    are given. The tokenizer defaults to the one of the model being trained.

    Args:
        task: GLUE task name in any usual spelling (``RTE``, ``sst2``, ``STS-B``, ``mnli_mismatched``).
        stsb_buckets: STS-B as 25-way classification (paper §3.1.1) instead of regression.
        max_train_examples / max_eval_examples: subsample (seeded shuffle) each split.
        predict_split / max_predict_examples: what ``trainer.predict`` sees (Fisher estimation).
        sort_by_length: order predict/validation/test examples by length, so batches carry little
            padding (the subset is drawn first; sums and metrics do not depend on the order).
        bucket_window: training batches are grouped by length within random windows of this many
            batches (:class:`LengthGroupedSampler`; batch order shuffled, new groups every epoch), so a
            batch is padded only to lengths near its own; ``0`` draws plain shuffled batches.
    """

    def __init__(
        self,
        task: str,
        data_dir: str | None = None,
        train_file: str | None = None,
        validation_file: str | None = None,
        test_file: str | None = None,
        tokenizer: str | None = None,
        max_length: int = 128,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        max_train_examples: int | None = None,
        max_eval_examples: int | None = None,
        predict_split: str = "train",
        max_predict_examples: int | None = None,
        stsb_buckets: bool = True,
        sort_by_length: bool = True,
        bucket_window: int = 64,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.task = get_glue_task(task)
        self.files = {"train": train_file, "validation": validation_file, "test": test_file}
        self.data_dir = data_dir
        self.tokenizer_name = tokenizer
        self.tokenizer = None
        self.splits = TokenizedSplits(self._tokenize)

    # -- what downstream stages ask of the data --------------------------------------------------
    @property
    def num_labels(self) -> int:
        return num_labels_for(self.task, self.hparams.stsb_buckets)

    @property
    def label_names(self) -> list[str]:
        if self.task.is_regression:
            return [f"bucket_{i}" for i in range(self.num_labels)] if self.hparams.stsb_buckets else ["score"]
        return list(self.task.label_names)

    @property
    def eval_set_names(self) -> list[str]:
        return [self.task.name]

    def task_metrics(self) -> TaskMetrics:
        buckets = self.task.is_regression and self.hparams.stsb_buckets
        return TaskMetrics(self.task.metrics, self.num_labels, stsb_bucket_centers() if buckets else None)

    # -- loading ---------------------------------------------------------------------------------
    def _local_file(self, split: str) -> Path | None:
        if self.files.get(split):
            path = Path(self.files[split])
            if not path.is_file():
                raise FileNotFoundError(f"{split}_file {path} does not exist")
            return path
        if self.data_dir is None:
            return None
        root = Path(self.data_dir)
        for folder in (root / self.task.local_dir, root):
            for name in self.task.local_files.get(split, ()):
                if (folder / name).is_file():
                    return folder / name
        if split == "test":
            return None
        raise FileNotFoundError(
            f"No {split} file for {self.task.name} under {root}: looked for "
            f"{list(self.task.local_files.get(split, ()))} in {root / self.task.local_dir} and {root}"
        )

    def load_split(self, split: str) -> datasets.Dataset:
        """One split in canonical columns (``text_a``, ``text_b``, ``label``), not yet tokenized."""
        path = self._local_file(split)
        if path is not None:
            raw, source = _read_file(path, self.task), str(path)
        elif self.data_dir is None and not any(self.files.values()):
            if not self.task.hub_config:
                raise ValueError(f"{self.task.name} is read from local files only: set data_dir (a folder with "
                                 f"{self.task.local_dir}/{self.task.local_files[split][0]}) or {split}_file")
            raw = datasets.load_dataset(HUB_DATASET, self.task.hub_config, split=self.task.hub_splits[split])
            source = f"{HUB_DATASET}/{self.task.hub_config}:{split}"
        else:
            raise FileNotFoundError(f"No {split} split given for {self.task.name}")
        if len(raw) == 0:
            raise ValueError(f"{source} holds no examples")
        return to_canonical(raw, self.task, source, stsb_buckets=self.hparams.stsb_buckets,
                            require_labels=split != "test")

    def _resolve_tokenizer(self):
        if self.tokenizer is not None:
            return self.tokenizer
        if self.tokenizer_name is None:
            raise ValueError("GlueDataModule needs `tokenizer`, or a model attached with attach_model(backbone) "
                             "(the fine-tune, Fisher, Gram and merge stages attach theirs)")
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name)
        return self.tokenizer

    def _tokenize(self, ds: datasets.Dataset) -> datasets.Dataset:
        tokenizer = self._resolve_tokenizer()
        has_pair = TEXT_B in ds.column_names

        def encode(batch):
            pair = (batch[TEXT_A], batch[TEXT_B]) if has_pair else (batch[TEXT_A],)
            return tokenizer(*pair, truncation=True, max_length=self.hparams.max_length)

        encoded = ds.map(encode, batched=True, remove_columns=[c for c in ds.column_names if c != LABEL])
        return encoded.rename_column(LABEL, "labels")

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        roles = {  # role -> (split, how many)
            "train": ("train", hp.max_train_examples),
            "validation": ("validation", hp.max_eval_examples),
            "test": ("test", hp.max_eval_examples),
            "predict": (hp.predict_split, hp.max_predict_examples),
        }
        wanted = {"fit": ["train", "validation"], "validate": ["validation"], "test": ["test"],
                  "predict": ["predict"]}.get(stage or "fit", [])
        for role in wanted:
            if role in self.splits:
                continue
            split, limit = roles[role]
            # Stored in canonical order (the file's, or the seeded subsample's); loaders sort. Tokenized
            # at first use: the stage's model (and so its tokenizer) is attached after this setup.
            self.splits.raw[role] = subsample(self.load_split(split), limit, hp.seed)

    # -- loaders (one per role: train, validation, test, predict) ------------------------------
    def collate(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Dynamic padding: each batch is padded to its own longest sequence."""
        extra = [k for k in ("labels", EXAMPLE_INDEX) if k in features[0]]
        encoded = [{k: v for k, v in f.items() if k not in extra} for f in features]
        batch = dict(self.tokenizer.pad(encoded, return_tensors="pt"))
        for key in extra:
            batch[key] = torch.tensor([f[key] for f in features])
        return batch

    def _ordered(self, role: str, indices: Sequence[int] | None = None) -> datasets.Dataset:
        """The examples of ``role`` (all, or those at ``indices``), shortest first unless training, so
        evaluation batches carry little padding (sums and metrics do not depend on the order)."""
        ds = self.splits[role]
        indices = list(range(len(ds))) if indices is None else list(indices)
        if self.hparams.sort_by_length and role != "train":
            lengths = [len(ids) for ids in ds.select(indices)["input_ids"]]
            indices = [indices[i] for i in sorted(range(len(indices)), key=lengths.__getitem__)]
        return ds.select(indices).add_column(EXAMPLE_INDEX, indices)

    def train_sampler(self) -> Sampler[int] | None:
        """The training order: length-grouped (``bucket_window`` > 0), else ``None`` (plain shuffle)."""
        if self.hparams.bucket_window <= 0:
            return None
        lengths = [len(ids) for ids in self.splits["train"]["input_ids"]]
        return LengthGroupedSampler(lengths, self.hparams.batch_size, self.hparams.bucket_window, self.hparams.seed)

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        ds = self.splits[split] if split == "train" else self._ordered(split)
        sampler = self.train_sampler() if split == "train" else None
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                          collate_fn=self.collate, num_workers=self.hparams.num_workers)

    # -- evaluation sets for the merge stage -----------------------------------------------------
    def attach_model(self, backbone) -> None:
        """Use ``backbone``'s tokenizer when none was configured (the merge stage has no trainer-side model)."""
        if self.tokenizer is None and self.tokenizer_name is None:
            self.tokenizer = getattr(backbone, "tokenizer", None)

    def eval_size(self, set_index: int = 0, stage: str = "validate") -> int:
        split = self.splits[_EVAL_ROLES[stage]]
        if len(split) and max(split["labels"]) < 0:
            raise ValueError(f"the {_EVAL_ROLES[stage]} split of {self.task.name} has no labels (GLUE's test sets "
                             "are unlabeled): evaluate on validation")
        return len(split)

    def eval_loader(self, indices: Sequence[int], set_index: int = 0, stage: str = "validate") -> DataLoader:
        """Examples at ``indices`` (positions in canonical order) of the evaluation set, batched by length;
        each batch carries their positions as ``example_index``."""
        if set_index != 0:
            raise IndexError(f"{self.task.name} has one evaluation set, not {set_index + 1}")
        return DataLoader(self._ordered(_EVAL_ROLES[stage], indices), batch_size=self.hparams.eval_batch_size,
                          collate_fn=self.collate, num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.hparams.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.hparams.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.hparams.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", self.hparams.batch_size, shuffle=False)
