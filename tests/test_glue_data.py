import pytest
import torch

from lightning_merge.data import GlueDataModule, get_glue_task, stsb_to_bucket
from tests.fixtures import SENTENCES

# task -> (expected label of row i, has a second sentence)
EXPECTED = {
    "cola": (lambda i: i % 2, False),
    "sst2": (lambda i: i % 2, False),
    "mrpc": (lambda i: i % 2, True),
    "stsb": (lambda i: int(stsb_to_bucket(round((i * 0.7) % 5, 3))), True),
    "qqp": (lambda i: i % 2, True),
    "mnli": (lambda i: i % 3, True),
    "mnli_mismatched": (lambda i: i % 3, True),
    "qnli": (lambda i: i % 2, True),
    "rte": (lambda i: i % 2, True),
    "wnli": (lambda i: i % 2, True),
}


@pytest.mark.parametrize("task", list(EXPECTED))
def test_every_task_reads_its_released_tsv(glue_dir, task):
    label_of, pair = EXPECTED[task]
    dm = GlueDataModule(task, data_dir=str(glue_dir))
    for split, n in (("train", 24), ("validation", 10)):
        ds = dm.load_split(split)
        assert len(ds) == n
        assert ds["text_a"][:3] == SENTENCES[:3]
        if pair:
            assert ds["text_b"][0] == SENTENCES[3]
        else:
            assert "text_b" not in ds.column_names
        assert ds["label"] == [label_of(i) for i in range(n)]


def test_num_labels_and_label_names(glue_dir):
    assert GlueDataModule("MNLI", data_dir=str(glue_dir)).num_labels == 3
    assert GlueDataModule("STS-B").num_labels == 25
    assert GlueDataModule("STS-B", stsb_buckets=False).num_labels == 1
    assert GlueDataModule("rte").label_names == ["entailment", "not_entailment"]


def test_stsb_as_regression_keeps_scores(glue_dir):
    ds = GlueDataModule("stsb", data_dir=str(glue_dir), stsb_buckets=False).load_split("train")
    assert ds["label"][:3] == pytest.approx([0.0, 0.7, 1.4])


def test_stsb_bucket_edges():
    scores = torch.tensor([0.0, 0.1999, 0.2, 0.6, 2.5, 4.7999, 4.8, 4.9999, 5.0])
    assert stsb_to_bucket(scores).tolist() == [0, 0, 1, 3, 12, 23, 24, 24, 24]
    with pytest.raises(ValueError, match="STS-B scores"):
        stsb_to_bucket(torch.tensor([5.1]))


@pytest.mark.parametrize("name,canonical", [("RTE", "rte"), ("SST-2", "sst2"), ("STS-B", "stsb"),
                                            ("mnli-mm", "mnli_mismatched"), ("QQP", "qqp")])
def test_task_aliases(name, canonical):
    assert get_glue_task(name).name == canonical


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="Unknown task 'rtee'"):
        GlueDataModule("rtee")


def test_missing_column_is_named(tmp_path):
    bad = tmp_path / "train.tsv"
    bad.write_text("index\tsentence1\tlabel\n0\ta cat\tentailment\n")
    with pytest.raises(ValueError, match="missing column for text field 2 of rte"):
        GlueDataModule("rte", train_file=str(bad)).load_split("train")


def test_unknown_label_is_named(tmp_path):
    bad = tmp_path / "train.tsv"
    bad.write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(ValueError, match="label 'maybe' is not one of"):
        GlueDataModule("rte", train_file=str(bad)).load_split("train")


def test_csv_and_json_files(tmp_path):
    (tmp_path / "t.csv").write_text('sentence1,sentence2,label\n"a, cat",b,1\n')
    (tmp_path / "t.jsonl").write_text('{"premise": "a", "hypothesis": "b", "label": "neutral"}\n')
    assert GlueDataModule("rte", train_file=str(tmp_path / "t.csv")).load_split("train")["text_a"] == ["a, cat"]
    assert GlueDataModule("mnli", train_file=str(tmp_path / "t.jsonl")).load_split("train")["label"] == [1]


