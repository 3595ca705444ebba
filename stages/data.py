"""Pretraining data: read a mixture's sources, train a BPE tokenizer, sample by weight, pack.

Sampling is over tokens, not documents: each domain gets weight x total_tokens tokens, drawn from
its shuffled documents and repeated for up to max_epochs passes when it runs short (as LLaMA did
for books and Wikipedia). Documents are joined with EOS and cut into fixed rows, so no position
is padding. Everything is deterministic in the seed.
"""

from __future__ import annotations

import glob
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages.configfile import ConfigError, DataError, find_file, load_config, read_jsonl, read_text, text_value
from stages.datacfg import MixtureConfig, SourceConfig

EOS = "<|endoftext|>"
PAD = "<|pad|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")   # reserved now so SFT needs no new embeddings
SPECIAL_TOKENS = (EOS, PAD, *CHAT_TOKENS)
CHAT_EOS = "<|im_end|>"   # ends every turn; SFT makes it the EOS so generation stops there
# ChatML. The assistant turn ends with <|im_end|>, which SFT trains on, so rollouts stop.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
BYTE_ALPHABET = 256


def load_mixture(path: str | Path) -> MixtureConfig:
    return load_config(MixtureConfig, path, what="mixture file")


# --- reading sources ----------------------------------------------------------------------

def _source_name(src: SourceConfig) -> str:
    return src.dataset or src.artifact or ",".join(src.paths or [])


def source_files(src: SourceConfig, store=None) -> list[Path]:
    if src.type == "files":
        patterns = [str(find_file(p)) if not glob.has_magic(p) else p for p in src.paths]
    else:
        root = store.get(src.artifact).local_path()
        patterns = [str(root / src.files)]
    files = sorted({Path(f) for pat in patterns for f in glob.glob(pat, recursive=True)
                    if Path(f).is_file()})
    if not files:
        raise DataError(f"source {src.domain} ({_source_name(src)}): no files match "
                        f"{patterns}")
    bad = [f for f in files if f.suffix not in (".jsonl", ".parquet", ".txt")]
    if bad:
        raise DataError(f"source {src.domain}: unsupported file type {bad[0]} "
                        f"(use .jsonl, .parquet or .txt)")
    return files


def source_documents(src: SourceConfig, seed: int, store=None) -> Iterator[str]:
    """Documents of one source in a seeded random order; empty texts are skipped."""
    if src.type == "hub":
        import datasets  # only hub sources need the network
        ds = datasets.load_dataset(src.dataset, src.subset, split=src.split, streaming=True)
        return _hub_texts(ds.shuffle(seed=seed, buffer_size=10_000), src)
    docs = [d for f in source_files(src, store) for d in read_file(f, src.text_field, src.domain)]
    return shuffled(docs, seed, f"{src.domain}:{_source_name(src)}")


def _hub_texts(ds, src: SourceConfig) -> Iterator[str]:
    for row in ds:
        if src.text_field not in row:
            raise DataError(f"source {src.domain} ({src.dataset}): no field "
                            f"'{src.text_field}'; fields: {', '.join(row)}")
        if text := text_value(row, src.text_field, f"{src.dataset} row"):
            yield text


def read_file(f: Path, text_field: str, domain: str) -> Iterator[str]:
    """The texts of one .txt, .jsonl or .parquet file; errors name the file (and line)."""
    if f.suffix == ".txt":
        text = read_text(f)
        if text.strip():
            yield text
    elif f.suffix == ".jsonl":
        yield from jsonl_texts(read_jsonl(f), text_field, domain)
    else:
        try:
            table = pq.read_table(f)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{f}: not a readable parquet file ({e})") from None
        if text_field not in table.column_names:
            raise DataError(f"{f}: no column '{text_field}' (source {domain}); "
                            f"columns: {', '.join(table.column_names)}")
        if not pa.types.is_string(t := table.schema.field(text_field).type) and \
                not pa.types.is_large_string(t):
            raise DataError(f"{f}: column '{text_field}' must be text, its type is {t} "
                            f"(source {domain})")
        yield from (t for t in table.column(text_field).to_pylist() if t)


def jsonl_texts(rows: Iterator[tuple[str, dict]], text_field: str, domain: str) -> Iterator[str]:
    """The text field of each (`file:line`, row); a row without it is an error naming the line."""
    for at, row in rows:
        if text_field not in row:
            raise DataError(f"{at}: no field '{text_field}' (source {domain}); "
                            f"fields: {', '.join(row)}")
        if text := text_value(row, text_field, at):
            yield text


