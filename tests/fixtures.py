"""Tiny local models and GLUE files in the released formats: nothing here touches a hub."""

from __future__ import annotations

from pathlib import Path

WORDS = ("the a cat dog sat on mat is not good bad movie film it was great awful man woman runs "
         "walks park city in red blue what who why how question answer same different yes no").split()

SENTENCES = ["the cat sat on the mat", "a dog runs in the park", "the movie was great", "it is not good",
             "a man walks in the city", "the film was awful", "who is the woman", "what is red"]

NLI3 = ["entailment", "neutral", "contradiction"]


def _rows(n: int, make) -> list[list[str]]:
    return [make(i, SENTENCES[i % len(SENTENCES)], SENTENCES[(i + 3) % len(SENTENCES)]) for i in range(n)]


# task dir -> (header row, or None where the release has none; row builder)
GLUE_FILES = {
    "CoLA": (None, lambda i, a, b: ["src", str(i % 2), "*" if i % 2 == 0 else "", a]),
    "SST-2": (["sentence", "label"], lambda i, a, b: [a, str(i % 2)]),
    "MRPC": (["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"], lambda i, a, b: [str(i % 2), "1", "2", a, b]),
    "STS-B": (["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
               "score"], lambda i, a, b: [str(i), "main", "f", "2012", "0", "s", "s", a, b, f"{(i * 0.7) % 5:.3f}"]),
    "QQP": (["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
            lambda i, a, b: [str(i), "1", "2", a, b, str(i % 2)]),
    "MNLI": (["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"],
             lambda i, a, b: [str(i), "1", "1", "fiction", "( x )", "( y )", "(x)", "(y)", a, b, NLI3[i % 3],
                              NLI3[i % 3]]),
    "QNLI": (["index", "question", "sentence", "label"],
             lambda i, a, b: [str(i), a, b, ["entailment", "not_entailment"][i % 2]]),
    "RTE": (["index", "sentence1", "sentence2", "label"],
            lambda i, a, b: [str(i), a, b, ["entailment", "not_entailment"][i % 2]]),
    "WNLI": (["index", "sentence1", "sentence2", "label"], lambda i, a, b: [str(i), a, b, str(i % 2)]),
}


def write_glue_dir(root: Path, n_train: int = 24, n_dev: int = 10) -> Path:
    """A GLUE data directory (``root/RTE/train.tsv`` ...) with every task in its released format."""
    for task, (header, make) in GLUE_FILES.items():
        folder = root / task
        folder.mkdir(parents=True, exist_ok=True)
        dev_names = ["dev_matched.tsv", "dev_mismatched.tsv"] if task == "MNLI" else ["dev.tsv"]
        for name, n in [("train.tsv", n_train)] + [(d, n_dev) for d in dev_names]:
            lines = ([header] if header else []) + _rows(n, make)
            (folder / name).write_text("".join("\t".join(cells) + "\n" for cells in lines))
    return root


def write_tiny_bert(directory: Path, num_labels: int = 2, seed: int | None = None) -> Path:
    """A 2-layer, hidden-32 BERT classifier with a WordPiece tokenizer over :data:`WORDS`."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    torch.manual_seed(num_labels if seed is None else seed)  # the same tiny model in every session
    directory.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    vocab_file = directory / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(vocab_file=str(vocab_file))
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64, num_labels=num_labels)
    BertForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_tiny_gpt2(directory: Path, num_labels: int = 2, seed: int | None = None) -> Path:
    """A 2-layer, width-32 GPT-2 classifier (MLP width 37, so (in, out) and (out, in) differ) with a
    byte-level BPE tokenizer over the letters of :data:`WORDS` (no merges: one token per character) and,
    as GPT-2's own, no pad token."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2TokenizerFast

    torch.manual_seed(num_labels if seed is None else seed)
    directory.mkdir(parents=True, exist_ok=True)
    letters = sorted(set("".join(WORDS)))
    vocab = {"<|endoftext|>": 0, "\u0120": 1, **{c: i + 2 for i, c in enumerate(letters)}}  # \u0120: a space
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tokenizer = GPT2TokenizerFast(tokenizer_object=bpe, unk_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>")
    config = GPT2Config(vocab_size=len(vocab), n_positions=128, n_embd=32, n_layer=2, n_head=4, n_inner=37,
                        num_labels=num_labels, bos_token_id=0, eos_token_id=0)
    GPT2ForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_tiny_clip(directory: Path, seed: int = 0) -> Path:
    """A CLIP with 2-layer, width-32 text and image towers (8x8 images, 2x2 patches, MLP width 37,
    projection 16), saved as a full CLIP checkpoint with a character-level tokenizer that wraps text in
    start/end tokens (the end token also pads, as CLIP's does)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    letters = sorted(set("".join(WORDS)) | set("0123456789."))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(letters)}}
    wordpiece = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    wordpiece.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    wordpiece.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=wordpiece, bos_token="<|startoftext|>",
                                        eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>")
    tower = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=16)
    config = CLIPConfig(text_config=dict(vocab_size=len(vocab), max_position_embeddings=64, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1, **tower),
                        vision_config=dict(image_size=8, patch_size=2, **tower), projection_dim=16)
    CLIPModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


TINY_VIT = dict(model_name="vit_tiny_patch16_224", img_size=8, patch_size=2,
                model_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 4})
