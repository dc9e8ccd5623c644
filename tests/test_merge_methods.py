"""Task arithmetic, TIES and DARE against slow references written from the papers; a merge method
defined here, outside the package, run by YAML class_path in memory and streamed; bad inputs refused
before anything is written."""

import json

import pytest
import torch
import yaml
from jsonargparse import ArgumentError
from safetensors.torch import load_file, save_file

from lightning_merge.backbones import TimmViT
from lightning_merge.cli import main
from lightning_merge.fisher import save_fisher
from lightning_merge.merging import (
    DareMerge,
    MergeMethod,
    ScaleSearch,
    TaskArithmetic,
    TiesMerging,
    merge_safetensors,
    merge_state_dicts,
)
from lightning_merge.merging.dare_hash import dare_keep
from tests import reference_merges as ref
from tests.fixtures import TINY_VIT

SHAPES = {"a.weight": (6, 7), "a.bias": (6,), "b.weight": (5, 6)}


def tensors(seed: int, zero_like: dict | None = None) -> dict:
    """Values on a 1/16 grid, so float32 differences are exact and magnitudes tie often."""
    g = torch.Generator().manual_seed(seed)
    out = {k: torch.randint(-40, 41, s, generator=g).float() / 16 for k, s in SHAPES.items()}
    if zero_like is not None:  # some entries equal to the base: task-vector entries exactly zero
        for k in out:
            out[k].view(-1)[::3] = zero_like[k].view(-1)[::3]
    return out


@pytest.fixture
def three():
    base = tensors(0)
    return base, [tensors(i, base) for i in (1, 2, 3)]


def merge(method, base, models, scales):
    return merge_state_dicts(method, models, scales, shared={"base": base})


def assert_equal_to(merged, reference):
    for name, expected in reference.items():
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-6, atol=1e-6)


def test_task_arithmetic_matches_eq_1(three):
    base, models = three
    assert_equal_to(merge(TaskArithmetic(), base, models, [0.3, 0.5, 1.25]),
                    ref.task_arithmetic(base, models, [0.3, 0.5, 1.25]))


@pytest.mark.parametrize("top_k", [10, 20, 55, 100])
@pytest.mark.parametrize("per_tensor", [False, True])
def test_ties_matches_algorithm_1(three, top_k, per_tensor):
    base, models = three
    assert_equal_to(merge(TiesMerging(top_k=top_k, per_tensor=per_tensor), base, models, [0.4, 0.4, 0.7]),
                    ref.ties(base, models, [0.4, 0.4, 0.7], top_k, per_tensor))


def test_ties_at_100_percent_trims_nothing_and_one_agreeing_model_is_task_arithmetic(three):
    base, models = three
    # With every other model's task vector zero, the disjoint mean is the one model's λ τ: task arithmetic.
    alone = [models[0], dict(base), dict(base)]
    assert_equal_to(merge(TiesMerging(top_k=100), base, alone, [0.6, 0.6, 0.6]),
                    ref.task_arithmetic(base, alone, [0.6, 0, 0]))


def test_all_zero_task_vectors_give_the_base(three):
    base, _ = three
    for method in (TaskArithmetic(), TiesMerging(top_k=20), DareMerge(drop_rate=0.5, combine="ties")):
        merged = merge(method, base, [dict(base), dict(base)], [1.0, 1.0])
        assert all(torch.equal(merged[n], base[n]) for n in base)


@pytest.mark.parametrize("combine", ["task_arithmetic", "ties"])
def test_dare_matches_its_reference(three, combine):
    base, models = three
    method = DareMerge(drop_rate=0.75, seed=5, combine=combine, top_k=30)
    merged = merge(method, base, models, [0.5, 0.25, 1.0])
    if combine == "ties":
        expected = ref.ties(base, models, [0.5, 0.25, 1.0], 30, drop_rate=0.75, seed=5)
    else:
        vectors = ref.task_vectors(base, models, 0.75, 5)
        expected = {n: torch.tensor([b + sum(s * v[n][j] for s, v in zip([0.5, 0.25, 1.0], vectors))
                                     for j, b in enumerate(base[n].double().reshape(-1).tolist())],
                                    dtype=torch.float64).reshape(base[n].shape) for n in base}
    assert_equal_to(merged, expected)


