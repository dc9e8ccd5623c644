"""Statistics files, one file or sharded (an index JSON like Hugging Face's): the same tensors, the
same merges, readable with plain safetensors, and safe against partial writes."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_merge import tensor_files
from lightning_merge.cli import main
from lightning_merge.fisher import load_fisher, read_fisher_metadata, save_fisher
from lightning_merge.merging import FisherMerge, RegMeanMerge, merge_safetensors
from lightning_merge.statistics import save_gram

SHAPES = {"a.weight": (6, 5), "a.bias": (6,), "b.weight": (4, 6), "c.weight": (7,)}
META = {"num_examples": 3, "variant": "exact"}


def fisher(seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(s, generator=g) for k, s in SHAPES.items()}


def test_a_sharded_fisher_holds_the_same_tensors_and_header(tmp_path):
    values = fisher(0)
    whole = save_fisher(tmp_path / "f.safetensors", values, META)
    index = save_fisher(tmp_path / "f.safetensors.index.json", values, META, shard_bytes=100)
    shards = sorted(p.name for p in tmp_path.glob("f-*-of-*.safetensors"))
    assert len(shards) == 4 and shards[0].endswith("-00001-of-00004.safetensors")  # 24+120 > 100: one shard each
    assert read_fisher_metadata(index) == read_fisher_metadata(whole)
    sharded = load_fisher(index)
    assert sharded.keys() == values.keys() and all(torch.equal(sharded[k], values[k]) for k in values)
    # readable without this package: the index's weight_map and plain safetensors
    plain = json.loads(index.read_text())
    loaded = {}
    for shard in sorted(set(plain["weight_map"].values())):
        loaded.update(load_file(tmp_path / shard))
    assert all(torch.equal(loaded[k], values[k]) for k in values) and plain["metadata"]["variant"] == "exact"


def test_merges_read_sharded_statistics_like_single_files(tmp_path):
    g = torch.Generator().manual_seed(1)
    models, wholes, shardeds, grams_whole, grams_sharded = [], [], [], [], []
    for i in range(2):
        state = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
        save_file(state, tmp_path / f"m{i}.safetensors")
        models.append(tmp_path / f"m{i}.safetensors")
        wholes.append(save_fisher(tmp_path / f"f{i}.safetensors", fisher(i), META))
        shardeds.append(save_fisher(tmp_path / f"s{i}.safetensors.index.json", fisher(i), META, shard_bytes=64))
        x = {w: torch.randn(9, SHAPES[w][1], generator=g) for w in ("a.weight", "b.weight")}
        grams = {w: v.T @ v for w, v in x.items()}
        args = ({w: 9 for w in grams}, {w: w for w in grams}, {"num_examples": 9})
        grams_whole.append(save_gram(tmp_path / f"g{i}.safetensors", grams, *args))
        grams_sharded.append(save_gram(tmp_path / f"h{i}.safetensors.index.json", grams, *args, shard_bytes=64))
    for method, one, many in ((FisherMerge(), wholes, shardeds), (RegMeanMerge(alpha=0.5), grams_whole, grams_sharded)):
        key = method.model_inputs[0]
        a = load_file(merge_safetensors(models, [0.4, 0.6], tmp_path / "a.safetensors", method, inputs={key: one},
                                        check_provenance=False))
        b = load_file(merge_safetensors(models, [0.4, 0.6], tmp_path / "b.safetensors", method, inputs={key: many},
                                        check_provenance=False))
        assert all(torch.equal(a[k], b[k]) for k in SHAPES), method.name


def test_a_missing_shard_or_a_corrupt_index_is_named(tmp_path):
    index = save_fisher(tmp_path / "f.safetensors.index.json", fisher(0), META, shard_bytes=100)
    shard = sorted(tmp_path.glob("f-*-00002-of-00004.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_fisher(index)
    index.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable statistics file"):
        load_fisher(index)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_fisher(tmp_path / "absent.safetensors.index.json")


def test_the_index_is_written_last_and_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    index = save_fisher(tmp_path / "f.safetensors.index.json", fisher(0), META, shard_bytes=100)
    before = index.read_text()
    real, calls = tensor_files._write_file, []

    def failing(path, tensors, header):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(path, tensors, header)

    monkeypatch.setattr(tensor_files, "_write_file", failing)
    with pytest.raises(OSError, match="disk full"):
        save_fisher(index, fisher(5), META, shard_bytes=100)
    assert index.read_text() == before  # the old index, and every shard it names, untouched
    assert all(torch.equal(v, fisher(0)[k]) for k, v in load_fisher(index).items())
    monkeypatch.setattr(tensor_files, "_write_file", real)
    save_fisher(index, fisher(5), META, shard_bytes=100)  # a rewrite that succeeds removes the old shards
    named = set(json.loads(index.read_text())["weight_map"].values())
    assert {p.name for p in tmp_path.glob("f-*.safetensors")} == named  # same content, same names: no orphans
    assert all(torch.equal(v, fisher(5)[k]) for k, v in load_fisher(index).items())


def test_inspect_reads_a_sharded_gram_file(tmp_path, capsys):
    grams = {"a.weight": torch.eye(5), "b.weight": 2 * torch.eye(6)}
    index = save_gram(tmp_path / "g.safetensors.index.json", grams, {"a.weight": 4, "b.weight": 4},
                      {"a.weight": "a.weight", "b.weight": "b.weight"}, {"num_examples": 4}, shard_bytes=64)
    main(["inspect", str(index)])
    out = capsys.readouterr().out
    assert "kind: gram" in out and "2 weights use 2 Grams" in out and "tensors: 2 (float32), 61 values, sum 17" in out
