"""Pretraining data: read a mixture's sources, train a BPE tokenizer, sample by weight, pack.

Sampling is over tokens, not documents: each domain gets weight x total_tokens tokens, drawn from
its shuffled documents and repeated for up to max_epochs passes when it runs short (as LLaMA did
for books and Wikipedia). Documents are joined with EOS and cut into fixed rows, so no position
is padding. Everything is deterministic in the seed.
"""

from __future__ import annotations

import glob
import random
from dataclasses import dataclass, field
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
    docs = [d for f in source_files(src, store) for d in _read_file(f, src)]
    return shuffled(docs, seed, f"{src.domain}:{_source_name(src)}")


def _hub_texts(ds, src: SourceConfig) -> Iterator[str]:
    for row in ds:
        if src.text_field not in row:
            raise DataError(f"source {src.domain} ({src.dataset}): no field "
                            f"'{src.text_field}'; fields: {', '.join(row)}")
        if text := text_value(row, src.text_field, f"{src.dataset} row"):
            yield text


def _read_file(f: Path, src: SourceConfig) -> Iterator[str]:
    if f.suffix == ".txt":
        text = read_text(f)
        if text.strip():
            yield text
    elif f.suffix == ".jsonl":
        for at, row in read_jsonl(f):
            if src.text_field not in row:
                raise DataError(f"{at}: no field '{src.text_field}' (source {src.domain}); "
                                f"fields: {', '.join(row)}")
            if text := text_value(row, src.text_field, at):
                yield text
    else:
        try:
            table = pq.read_table(f)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{f}: not a readable parquet file ({e})") from None
        if src.text_field not in table.column_names:
            raise DataError(f"{f}: no column '{src.text_field}' (source {src.domain}); "
                            f"columns: {', '.join(table.column_names)}")
        if not pa.types.is_string(t := table.schema.field(src.text_field).type) and \
                not pa.types.is_large_string(t):
            raise DataError(f"{f}: column '{src.text_field}' must be text, its type is {t} "
                            f"(source {src.domain})")
        yield from (t for t in table.column(src.text_field).to_pylist() if t)


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


# --- sampling and packing -----------------------------------------------------------------

@dataclass
class DomainSample:
    domain: str
    train: list[np.ndarray] = field(default_factory=list)   # token arrays, EOS appended
    val: list[np.ndarray] = field(default_factory=list)
    documents: int = 0
    epochs: float | None = None   # passes over the source; None when it was not read to the end


def sample_source(src: SourceConfig, docs: Iterator[str], tok, target: int, val_tokens: int,
                  seed: int) -> DomainSample:
    """Hold out val_tokens, then draw `target` training tokens, repeating up to max_epochs.

    `docs` is consumed lazily in shuffled order and only as far as needed, so a large local
    source or an endless hub stream costs only the tokens actually used.
    """
    out = DomainSample(src.domain)
    held, pool, taken, exhausted = 0, [], 0, True
    for chunk in _batched(docs, 256):
        for ids in _encode(tok, chunk):
            if held < val_tokens:
                out.val.append(ids)
                held += len(ids)
                continue
            piece = ids[: target - taken]   # the last document is cut at the target
            pool.append(ids)
            out.train.append(piece)
            out.documents += 1
            taken += len(piece)
            if taken >= target:
                break
        if taken >= target:
            exhausted = False
            break
    if not out.val and not pool:
        raise DataError(f"source {src.domain} ({_source_name(src)}): no documents")
    available = sum(len(a) for a in pool)
    if exhausted and available * src.max_epochs < target:
        raise DataError(
            f"source {src.domain} ({_source_name(src)}): needs {target:,} training tokens but "
            f"has {available:,} after holding out {held:,} for validation; x max_epochs "
            f"{src.max_epochs} = {int(available * src.max_epochs):,}. Raise max_epochs, add "
            f"data or lower data.total_tokens")
    epoch = 1
    while taken < target:   # a short source is repeated, each pass in a new order
        perm = list(range(len(pool)))
        random.Random(f"{seed}:{src.domain}:epoch{epoch}").shuffle(perm)
        for i in perm:
            piece = pool[i][: target - taken]
            out.train.append(piece)
            out.documents += 1
            taken += len(piece)
            if taken >= target:
                break
        epoch += 1
    out.epochs = round(taken / available, 3) if exhausted and available else None
    return out


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


def _encode(tok, texts: list[str]) -> list[np.ndarray]:
    eos = tok.eos_token_id
    enc = tok(texts, add_special_tokens=False)["input_ids"]
    return [np.asarray(e + [eos], dtype=np.int32) for e in enc]


def pack(pieces: list[tuple[str, np.ndarray]], seq_len: int, seed: int) \
        -> tuple[np.ndarray, dict[str, int]]:
    """Shuffle documents of all domains together, concatenate, cut into [rows, seq_len].

    Returns the rows and the tokens per domain that landed in them (the tail that does not fill
    a row is dropped, at most seq_len - 1 tokens).
    """
    order = list(range(len(pieces)))
    random.Random(f"{seed}:pack").shuffle(order)
    stream = np.concatenate([pieces[i][1] for i in order]) if pieces else np.zeros(0, np.int32)
    owner = np.concatenate([np.full(len(pieces[i][1]), i, np.int32) for i in order]) \
        if pieces else np.zeros(0, np.int32)
    rows = len(stream) // seq_len
    if rows == 0:
        raise DataError(f"only {len(stream)} tokens: not one row of seq_len {seq_len}")
    kept = owner[: rows * seq_len]
    counts = np.bincount(kept, minlength=len(pieces))
    per_domain: dict[str, int] = {}
    for i, (domain, _) in enumerate(pieces):
        per_domain[domain] = per_domain.get(domain, 0) + int(counts[i])
    return stream[: rows * seq_len].reshape(rows, seq_len), per_domain


def write_rows(path: Path, rows: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    seq_len = rows.shape[1]
    flat = pa.array(rows.reshape(-1), type=pa.int32())
    col = pa.FixedSizeListArray.from_arrays(flat, seq_len)
    pq.write_table(pa.table({"input_ids": col}), path, compression="zstd")


def read_rows(path: Path) -> np.ndarray:
    col = pq.read_table(path, columns=["input_ids"]).column("input_ids").combine_chunks()
    seq_len = col.type.list_size
    # a writable copy: torch refuses to wrap read-only Arrow buffers without a warning
    return np.array(col.flatten().to_numpy(zero_copy_only=False).reshape(-1, seq_len))
