"""A new architecture is one class: defined here, outside the package, it registers itself, exports,
reloads through load_backbone, and its Fisher matches the per-example loop, including a parameter it
declares as added to a module's output."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lightning_merge.backbones import Backbone, load_backbone
from lightning_merge.backbones.base import FAMILIES, read_manifest
from lightning_merge.backbones.mask_sites import AddedParameter
from lightning_merge.fisher.directions import exact_directions
from lightning_merge.fisher.per_example import PerExampleSquaredGradients
from tests.reference_fisher import reference_fisher_sums


class _Offset(nn.Module):
    """``x + shift`` as a layer of its own: the Fisher engine knows no rule for it."""

    def __init__(self, width):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(width))

    def forward(self, x):
        return x + self.shift


class ToyClassifier(Backbone):
    family = "toy_classifier"
    head_prefixes = ("head.",)

    def __init__(self, checkpoint: str | None = None, width: int = 6, classes: int = 3) -> None:
        super().__init__()
        if checkpoint is not None:
            args = read_manifest(checkpoint)["args"]
            width, classes = args["width"], args["classes"]
        self.width, self.classes = width, classes
        self.model = nn.ModuleDict({"offset": _Offset(width), "act": nn.Identity(), "body": nn.Linear(width, width),
                                    "head": nn.Linear(width, classes)})
        if checkpoint is not None:
            self.model.load_state_dict(load_file(Path(checkpoint) / "weights.safetensors"))

    @classmethod
    def from_export(cls, directory):
        return cls(checkpoint=directory)

    @property
    def num_labels(self):
        return self.classes

    def forward(self, batch):
        m = self.model
        return m["head"](torch.tanh(m["body"](m["act"](m["offset"](batch["x"])))))

    def added_parameters(self):
        return [AddedParameter("offset", "offset.shift")]

    def _export_files(self, directory):
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, directory / "weights.safetensors")
        return {"args": {"width": self.width, "classes": self.classes}}


def test_a_family_defined_outside_the_package_registers_exports_reloads_and_has_an_exact_fisher(tmp_path):
    assert FAMILIES["toy_classifier"] is ToyClassifier
    torch.manual_seed(0)
    toy = ToyClassifier()
    with torch.no_grad():
        toy.model["offset"].shift.normal_()
    path = toy.export(tmp_path / "toy")
    assert json.loads((path / "lightning_merge.json").read_text())["family"] == "toy_classifier"
    again = load_backbone(path)
    assert type(again) is ToyClassifier
    assert all(torch.equal(a, b) for a, b in zip(toy.state_dict().values(), again.state_dict().values()))

    model = again.double().eval()
    x = torch.randn(5, 6, dtype=torch.float64)
    engine = PerExampleSquaredGradients(model.model, accumulate_dtype=torch.float64,
                                        added_parameters=model.added_parameters())
    with engine.capture(5):
        logits = model({"x": x})
        engine.accumulate(logits, exact_directions(logits))
    engine.detach()
    slow = reference_fisher_sums(model.model, lambda i: model({"x": x[i:i + 1]}), 5)
    for name, ref in slow.items():
        torch.testing.assert_close(engine.sums[name], ref, rtol=1e-9, atol=1e-12)
