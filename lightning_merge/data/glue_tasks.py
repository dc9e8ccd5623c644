"""What each GLUE task is: its text columns, labels, metrics and file names (hub and local).

Beside GLUE, the classification tasks of the domain-adaptation experiment (NeurIPS paper §3.4, after
Gururangan et al. 2020): ChemProt (biomed), ACL-ARC and SciERC (computer science), read from the
``{train,dev,test}.jsonl`` files those authors released (``text`` and ``label`` fields).

One table, :data:`GLUE_TASKS`, read by the data module, the metrics and the recipes, so a task's
facts live in exactly one place. Column *aliases* let the same spec read the hub's columns and the
columns of the TSV files as released (e.g. MNLI ``premise`` on the hub is ``sentence1`` in
``train.tsv``; MRPC's label is ``Quality``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

STSB_NUM_BUCKETS = 25
STSB_MAX_SCORE = 5.0


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task. ``label_names`` is ``None`` for the regression task STS-B."""

    name: str
    hub_config: str
    text_columns: tuple[tuple[str, ...], ...]  # per text field: accepted column names, canonical first
    label_columns: tuple[str, ...]
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...]
    local_dir: str
    local_files: dict[str, tuple[str, ...]] = field(default_factory=dict)  # split -> candidate names
    hub_splits: dict[str, str] = field(default_factory=dict)
    header: bool = True
    headerless_columns: tuple[str, ...] = ()

    @property
    def is_regression(self) -> bool:
        return self.label_names is None

    @property
    def num_text_fields(self) -> int:
        return len(self.text_columns)


_TSV = {"train": ("train.tsv",), "validation": ("dev.tsv",), "test": ("test.tsv",)}
_JSONL = {"train": ("train.jsonl",), "validation": ("dev.jsonl",), "test": ("test.jsonl",)}
_HUB = {"train": "train", "validation": "validation", "test": "test"}

GLUE_TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in [
        GlueTask(
            "cola", "cola", (("sentence",),), ("label",), ("unacceptable", "acceptable"),
            ("matthews_corrcoef",), "CoLA", _TSV, _HUB,
            # CoLA's released TSVs have no header row.
            header=False, headerless_columns=("source", "label", "original_label", "sentence"),
        ),
        GlueTask("sst2", "sst2", (("sentence",),), ("label",), ("negative", "positive"),
                 ("accuracy",), "SST-2", _TSV, _HUB),
        GlueTask(
            "mrpc", "mrpc", (("sentence1", "#1 String"), ("sentence2", "#2 String")),
            ("label", "Quality"), ("not_equivalent", "equivalent"), ("accuracy", "f1"), "MRPC",
            {"train": ("train.tsv", "msr_paraphrase_train.txt"),
             "validation": ("dev.tsv", "msr_paraphrase_test.txt"), "test": ("test.tsv",)},
            _HUB,
        ),
        GlueTask("stsb", "stsb", (("sentence1",), ("sentence2",)), ("label", "score"), None,
                 ("pearson", "spearman"), "STS-B", _TSV, _HUB),
        GlueTask("qqp", "qqp", (("question1",), ("question2",)), ("label", "is_duplicate"),
                 ("not_duplicate", "duplicate"), ("accuracy", "f1"), "QQP", _TSV, _HUB),
        GlueTask(
            "mnli", "mnli", (("premise", "sentence1"), ("hypothesis", "sentence2")),
            ("label", "gold_label"), ("entailment", "neutral", "contradiction"), ("accuracy",), "MNLI",
            {"train": ("train.tsv",), "validation": ("dev_matched.tsv",), "test": ("test_matched.tsv",)},
            {"train": "train", "validation": "validation_matched", "test": "test_matched"},
        ),
        GlueTask(
            "mnli_mismatched", "mnli", (("premise", "sentence1"), ("hypothesis", "sentence2")),
            ("label", "gold_label"), ("entailment", "neutral", "contradiction"), ("accuracy",), "MNLI",
            {"train": ("train.tsv",), "validation": ("dev_mismatched.tsv",),
             "test": ("test_mismatched.tsv",)},
            {"train": "train", "validation": "validation_mismatched", "test": "test_mismatched"},
        ),
        GlueTask("qnli", "qnli", (("question",), ("sentence",)), ("label",),
                 ("entailment", "not_entailment"), ("accuracy",), "QNLI", _TSV, _HUB),
        GlueTask("rte", "rte", (("sentence1",), ("sentence2",)), ("label",),
                 ("entailment", "not_entailment"), ("accuracy",), "RTE", _TSV, _HUB),
        GlueTask("wnli", "wnli", (("sentence1",), ("sentence2",)), ("label",),
                 ("not_entailment", "entailment"), ("accuracy",), "WNLI", _TSV, _HUB),
        # Domain adaptation (§3.4): local files only (hub_config ""); metrics as Gururangan et al. report.
        GlueTask("chemprot", "", (("text",),), ("label",),
                 ("INHIBITOR", "SUBSTRATE", "INDIRECT-DOWNREGULATOR", "INDIRECT-UPREGULATOR", "ACTIVATOR",
                  "ANTAGONIST", "PRODUCT-OF", "AGONIST", "DOWNREGULATOR", "UPREGULATOR", "AGONIST-ACTIVATOR",
                  "SUBSTRATE_PRODUCT-OF", "AGONIST-INHIBITOR"), ("micro_f1",), "chemprot", _JSONL),
        GlueTask("acl_arc", "", (("text",),), ("label",),
                 ("Background", "CompareOrContrast", "Extends", "Future", "Motivation", "Uses"), ("macro_f1",),
                 "citation_intent", _JSONL),
        GlueTask("scierc", "", (("text",),), ("label",),
                 ("COMPARE", "CONJUNCTION", "EVALUATE-FOR", "FEATURE-OF", "HYPONYM-OF", "PART-OF", "USED-FOR"),
                 ("macro_f1",), "sciie", _JSONL),
    ]
}

