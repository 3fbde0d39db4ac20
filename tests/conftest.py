"""Shared fixtures: a tiny random BERT built in code (saved as a model folder), and where real GLUE lies."""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # several workers share the cores: one thread each, and their
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses (CLI runs, SuperNodes) inherit it

# The longest tests first (measured with --durations: the real-model tests take minutes, the Flower, resume and
# comparison tests up to two): xdist hands tests out in this order, so they start on both workers at once and
# the short tests fill the gaps, instead of a long test starting last and running alone.
LONGEST_FIRST = ("test_slow_real_model.py", "test_flower.py", "test_compare.py", "test_resume.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a module is kept


REPO = Path(__file__).resolve().parents[1]
GLUE_DIR = Path(os.environ.get("FEDLEASE_GLUE_DIR", REPO.parent / "shared" / "glue"))


def build_tiny_model(folder: Path, num_labels: int = 2, initializer_range: float = 0.02) -> Path:
    """A 2-layer, 32-wide BERT with a character-level WordPiece vocabulary: random, fast, real code paths.
    ``initializer_range``: the std of its random weights; BERT's 0.02 makes every input's [CLS] output almost the
    same, about 1/sqrt(width) makes the frozen random encoder's features depend on the input."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    chars = string.ascii_lowercase + string.digits
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars),
             *string.punctuation]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # the vocabulary file positionally: transformers 5 names the argument vocab and ignores vocab_file, which left a
    # tokenizer of the five special tokens that read every word as [UNK]
    tokenizer = BertTokenizerFast(str(folder / "vocab.txt"), do_lower_case=True)
    assert len(tokenizer) == len(vocab), "the tokenizer lost its vocabulary"
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=160, num_labels=num_labels,
                        initializer_range=initializer_range)
    import torch

    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_causal_lm(folder: Path, chat_template: str | None = None) -> Path:
    """A 2-layer, 32-wide LLaMA with a character-level tokenizer built in code: random, fast, real code paths."""
    import torch
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + list(string.ascii_letters + string.digits + string.punctuation
                                                        + " \n"))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    if chat_template:
        tokenizer.chat_template = chat_template
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_causal_lm(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-llama")))


def tiny_instruction_config(model: str, out, **overrides):
    """An instruction-tuning run on the tiny causal LM that finishes in seconds."""
    values = dict(tasks=["instruct_sentiment:2", "instruct_struct2text:2"], max_length=160, max_new_tokens=6)
    values.update(overrides)
    return tiny_run_config(model, out, **values)


INSTRUCTION_WORDS = ("abc", "hello", "world", "fed", "lease", "lora", "moe", "expert", "router", "client", "server",
                     "x", "node", "round", "rank", "token")


def write_instruction_folder(folder: Path, only: str | None = None) -> Path:
    """A user's instruction folder with two categories, reverse_words and upper (8 train / 8 test each); ``only``
    keeps the lines of one of them, as they are in the whole folder."""
    from fedlease.data.instructions import task_name

    rows = [{"instruction": f"Reverse {w}", "output": w[::-1], "category": "Reverse words"} for w in INSTRUCTION_WORDS]
    rows += [{"instruction": f"Upper {w}", "input": w, "output": w.upper(), "category": "upper"}
             for w in INSTRUCTION_WORDS]
    folder.mkdir(parents=True)
    for split, lines in (("train", rows[::2]), ("test", rows[1::2])):
        kept = [r for r in lines if only is None or task_name(r["category"]) == only]
        (folder / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in kept) + "\n")
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-bert")))


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    if not (GLUE_DIR / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"real GLUE TSVs not found at {GLUE_DIR} (set FEDLEASE_GLUE_DIR)")
    return GLUE_DIR


def tiny_run_config(model: str, out, **overrides):
    """A run on the tiny model that finishes in seconds."""
    from fedlease.config import RunConfig

    values = dict(model_name=model, tasks=["rotten_tomatoes:2", "snli:2"], output_dir=str(out), global_rounds=3,
                  warmup_rounds=1, train_samples=24, test_samples=12, batch_size=8, max_length=24, seed=7, lr=1e-2)
    values.update(overrides)
    return RunConfig(**values)


@pytest.fixture(scope="session")
def tiny_clients(tiny_model, tmp_path_factory):
    """(config, clients, infos) of four tiny-model clients: two rotten_tomatoes, two snli."""
    from fedlease.runtime.simulation import build_clients, load_partition, prepare_config

    config = prepare_config(tiny_run_config(tiny_model, tmp_path_factory.mktemp("unused")))
    _, splits = load_partition(config)
    _, clients, infos = build_clients(config, splits)
    return config, clients, infos