def test_dare_without_drop_is_task_arithmetic_and_is_reproducible_by_seed(three):
    base, models = three
    scales = [0.5, 0.5, 0.5]
    assert all(torch.equal(a, b) for a, b in zip(merge(DareMerge(drop_rate=0.0), base, models, scales).values(),
                                                  merge(TaskArithmetic(), base, models, scales).values()))
    first, again = (merge(DareMerge(drop_rate=0.5, seed=1), base, models, scales) for _ in range(2))
    other = merge(DareMerge(drop_rate=0.5, seed=2), base, models, scales)
    assert all(torch.equal(first[n], again[n]) for n in base)
    assert not all(torch.equal(first[n], other[n]) for n in base)
    kept = dare_keep("w", 0, 200_000, model=0, seed=0, drop_rate=0.3).float().mean()
    assert abs(float(kept) - 0.7) < 0.01
    for start in (10, 2**31 - 40):  # the int32 arithmetic gives the unsigned hash's bits, high indices too
        assert [bool(x) for x in dare_keep("w", start, start + 30, 1, 4, 0.3)] == [
            ref.dare_keep("w", j, 1, 4, 0.3) for j in range(start, start + 30)]
    assert dare_keep("w", 0, 1000, 0, 0, 0.0).all()


@pytest.mark.parametrize("combine", ["task_arithmetic", "ties"])
def test_dare_drops_kept_between_merges_give_the_same_bits(three, combine, monkeypatch):
    """A second merge with the same method unpacks the drops it kept instead of hashing again: the
    same bits as a fresh method, for other scales too, and with nothing kept (a cache too small)."""
    base, models = three
    make = lambda: DareMerge(drop_rate=0.4, seed=5, combine=combine, top_k=30)  # noqa: E731
    method = make()
    for scales in ([0.5, 0.25, 1.0], [0.9, 0.1, 0.3]):
        first = merge(method, base, models, scales)
        again, fresh = merge(method, base, models, scales), merge(make(), base, models, scales)
        assert method._drops, "the drops were not kept"
        assert all(torch.equal(again[n], first[n]) and torch.equal(fresh[n], first[n]) for n in base)
    monkeypatch.setattr(DareMerge, "DROP_CACHE_BYTES", 0)
    uncached = make()
    merged = merge(uncached, base, models, [0.5, 0.25, 1.0])
    assert not uncached._drops
    assert all(torch.equal(merged[n], merge(make(), base, models, [0.5, 0.25, 1.0])[n]) for n in base)


