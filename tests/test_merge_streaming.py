"""Streamed (file → file) merging equals the in-memory flat merge bit for bit, and fails safely."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_merge.backbones import load_backbone
from lightning_merge.fisher import save_fisher
from lightning_merge.merging import (
    DareMerge,
    DirichletSearch,
    FisherMerge,
    FixedCoefficients,
    FlatMerger,
    GridSearch,
    IsotropicMerge,
    TaskArithmetic,
    TiesMerging,
    formulas,
    merge_bodies,
    merge_safetensors,
)
from tests.fixtures import write_tiny_bert

SHAPES = {"a.weight": (5, 7), "a.bias": (5,), "b.weight": (3, 5), "head.weight": (2, 3)}


def models_and_fishers(tmp_path, n=3, zero_fisher_at=None):
    g = torch.Generator().manual_seed(0)
    paths, fishers, states, fisher_states = [], [], [], []
    for i in range(n):
        state = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
        fisher = {k: torch.rand(s, generator=g) for k, s in SHAPES.items() if not k.startswith("head")}
        if zero_fisher_at:
            fisher[zero_fisher_at].view(-1)[:4] = 0.0  # below the floor in every model: fallback
        save_file(state, tmp_path / f"m{i}.safetensors")
        save_fisher(tmp_path / f"f{i}.safetensors", fisher, {"num_examples": 1, "variant": "exact"})
        paths.append(tmp_path / f"m{i}.safetensors")
        fishers.append(tmp_path / f"f{i}.safetensors")
        states.append(state)
        fisher_states.append(fisher)
    return paths, fishers, states, fisher_states


def write_base(tmp_path, states):
    g = torch.Generator().manual_seed(7)
    base = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in states[0].items()}
    base["a.weight"].view(-1)[:3] = states[0]["a.weight"].view(-1)[:3]  # τ = 0 entries: ties at zero
    save_file(base, tmp_path / "base.safetensors")
    return tmp_path / "base.safetensors", base


METHODS = [IsotropicMerge(), FisherMerge(), FisherMerge(normalize=True), FisherMerge(fallback="isotropic"),
           TaskArithmetic(), TiesMerging(top_k=30), TiesMerging(top_k=30, per_tensor=True),
           DareMerge(drop_rate=0.5, seed=3), DareMerge(drop_rate=0.5, combine="ties", top_k=50)]


@pytest.mark.parametrize("method", METHODS, ids=lambda m: f"{m.name}-{id(m) % 997}")
def test_streamed_equals_in_memory_bit_for_bit(tmp_path, monkeypatch, method):
    monkeypatch.setattr(formulas, "CPU_CHUNK", 6)  # the kernels' cache blocks fall inside tensors and pieces
    paths, fisher_paths, states, fishers = models_and_fishers(tmp_path, zero_fisher_at="a.weight")
    base_path, base = write_base(tmp_path, states)
    lam = [0.2, 0.5, 0.3]
    inputs = {"fisher": fisher_paths} if method.model_inputs else None
    out = merge_safetensors(paths, lam, tmp_path / "merged.safetensors", method, keep=["head."], target=1,
                            chunk_elements=4, inputs=inputs, base=base_path)
    streamed = load_file(out)
    body = {k: torch.Size(s) for k, s in SHAPES.items() if not k.startswith("head")}
    memory_inputs = {"fisher": fishers} if method.model_inputs else None
    in_memory = FlatMerger.from_states(method, states, body, memory_inputs, {"base": base}, target=1, chunk=4)(lam)
    for name in body:
        assert torch.equal(streamed[name], in_memory[name]), name
    assert torch.equal(streamed["head.weight"], states[1]["head.weight"])  # the target's head, not averaged
    if not getattr(method, "normalize", False):  # element-wise methods do not depend on the piece size either
        default = FlatMerger.from_states(method, states, body, memory_inputs, {"base": base}, target=1)(lam)
        assert all(torch.equal(default[n], in_memory[n]) for n in body)


def test_fisher_paths_match_the_state_dict_merge(tmp_path):
    paths, fisher_paths, states, fishers = models_and_fishers(tmp_path, zero_fisher_at="a.weight")
    for method in (FisherMerge(), FisherMerge(normalize=True), FisherMerge(fallback="isotropic")):
        streamed = load_file(merge_safetensors(paths, [0.2, 0.5, 0.3], tmp_path / "m.safetensors", method,
                                               fisher_paths, keep=["head."], target=1))
        reference = merge_bodies(states, [0.2, 0.5, 0.3], fishers, head_names={"head.weight"}, target=1,
                                 normalize=method.normalize, fallback=method.fallback)
        for name in reference:
            torch.testing.assert_close(streamed[name], reference[name], rtol=1e-6, atol=1e-7)


def test_mask_fisher_streams_like_in_memory(tmp_path):
    layout = {"ffn:x": {"kind": "ffn", "units": 5, "head_dim": 1, "qk": [], "v": None, "gated": "a", "out": "b"}}
    paths, _, states, _ = models_and_fishers(tmp_path, n=2)
    masks = []
    for i, values in enumerate((torch.tensor([1.0, 2, 3, 4, 5]), torch.tensor([5.0, 4, 3, 2, 1]))):
        masks.append(tmp_path / f"mask{i}.safetensors")
        save_fisher(masks[-1], {"ffn:x": values}, {"num_examples": 1, "variant": "exact", "kind": "mask",
                                                    "mask_layout": layout})
    method = FisherMerge(fisher="mask_fisher")
    out = load_file(merge_safetensors(paths, [0.5, 0.5], tmp_path / "o.safetensors", method, masks, keep=["head."]))
    body = {k: torch.Size(s) for k, s in SHAPES.items() if not k.startswith("head")}
    expected = FlatMerger.from_states(method, states, body, {"mask_fisher": masks})([0.5, 0.5])
    for name in body:
        assert torch.equal(out[name], expected[name])
    # row r of the gated layer: (m_0r θ_0r + m_1r θ_1r) / (m_0r + m_1r); the other layer (weight 1): the mean
    r = 0
    torch.testing.assert_close(out["a.weight"][r], (1 * states[0]["a.weight"][r] + 5 * states[1]["a.weight"][r]) / 6)
    torch.testing.assert_close(out["b.weight"], (states[0]["b.weight"] + states[1]["b.weight"]) / 2)


def test_export_folders_merge_into_a_loadable_export(tmp_path):
    a, b = write_tiny_bert(tmp_path / "a", seed=1), write_tiny_bert(tmp_path / "b", seed=2)
    out = merge_safetensors([a, b], [0.5, 0.5], tmp_path / "merged", IsotropicMerge(), keep=["classifier."])
    merged = load_backbone(out).model.state_dict()
    sa, sb = (load_backbone(p).model.state_dict() for p in (a, b))
    torch.testing.assert_close(merged["bert.encoder.layer.0.output.dense.weight"],
                               (sa["bert.encoder.layer.0.output.dense.weight"] +
                                sb["bert.encoder.layer.0.output.dense.weight"]) / 2)
    assert torch.equal(merged["classifier.weight"], sa["classifier.weight"])
    assert (out / "config.json").read_text() == (a / "config.json").read_text()  # the target's other files
    assert (out / "vocab.txt").is_file()


def test_a_failed_merge_leaves_the_existing_output_alone(tmp_path):
    paths, fisher_paths, states, fishers = models_and_fishers(tmp_path, n=2)
    output = tmp_path / "merged.safetensors"
    output.write_bytes(b"previous result")
    bad = dict(fishers[1])
    bad["b.weight"] = bad["b.weight"].clone()
    bad["b.weight"][0, 0] = float("nan")
    save_file(bad, fisher_paths[1])  # bypasses save_fisher's own check, as a corrupt producer would
    with pytest.raises(ValueError, match=r"model 1 .*'b.weight' has NaN"):
        merge_safetensors(paths, [0.5, 0.5], output, FisherMerge(), fisher_paths, keep=["head."])
    assert output.read_bytes() == b"previous result"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_inputs_name_the_problem(tmp_path):
    paths, fisher_paths, states, fishers = models_and_fishers(tmp_path, n=2)
    out = tmp_path / "o.safetensors"
    with pytest.raises(ValueError, match="lacks \\['head.weight'\\]"):
        save_file({k: v for k, v in states[0].items() if k != "head.weight"}, tmp_path / "nohead.safetensors")
        merge_safetensors([paths[0], tmp_path / "nohead.safetensors"], [1, 1], out, IsotropicMerge())
    other = {**states[1], "b.weight": torch.zeros(4, 5)}
    save_file(other, tmp_path / "wide.safetensors")
    with pytest.raises(ValueError, match="differs in shape.*b.weight"):
        merge_safetensors([paths[0], tmp_path / "wide.safetensors"], [1, 1], out, IsotropicMerge(), keep=["head."])
    save_fisher(tmp_path / "partial.safetensors", {"a.weight": fishers[0]["a.weight"]}, {"num_examples": 1,
                                                                                       "variant": "exact"})
    with pytest.raises(KeyError, match="model 1 fisher .* has no entry for"):
        merge_safetensors(paths, [1, 1], out, FisherMerge(), [fisher_paths[0], tmp_path / "partial.safetensors"],
                          keep=["head."])
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(paths[1].read_bytes()[:-40])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        merge_safetensors([paths[0], truncated], [1, 1], out, IsotropicMerge(), keep=["head."])
    with pytest.raises(ValueError, match="3 merging coefficients for 2 models"):
        merge_safetensors(paths, [1, 1, 1], out, IsotropicMerge(), keep=["head."])
    assert not out.exists()


def test_candidates_grid_endpoints_and_dirichlet_sums():
    grid = GridSearch(points=50).candidates(2, target=1)
    assert len(grid) == 50 and grid[0] == [1.0, 0.0] and grid[-1] == [0.0, 1.0]
    assert all(abs(sum(c) - 1) < 1e-12 for c in grid)
    samples = DirichletSearch(samples=100, seed=3).candidates(4)
    assert len(samples) == 100 and samples[0] == [0.25] * 4
    assert all(abs(sum(c) - 1) < 1e-9 and min(c) >= 0 for c in samples)
    assert samples == DirichletSearch(samples=100, seed=3).candidates(4)
    assert FixedCoefficients([2, 2, 4]).candidates(3) == [[0.25, 0.25, 0.5]]
    with pytest.raises(ValueError, match="GridSearch merges 2 models"):
        GridSearch().candidates(3)
