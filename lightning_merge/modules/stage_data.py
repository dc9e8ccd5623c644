"""What every stage does with its data module before any loader is built."""

from __future__ import annotations

from lightning_merge.backbones import Backbone
from lightning_merge.data.protocol import ModelAware


def connect_data(backbone: Backbone, datamodule) -> None:
    """The data takes what it needs from the model (``attach_model``: its tokenizer, input size and
    normalization); the model what it needs from the data (``describe_task``: class names, from which a
    CLIP zero-shot head is built, and preprocessing). Fine-tune, Fisher, Gram and merge stages call it
    in ``setup``, before they compare head and label counts."""
    if isinstance(datamodule, ModelAware):
        datamodule.attach_model(backbone)
    preprocessing = getattr(datamodule, "preprocessing", None)
    backbone.describe_task(getattr(datamodule, "label_names", None),
                           preprocessing() if callable(preprocessing) else None)