# --- tokenizer ----------------------------------------------------------------------------

def train_tokenizer(texts: Iterator[str], vocab_size: int):
    """Byte-level BPE with the special tokens every later stage needs, as a HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    if vocab_size < BYTE_ALPHABET + len(SPECIAL_TOKENS):
        raise ConfigError(f"data.vocab_size={vocab_size} is smaller than the {BYTE_ALPHABET} "
                          f"byte tokens plus {len(SPECIAL_TOKENS)} special tokens")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   pad_token=PAD, unk_token=None,
                                   additional_special_tokens=list(CHAT_TOKENS),
                                   model_max_length=1 << 30)


def check_tokenizer(tok, where: str) -> None:
    if tok.eos_token_id is None:
        raise DataError(f"{where}: tokenizer has no EOS token; packing needs one")


# --- sampling ------------------------------------------------------------------------------

@dataclass
class Plan:
    """Which documents of one source go where: validation documents whole, training pieces as
    (document, tokens) with the last piece cut at the target. Indices and lengths only."""
    domain: str
    val: np.ndarray
    train_docs: np.ndarray
    train_lens: np.ndarray
    documents: int
    epochs: float | None   # passes over the source; None when it was not read to the end


def sample_plan(src: SourceConfig, lens: np.ndarray, order: np.ndarray, target: int,
                val_tokens: int, seed: int, exhausted: bool = True) -> Plan:
    """Hold out val_tokens, then draw `target` training tokens, repeating up to max_epochs.

    `lens` are the token counts of the source's documents (EOS included), `order` the order to
    take them in (a seeded shuffle). A short source is repeated, each pass in a fresh order, as
    LLaMA repeated books and Wikipedia. `exhausted` says `lens` is the whole source (a hub
    stream stops once it has the tokens it needs)."""
    name = f"source {src.domain} ({_source_name(src)})"
    if not len(order):
        raise DataError(f"{name}: no documents")
    seen = np.cumsum(lens[order]) - lens[order]
    n_val = int(np.searchsorted(seen, val_tokens, side="left"))   # docs begun before the quota
    val, pool = order[:n_val], order[n_val:]
    available = int(lens[pool].sum())
    if exhausted and available * src.max_epochs < target:
        raise DataError(
            f"{name}: needs {target:,} training tokens but has {available:,} after holding out "
            f"{int(lens[val].sum()):,} for validation; x max_epochs {src.max_epochs} = "
            f"{int(available * src.max_epochs):,}. Raise max_epochs, add data or lower "
            f"data.total_tokens")
    docs, cuts, taken, epoch = [], [], 0, 0
    while taken < target and len(pool):
        perm = pool if epoch == 0 else \
            pool[np.random.default_rng([seed, epoch, _key(src.domain)]).permutation(len(pool))]
        csum = np.cumsum(lens[perm])
        k = int(np.searchsorted(csum, target - taken, side="left")) + 1   # docs this pass
        k = min(k, len(perm))
        piece = lens[perm[:k]].copy()
        if taken + int(csum[k - 1]) > target:
            piece[-1] -= taken + int(csum[k - 1]) - target
        docs.append(perm[:k])
        cuts.append(piece)
        taken += int(piece.sum())
        epoch += 1
    train_docs = np.concatenate(docs) if docs else np.zeros(0, np.int64)
    return Plan(src.domain, val, train_docs, np.concatenate(cuts) if cuts else train_docs,
                len(train_docs), round(taken / available, 3) if exhausted and available else None)


def _key(text: str) -> int:
    """A stable integer from text, for seeding numpy (hash() changes per process)."""
    import zlib
    return zlib.crc32(text.encode())


def source_order(n: int, seed: int, src: SourceConfig) -> np.ndarray:
    """The seeded order a local source's documents are drawn in."""
    return np.random.default_rng([seed, _key(f"{src.domain}:{_source_name(src)}")]).permutation(n)


def pack_order(n: int, seed: int) -> np.ndarray:
    """Documents of all domains are shuffled together before they are cut into rows."""
    return np.random.default_rng([seed, _key("pack")]).permutation(n)


def shuffled(docs: list[str], seed: int, key: str) -> Iterator[str]:
    order = list(range(len(docs)))
    random.Random(f"{seed}:{key}").shuffle(order)
    return (docs[i] for i in order)


def _batched(it: Iterator[str], n: int) -> Iterator[list[str]]:
    batch = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