def test_batches_are_dynamically_padded_and_subsampled(glue_dir, tiny_bert):
    dm = GlueDataModule("rte", data_dir=str(glue_dir), tokenizer=str(tiny_bert), batch_size=4,
                        max_train_examples=8, seed=3)
    dm.setup("fit")
    assert len(dm.splits["train"]) == 8
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) >= {"input_ids", "attention_mask", "labels"}
    lengths = batch["attention_mask"].sum(1)
    assert batch["input_ids"].shape == (4, int(lengths.max()))
    again = GlueDataModule("rte", data_dir=str(glue_dir), tokenizer=str(tiny_bert), max_train_examples=8, seed=3)
    again.setup("fit")
    assert again.splits["train"]["input_ids"] == dm.splits["train"]["input_ids"]


def test_predict_set_is_the_seeded_subset_sorted_by_length(glue_dir, tiny_bert):
    kwargs = dict(data_dir=str(glue_dir), tokenizer=str(tiny_bert), max_train_examples=9, max_predict_examples=9,
                  seed=4)
    dm = GlueDataModule("rte", **kwargs)
    dm.setup("predict")
    dm.setup("fit")
    batches = list(dm.predict_dataloader())
    lengths = [int(n) for b in batches for n in b["attention_mask"].sum(1)]
    assert lengths == sorted(lengths)
    # The loader's order is a permutation of the stored, canonical (seeded-subsample) order.
    positions = [int(i) for b in batches for i in b["example_index"]]
    assert sorted(positions) == list(range(9))
    assert dm.splits["predict"]["input_ids"] == dm.splits["train"]["input_ids"]
    unsorted = GlueDataModule("rte", sort_by_length=False, **kwargs)
    unsorted.setup("predict")
    assert [int(i) for b in unsorted.predict_dataloader() for i in b["example_index"]] == list(range(9))


def test_domain_adaptation_tasks_read_released_jsonl(tmp_path, tiny_bert):
    """ChemProt / ACL-ARC / SciERC (NeurIPS §3.4) come as {train,dev}.jsonl with text and label names."""
    import json

    import torch
    from sklearn.metrics import f1_score

    folder = tmp_path / "citation_intent"
    folder.mkdir()
    labels = ["Background", "Uses", "Future", "Uses", "Extends", "Background"]
    for split in ("train", "dev"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": f"the cat sat {i}", "label": y}) + "\n"
                                                       for i, y in enumerate(labels)))
    dm = GlueDataModule("ACL-ARC", data_dir=str(tmp_path), tokenizer=str(tiny_bert))
    assert dm.num_labels == 6
    dm.setup("validate")
    ids = dm.splits["validation"]["labels"]
    names = ["Background", "CompareOrContrast", "Extends", "Future", "Motivation", "Uses"]
    assert [names[i] for i in ids] == labels
    metrics = dm.task_metrics()
    predictions = torch.tensor([0, 5, 5, 5, 2, 1])
    metrics.update(torch.nn.functional.one_hot(predictions, 6).float(), torch.tensor(ids))
    expected = f1_score(ids, predictions.tolist(), average="macro", labels=sorted(set(ids) | set(predictions.tolist())))
    assert float(metrics.compute()["macro_f1"]) == pytest.approx(expected)
    with pytest.raises(ValueError, match="local files only"):
        GlueDataModule("chemprot", tokenizer=str(tiny_bert)).setup("validate")


def test_tokenized_splits_are_cached_on_disk_and_reused(glue_dir, tiny_bert):
    """A later stage (a new data module, the same file, tokenizer and max length) reads the tokenized
    split from the cache file the first one wrote instead of tokenizing again."""
    def tokenized(**kwargs):
        dm = GlueDataModule("rte", data_dir=str(glue_dir), tokenizer=str(tiny_bert), **kwargs)
        dm.setup("fit")
        return {f["filename"] for f in dm.splits["train"].cache_files}

    first = tokenized()
    assert first and tokenized() == first
    assert tokenized(max_length=16) != first  # another max length: another cache entry
