import numpy as np
import pytest
import torch
from PIL import Image

from lightning_merge.data import ImageDataModule, get_shift
from lightning_merge.data.shifts import SHIFTS


def test_digits_split_sizes_labels_and_shapes():
    dm = ImageDataModule(img_size=8, eval_shifts=["rotate"], seed=0)
    assert dm.num_labels == 10 and dm.eval_set_names == ["iid", "rotate"]
    train, evals = dm.train_dataloader(), dm.val_dataloader()
    assert len(train.dataset) + len(evals[0].dataset) == 1797
    assert len(evals[0].dataset) == round(1797 * 0.2)
    item = evals[0].dataset[0]
    assert item["pixel_values"].shape == (3, 8, 8)
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    # The OOD set holds the same images, shifted.
    assert not torch.equal(evals[1].dataset[0]["pixel_values"], item["pixel_values"])
    assert evals[1].dataset[0]["labels"] == item["labels"]


def test_digits_resize_and_subsample():
    dm = ImageDataModule(img_size=16, max_train_examples=50, max_predict_examples=7)
    assert len(dm.train_dataloader().dataset) == 50
    assert dm.train_dataloader().dataset[0]["pixel_values"].shape == (3, 16, 16)
    assert len(dm.predict_dataloader().dataset) == 7


@pytest.mark.parametrize("name", list(SHIFTS))
def test_shifts_are_deterministic_and_change_the_image(name):
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    shift = get_shift(name)
    torch.testing.assert_close(shift(image, 5), shift(image, 5))
    assert not torch.allclose(shift(image, 5), image)


def test_invert_is_exact():
    image = torch.rand(1, 4, 4)
    torch.testing.assert_close(get_shift("invert")(image, 0), 1 - image)


def test_unknown_shift_is_named():
    with pytest.raises(ValueError, match="Unknown distribution shift 'fog'"):
        ImageDataModule(eval_shifts=["fog"])


def test_image_folder(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in ("cat", "dog"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    dm = ImageDataModule(source=str(tmp_path), img_size=8)
    assert dm.label_names == ["cat", "dog"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (6, 3, 8, 8)
    assert sorted(batch["labels"].tolist()) == [0, 0, 0, 1, 1, 1]