# Spellings (lower-case, without '-', '_' or spaces) that differ from the canonical name.
_ALIASES = {"mnlim": "mnli", "mnlimatched": "mnli", "mnlimm": "mnlimismatched", "sts": "stsb", "sst": "sst2",
            "citationintent": "aclarc", "sciie": "scierc"}


def get_glue_task(name: str) -> GlueTask:
    """Look a task up by any common spelling (``RTE``, ``SST-2``, ``sst2``, ``STS-B``, ``mnli-mm``)."""
    key = name.lower().replace("-", "").replace("_", "").replace(" ", "")
    key = _ALIASES.get(key, key)
    for task in GLUE_TASKS.values():
        if task.name.replace("_", "") == key:
            return task
    raise ValueError(f"Unknown task {name!r}; known tasks: {', '.join(GLUE_TASKS)} (any usual spelling)")


def stsb_to_bucket(score: torch.Tensor | float, num_buckets: int = STSB_NUM_BUCKETS) -> torch.Tensor:
    """Map STS-B similarity scores in [0, 5] to ``num_buckets`` equal-width classes.

    NeurIPS paper §3.1.1 / arXiv §3.1.1 turn STS-B into classification with 25 equally-sized buckets
    (after Raffel et al. 2019). Bucket ``b`` holds ``[b, b+1) * 5/num_buckets``; a score of exactly 5
    goes to the last bucket.
    """
    score = torch.as_tensor(score, dtype=torch.float64)
    if torch.any((score < 0) | (score > STSB_MAX_SCORE)) or torch.any(torch.isnan(score)):
        raise ValueError(f"STS-B scores must lie in [0, {STSB_MAX_SCORE}], got {score.tolist()}")
    width = STSB_MAX_SCORE / num_buckets
    # A small tolerance keeps scores that sit on an edge (e.g. 0.2 * 3 = 0.6000000001) in the upper bucket.
    bucket = torch.floor(score / width + 1e-9).long()
    return bucket.clamp(max=num_buckets - 1)


def stsb_bucket_centers(num_buckets: int = STSB_NUM_BUCKETS) -> torch.Tensor:
    """The score each bucket stands for when a bucketed prediction is scored with Pearson/Spearman."""
    width = STSB_MAX_SCORE / num_buckets
    return (torch.arange(num_buckets, dtype=torch.float32) + 0.5) * width


def num_labels_for(task: GlueTask, stsb_buckets: bool) -> int:
    if task.is_regression:
        return STSB_NUM_BUCKETS if stsb_buckets else 1
    return len(task.label_names)