@pytest.mark.parametrize("n", [1, 7, 8, 13, 4096 + 3])
def test_packed_drops_unpack_to_the_same_bits(n):
    from lightning_merge.merging.dare_hash import dare_bits, dare_keep, dare_kept, pack_drops, unpack_kept

    x, y = torch.empty(n + 8, dtype=torch.int32), torch.empty(n + 8, dtype=torch.int32)
    bits = dare_bits("w", 100, 100 + n, 0, 1, scratch=(x, y))
    kept = dare_kept(bits, 0.7, torch.empty(n)).clone()
    assert torch.equal(kept, dare_keep("w", 100, 100 + n, 0, 1, 0.7).float())
    packed = pack_drops(x, n, 0.7, torch.empty(n, dtype=torch.uint8), y)
    assert packed.numel() == -(-n // 8)
    unpacked = unpack_kept(packed, n, torch.full((n + 5,), -1.0), torch.empty(n + 8, dtype=torch.uint8))
    assert torch.equal(unpacked, kept)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: TiesMerging(top_k=0), r"top_k=0\): a percentage in \(0, 100\]"),
    (lambda: TiesMerging(top_k=101), r"top_k=101\)"),
    (lambda: DareMerge(drop_rate=1.0), r"drop_rate=1.0\): a probability in \[0, 1\)"),
    (lambda: DareMerge(drop_rate=-0.1), r"drop_rate=-0.1\)"),
])
def test_bad_hyper_parameters(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_scale_search_shared_and_per_model():
    assert ScaleSearch(values=[0.5, 1.0]).candidates(3) == [[0.5] * 3, [1.0] * 3]
    per_model = ScaleSearch(values=[0.0, 1.0], per_model=True).candidates(2)
    assert per_model[0] == [1.0, 1.0] and sorted(per_model[1:]) == [[0.0, 1.0], [1.0, 0.0]]
    drawn = ScaleSearch(per_model=True, samples=10).candidates(4)
    assert len(drawn) <= 12 + 10 and all(len(c) == 4 for c in drawn)


# -- a method defined outside the package ----------------------------------------------------------
class PickMostImportant(MergeMethod):
    """Each entry from the model whose own per-model input ``importance`` is largest there (ties: the
    first such model); coefficients are ignored beyond being checked."""

    model_inputs = ("importance",)

    def __init__(self, name: str = "most_important") -> None:
        super().__init__(name)

    def merge(self, piece, coefficients, target, out) -> None:
        weights = torch.stack(piece.inputs["importance"])
        pick = weights.argmax(0, keepdim=True)
        out.copy_(torch.stack(piece.thetas).gather(0, pick)[0])


@pytest.fixture(scope="module")
def vit_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        TimmViT(num_classes=10, **TINY_VIT).export(root / f"m{seed}")
    for seed in (1, 2):
        state = load_file(root / f"m{seed}" / "model.safetensors")
        g = torch.Generator().manual_seed(seed)
        save_fisher(root / f"m{seed}.importance.safetensors",
                    {k: torch.rand(v.shape, generator=g) for k, v in state.items()},
                    {"num_examples": 1, "variant": "exact"})
    return root


def test_a_method_defined_in_a_test_file_runs_in_memory_and_streamed(vit_pair, tmp_path):
    root = vit_pair
    method = {"class_path": "tests.test_merge_methods.PickMostImportant"}
    data = {"class_path": "lightning_merge.data.ImageDataModule", "init_args": {"max_eval_examples": 16}}
    models = [{"path": str(root / m), "inputs": {"importance": str(root / f"{m}.importance.safetensors")},
               "task": "digits", "name": m, "data": data} for m in ("m1", "m2")]
    config = {"trainer": {"accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                          "default_root_dir": str(tmp_path)},
              "model": {"class_path": "lightning_merge.modules.MergeModule",
                        "init_args": {"models": models, "methods": [method], "baselines": [], "select_examples": 8,
                                      "output_dir": str(tmp_path / "out"), "export_dir": str(tmp_path / "memory")}}}
    (tmp_path / "memory.yaml").write_text(yaml.safe_dump(config))
    main(["validate", "--config", str(tmp_path / "memory.yaml")])
    assert json.loads((tmp_path / "out" / "results.json").read_text())["results"][0]["method"] == "most_important"
    streamed_config = {"models": [str(root / "m1"), str(root / "m2")], "method": method,
                       "inputs": {"importance": [str(root / "m1.importance.safetensors"),
                                                 str(root / "m2.importance.safetensors")]},
                       "output": str(tmp_path / "streamed")}
    (tmp_path / "streamed.yaml").write_text(yaml.safe_dump(streamed_config))
    main(["merge", "--config", str(tmp_path / "streamed.yaml")])
    in_memory = load_file(tmp_path / "memory" / "m1" / "model.safetensors")
    streamed = load_file(tmp_path / "streamed" / "model.safetensors")
    assert in_memory.keys() == streamed.keys()
    for name in streamed:
        assert torch.equal(streamed[name], in_memory[name]), name
    importance = [load_file(root / f"m{s}.importance.safetensors") for s in (1, 2)]
    originals = [load_file(root / f"m{s}" / "model.safetensors") for s in (1, 2)]
    name = "blocks.0.mlp.fc1.weight"
    expected = torch.where(importance[1][name] > importance[0][name], originals[1][name], originals[0][name])
    assert torch.equal(streamed[name], expected)


def test_bad_merge_inputs_are_refused_before_anything_is_written(vit_pair, tmp_path):
    root = vit_pair
    models, out = [root / "m1", root / "m2"], tmp_path / "out"
    with pytest.raises(ValueError, match="task_arithmetic needs \\['base'\\]"):
        merge_safetensors(models, [0.5, 0.5], out, TaskArithmetic())
    other = TimmViT(num_classes=10, **{**TINY_VIT, "model_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 4}})
    other.export(tmp_path / "shallow")
    with pytest.raises(ValueError, match=r"base \(.*shallow\) has a different architecture: it lacks"):
        merge_safetensors(models, [0.5, 0.5], out, TiesMerging(), base=tmp_path / "shallow")
    for bad, message in (([-1.0, 1.0], "finite and >= 0"), ([1.0, 1.0, 1.0], "3 merging coefficients for 2")):
        with pytest.raises(ValueError, match=message):
            merge_safetensors(models, bad, out, TaskArithmetic(), base=root / "m0")
    save_file({"x": torch.ones(1)}, tmp_path / "f.safetensors")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    from lightning_merge.modules import MergeModule, ModelSpec

    with pytest.raises(ValueError, match="ties needs `base`"):
        MergeModule([ModelSpec(str(m), data=object()) for m in models], methods=[TiesMerging()])
    config = {"models": [str(m) for m in models], "output": str(out), "base": str(root / "m0"),
              "method": {"class_path": "lightning_merge.merging.TiesMerging", "init_args": {"top_k": 150}}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ArgumentError, match="top_k"):
        main(["merge", "--config", str(tmp_path / "bad.yaml")])
    assert not out.exists()


def test_a_method_shared_by_two_plans_is_prepared_for_each(three):
    """TIES keeps its thresholds on itself: merging two different model sets alternately with one
    instance must give each set its own thresholds."""
    from lightning_merge.merging import FlatMerger

    base, models = three
    ties = TiesMerging(top_k=20)
    shapes = {n: t.shape for n, t in base.items()}
    first = FlatMerger.from_states(ties, models[:2], shapes, shared={"base": base})
    second = FlatMerger.from_states(ties, [models[2], base], shapes, shared={"base": base})
    expected = {n: t.clone() for n, t in first([0.5, 0.5]).items()}
    second([0.5, 0.5])
    again = first([0.5, 0.5])
    assert all(torch.equal(again[n], expected[n]) for n in expected)
    assert_equal_to(again, ref.ties(base, models[:2], [0.5, 0.5], 20))


@pytest.mark.parametrize("make", [lambda: TiesMerging(top_k=30, compile=True),
                                  lambda: DareMerge(drop_rate=0.5, seed=2, compile=True),
                                  lambda: DareMerge(drop_rate=0.5, seed=2, combine="ties", top_k=30, compile=True)],
                         ids=["ties", "dare", "dare_ties"])
def test_compiled_merges_match_the_reference_and_stream_alike(three, tmp_path, make):
    """``compile: true`` (one fused loop per piece via torch.compile) computes the same merge: against
    the reference, and streamed = in memory bit for bit."""
    base, models = three
    method = make()
    scales = [0.5, 0.25, 1.0]
    merged = merge(method, base, models, scales)
    if method.top_k is None:
        vectors = ref.task_vectors(base, models, 0.5, 2)
        expected = {n: torch.tensor([b + sum(s * v[n][j] for s, v in zip(scales, vectors))
                                     for j, b in enumerate(base[n].double().reshape(-1).tolist())],
                                    dtype=torch.float64).reshape(base[n].shape) for n in base}
    else:
        expected = ref.ties(base, models, scales, 30, drop_rate=method.drop_rate, seed=method.seed)
    assert_equal_to(merged, expected)
    paths = []
    for i, m in enumerate(models):
        save_file(m, tmp_path / f"m{i}.safetensors")
        paths.append(tmp_path / f"m{i}.safetensors")
    save_file(base, tmp_path / "base.safetensors")
    streamed = load_file(merge_safetensors(paths, scales, tmp_path / "out.safetensors", make(),
                                           base=tmp_path / "base.safetensors", chunk_elements=16))
    from lightning_merge.merging import FlatMerger

    in_memory = FlatMerger.from_states(make(), models, {n: t.shape for n, t in base.items()},
                                       shared={"base": base}, chunk=16)(scales)
    assert all(torch.equal(streamed[n], in_memory[n]) for n in base)


@pytest.mark.parametrize("top_k", [10, 20, 30])
def test_ties_threshold_where_most_task_vector_entries_are_zero(top_k, monkeypatch):
    """Models that kept most of θ_0 (frozen parts): the bracket reaches down to 0, and the zeros in it
    are counted, not gathered; the threshold is still the exact k-th largest |τ|."""
    import math

    import lightning_merge.merging.task_vectors as task_vectors
    from lightning_merge.merging import MemoryTensors, MergePlan

    monkeypatch.setattr(TiesMerging, "_histogram_thresholds", None)  # the brackets must hold every rank
    monkeypatch.setattr(TiesMerging, "SAMPLE_STRIDE", 7)  # brackets about ±1% of the entries wide
    screened = []
    screen = task_vectors._screen
    monkeypatch.setattr(task_vectors, "_screen", lambda *args: screened.append(screen(*args)) or screened[-1])
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(400, 500, generator=g)}
    models = []
    for _ in range(2):
        changed = torch.rand(400, 500, generator=g) < 0.2  # top 20%: a bracket from 0 to a positive hi
        models.append({"w": base["w"] + changed * torch.randn(400, 500, generator=g)})
    method = TiesMerging(top_k=top_k)
    MergePlan(method, [MemoryTensors(m) for m in models], ["w"], shared={"base": MemoryTensors(base)},
              chunk=50_000).prepare()
    for i, m in enumerate(models):
        magnitudes = (m["w"] - base["w"]).abs().reshape(-1).sort(descending=True).values
        assert method.thresholds[(i, None)] == float(magnitudes[math.ceil(top_k / 100 * magnitudes.numel()) - 1])
    gathered = sum(t.numel() for _, slices in screened for t in slices)
    assert gathered < 0.25 * 2 * base["w"].numel()  # not the zeros: about 80% of the entries


@pytest.mark.parametrize("path", ["sample-bracket", "compacted", "histogram"])
@pytest.mark.parametrize("grid", [True, False], ids=["tied-values", "continuous"])
@pytest.mark.parametrize("per_tensor", [False, True], ids=["global", "per-tensor"])
def test_ties_thresholds_are_the_exact_kth_largest_magnitude(grid, per_tensor, path, monkeypatch):
    """The sampled bracket (and, when a bracket misses, the histogram passes) give exactly the k-th
    largest |τ| (over the body, or per tensor), as a full sort does; k = 100% keeps everything (0).
    ``compacted``: the screened entries are cut down to the bracket after every piece."""
    import math

    if path == "compacted":
        monkeypatch.setattr(TiesMerging, "SCREENED_ENTRIES", 1)
    if path == "histogram":  # a bracket that holds nothing: every threshold comes from the fallback
        monkeypatch.setattr(TiesMerging, "_bracket", lambda self, sample, share: (math.inf, math.inf))
    else:
        monkeypatch.setattr(TiesMerging, "SAMPLE_STRIDE", 7)  # a sample of a few thousand entries
        monkeypatch.setattr(TiesMerging, "_histogram_thresholds", None)  # the brackets must hold every rank

    from lightning_merge.merging import MemoryTensors, MergePlan

    g = torch.Generator().manual_seed(3)
    shapes = {"w": (300, 200), "b": (300,), "e": (50, 40)}
    make = (lambda s: torch.randint(-64, 65, s, generator=g).float() / 32) if grid else \
        (lambda s: torch.randn(s, generator=g))
    base = {k: make(s) for k, s in shapes.items()}
    models = [{k: make(s) for k, s in shapes.items()} for _ in range(2)]
    groups = [[k] for k in shapes] if per_tensor else [list(shapes)]
    for top_k in (1, 20, 73, 100):
        expected = {}
        for i, m in enumerate(models):
            for group in groups:
                magnitudes = torch.cat([(m[k] - base[k]).abs().reshape(-1) for k in group]).sort(descending=True).values
                keep = math.ceil(top_k / 100 * len(magnitudes))
                expected[(i, group[0] if per_tensor else None)] = 0.0 if keep >= len(magnitudes) else \
                    float(magnitudes[keep - 1])
        method = TiesMerging(top_k=top_k, per_tensor=per_tensor)
        MergePlan(method, [MemoryTensors(m) for m in models], list(shapes), shared={"base": MemoryTensors(base)},
                  chunk=7001).prepare()
        assert method.thresholds == expected, top_k
