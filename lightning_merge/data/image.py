"""Image classification data: scikit-learn's bundled ``digits`` (offline default), image folders,
or Hugging Face image datasets, with named distribution shifts for IID-vs-OOD evaluation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from lightning_merge.data.batch import EXAMPLE_INDEX
from lightning_merge.data.shifts import ShiftName, get_shift
from lightning_merge.evaluation.metrics import TaskMetrics

DIGITS = "digits"
IID = "iid"
MEAN, STD = 0.5, 0.5  # per channel, on pixel values in [0, 1]


class _Source:
    """Random access to ``(image (C, H, W) float in [0, 1], label)`` pairs."""

    def __init__(self, get: Callable[[int], tuple[torch.Tensor, int]], length: int) -> None:
        self.get, self.length = get, length


def _digits_source(indices: np.ndarray) -> _Source:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images[indices], dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target[indices])
    return _Source(lambda i: (images[i], int(labels[i])), len(indices))


def _hf_source(ds) -> _Source:
    import torchvision.transforms.v2.functional as TF

    image_col = next((c for c in ("image", "img", "pixel_values") if c in ds.column_names), None)
    label_col = next((c for c in ("label", "labels", "fine_label") if c in ds.column_names), None)
    if image_col is None or label_col is None:
        raise ValueError(f"image dataset needs an image and a label column, found {ds.column_names}")

    def get(i: int) -> tuple[torch.Tensor, int]:
        row = ds[i]
        image = TF.to_dtype(TF.pil_to_tensor(row[image_col].convert("RGB")), torch.float32, scale=True)
        return image, int(row[label_col])

    return _Source(get, len(ds))


class ShiftedImages(Dataset):
    """Resize to ``img_size``, repeat grey channels to ``in_chans``, apply a named shift, normalize."""

    def __init__(self, source: _Source, img_size: int | None, in_chans: int, shift: str | None,
                 mean: float = MEAN, std: float = STD) -> None:
        self.source, self.img_size, self.in_chans = source, img_size, in_chans
        self.shift, self.mean, self.std = get_shift(shift), mean, std

    def __len__(self) -> int:
        return self.source.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image, label = self.source.get(index)
        if self.img_size is not None and image.shape[-1] != self.img_size:
            image = F.interpolate(image[None], size=(self.img_size, self.img_size), mode="bilinear",
                                  align_corners=False)[0]
        if image.shape[0] != self.in_chans:
            image = image.expand(self.in_chans, -1, -1) if image.shape[0] == 1 else image[: self.in_chans]
        if self.shift is not None:
            image = self.shift(image, index)
        return {"pixel_values": (image - self.mean) / self.std, "labels": torch.tensor(label)}


class ImageDataModule(pl.LightningDataModule):
    """Images for fine-tuning ViTs and for WiSE-FT's IID vs OOD comparison (NeurIPS paper §3.2).

    Args:
        source: ``digits`` (scikit-learn's bundled 8x8 digits, split by ``val_fraction``), a local
            image folder (``datasets`` ``imagefolder``), or a hub dataset name (with ``hub_config`` its
            configuration, e.g. SVHN's ``cropped_digits``).
        img_size: resize target (default: the model's ``img_size``).
        train_shift: shift applied to the training domain (and its IID evaluation set).
        eval_shifts: extra evaluation sets, one per named shift (OOD).
        predict_split / max_predict_examples: what ``trainer.predict`` sees (Fisher estimation): the
            training images (``train``, in the training domain's shift) or the evaluation images.
    """

    def __init__(self, source: str = DIGITS, hub_config: str | None = None, img_size: int | None = None,
                 in_chans: int = 3,
                 train_shift: ShiftName | None = None, eval_shifts: Sequence[ShiftName] = (),
                 val_fraction: float = 0.2,
                 train_split: str = "train", eval_split: str = "test", batch_size: int = 32,
                 eval_batch_size: int = 128, max_train_examples: int | None = None,
                 max_eval_examples: int | None = None, max_predict_examples: int | None = None,
                 predict_split: Literal["train", "validation"] = "train", seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        for name in (train_shift, *eval_shifts):
            get_shift(name)  # fail on an unknown name before any data is read
        self.sources: dict[str, _Source] = {}
        self.label_names_: list[str] | None = None
        self._model_img_size: int | None = None
        self._model_normalization: tuple | None = None

    @property
    def eval_set_names(self) -> list[str]:
        return [IID, *self.hparams.eval_shifts]

    def task_metrics(self) -> TaskMetrics:
        return TaskMetrics(("accuracy",), self.num_labels)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def label_names(self) -> list[str]:
        if self.label_names_ is None:
            self._load_sources()
        return self.label_names_

    def _load_sources(self) -> None:
        hp = self.hparams
        rng = np.random.default_rng(hp.seed)
        if hp.source == DIGITS:
            from sklearn.datasets import load_digits

            n = len(load_digits().target)
            order = rng.permutation(n)
            n_val = int(round(n * hp.val_fraction))
            splits = {"train": order[n_val:], "eval": order[:n_val]}
            self.sources = {k: _digits_source(_limit(v, m)) for (k, v), m in
                            zip(splits.items(), (hp.max_train_examples, hp.max_eval_examples))}
            self.label_names_ = [str(i) for i in range(10)]
            return
        import datasets

        if Path(hp.source).is_dir():
            ds = datasets.load_dataset("imagefolder", data_dir=hp.source)
        elif hp.source.startswith((".", "/", "~")) or hp.source.count("/") > 1:
            raise FileNotFoundError(f"ImageDataModule(source={hp.source!r}): no such image folder")
        else:
            try:
                ds = datasets.load_dataset(hp.source, hp.hub_config)
            except (FileNotFoundError, ConnectionError, OSError) as err:
                raise FileNotFoundError(f"ImageDataModule(source={hp.source!r}): not an image folder, nor a data "
                                        f"set the hub gives (offline, or no such name): {err}") from err
        for key, split, limit in (("train", hp.train_split, hp.max_train_examples),
                                  ("eval", hp.eval_split, hp.max_eval_examples)):
            if split not in ds:
                raise ValueError(f"{hp.source} has no split {split!r}; it has {list(ds)}")
            part = ds[split].shuffle(seed=hp.seed)
            if limit is not None:
                part = part.select(range(min(limit, len(part))))
            self.sources[key] = _hf_source(part)
        features = ds[hp.train_split].features
        label_feature = next((features[c] for c in ("label", "labels", "fine_label") if c in features), None)
        names = getattr(label_feature, "names", None)
        self.label_names_ = list(names) if names else [str(i) for i in range(int(max(ds[hp.train_split]["label"])) + 1)]

    def preprocessing(self) -> dict:
        """How images reach the model, in timm's ``pretrained_cfg`` terms (recorded in exports)."""
        size, chans = self._img_size(), self.hparams.in_chans
        mean, std = self._model_normalization or ((MEAN,) * chans, (STD,) * chans)
        config = {"mean": tuple(mean), "std": tuple(std), "interpolation": "bilinear", "crop_pct": 1.0}
        return {**config, "input_size": (chans, size, size)} if size is not None else config

    def _img_size(self) -> int | None:
        if self.hparams.img_size is not None:
            return self.hparams.img_size
        return self._model_img_size  # from attach_model

    def _dataset(self, key: str, shift: str | None) -> ShiftedImages:
        if not self.sources:
            self._load_sources()
        mean, std = self._normalization()
        return ShiftedImages(self.sources[key], self._img_size(), self.hparams.in_chans, shift, mean, std)

    def _normalization(self) -> tuple:
        if self._model_normalization is None:
            return MEAN, STD
        mean, std = self._model_normalization
        return torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)

    def _loader(self, ds: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=self.hparams.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._dataset("train", self.hparams.train_shift), self.hparams.batch_size, True)

    def val_dataloader(self) -> list[DataLoader]:
        hp = self.hparams
        shifts = [hp.train_shift, *hp.eval_shifts]
        return [self._loader(self._dataset("eval", s), hp.eval_batch_size, False) for s in shifts]

    test_dataloader = val_dataloader

    # -- evaluation sets for the merge stage -----------------------------------------------------
    def attach_model(self, backbone) -> None:
        """Resize to ``backbone``'s input size when ``img_size`` is not set."""
        self._model_img_size = getattr(backbone, "img_size", None)
        # per-channel (mean, std) a backbone was trained with (CLIP's), else this module's 0.5 / 0.5
        self._model_normalization = getattr(backbone, "image_normalization", None)

    def eval_size(self, set_index: int = 0, stage: str = "validate") -> int:
        if not self.sources:
            self._load_sources()
        return self.sources["eval"].length

    def eval_loader(self, indices: Sequence[int], set_index: int = 0, stage: str = "validate") -> DataLoader:
        """Examples at ``indices`` of evaluation set ``set_index`` (IID, then each of ``eval_shifts``);
        each batch carries their positions as ``example_index``."""
        shifts = [self.hparams.train_shift, *self.hparams.eval_shifts]
        if not 0 <= set_index < len(shifts):
            raise IndexError(f"evaluation set {set_index} does not exist; the sets are {self.eval_set_names}")
        ds = _Indexed(self._dataset("eval", shifts[set_index]), list(indices))
        return self._loader(ds, self.hparams.eval_batch_size, False)

    def predict_dataloader(self) -> DataLoader:
        hp = self.hparams
        ds = self._dataset("train" if hp.predict_split == "train" else "eval", hp.train_shift)
        if hp.max_predict_examples is not None and hp.max_predict_examples < len(ds):
            ds = torch.utils.data.Subset(ds, range(hp.max_predict_examples))
        elif hp.max_predict_examples is not None and hp.max_predict_examples > len(ds):
            rank_zero_warn(f"Asked for {hp.max_predict_examples} examples but the split has {len(ds)}: using all")
        return self._loader(ds, hp.batch_size, False)


class _Indexed(Dataset):
    def __init__(self, ds: Dataset, indices: list[int]) -> None:
        self.ds, self.indices = ds, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {**self.ds[self.indices[i]], EXAMPLE_INDEX: torch.tensor(self.indices[i])}


def _limit(indices: np.ndarray, limit: int | None) -> np.ndarray:
    return indices if limit is None else indices[:limit]
