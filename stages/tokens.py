"""Token files: sources tokenized in parallel by datatrove, packed rows in memory-mapped shards.

Build (rank 0): each local source is cut into work units (a file, or a line-aligned byte range
of a large JSON-lines file); datatrove's executor runs one task per unit, each reading its
documents and writing them with datatrove's `DocumentTokenizer` as a flat token file plus an
index of document ends (FineWeb's tokenized shards have this form). Units keep the source's
document order whatever the number of workers, so the dataset does not depend on it. The
sampler (stages/data.py) then works on document lengths only, and `ShardWriter` copies the
chosen documents into fixed-size `.npy` shards of packed rows as they fill: no step holds the
dataset's tokens.

Train (every rank): `TokenRows` memory-maps the shards and gathers the rows a rank asks for,
so a rank's memory does not grow with the dataset.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from stages.artifacts import sha256_file
from stages.configfile import DataError

FORMAT = "alignflow-tokens/1"
INDEX = "index.json"


def token_dtype(vocab: int, asked: str = "auto") -> np.dtype:
    """uint16 when every id fits (half the bytes of uint32), else uint32."""
    fits16 = vocab <= 1 << 16
    if asked == "uint16" and not fits16:
        raise DataError(f"data.token_dtype=uint16 cannot hold a vocabulary of {vocab:,} tokens "
                        f"(ids up to {vocab - 1:,} > 65,535); use uint32 or auto")
    if asked == "uint32" or not fits16:
        return np.dtype(np.uint32)
    return np.dtype(np.uint16)


# --- work units and their documents ------------------------------------------------------

@dataclass(frozen=True)
class Unit:
    """A piece of one source that one task tokenizes: a whole file, or the lines of a JSON-lines
    file whose first byte lies in [start, end)."""
    source: int
    path: str
    start: int = 0
    end: int | None = None
    text_field: str = "text"
    domain: str = ""

    @property
    def size(self) -> int:
        return (self.end if self.end is not None else os.path.getsize(self.path)) - self.start


def file_units(source: int, files: list[Path], text_field: str, domain: str,
               unit_bytes: int) -> list[Unit]:
    """Units of a source in its file order; large JSON-lines files split into byte ranges."""
    out = []
    for f in files:
        size = f.stat().st_size
        if f.suffix != ".jsonl" or size <= unit_bytes:
            out.append(Unit(source, str(f), 0, None, text_field, domain))
            continue
        for start in range(0, size, unit_bytes):
            out.append(Unit(source, str(f), start, min(start + unit_bytes, size), text_field,
                            domain))
    return out


def unit_texts(unit: Unit) -> Iterator[str]:
    """The texts of one unit, in file order; errors name the file and line."""
    from stages.configfile import jsonl_rows
    from stages.data import jsonl_texts, read_file
    path = Path(unit.path)
    if path.suffix != ".jsonl" or unit.end is None:
        yield from read_file(path, unit.text_field, unit.domain)
        return
    with open(path, "rb") as f:
        if unit.start:
            f.seek(unit.start - 1)
            f.readline()   # the line that began before this range belongs to the previous unit
        first_line = None

        def lines():
            nonlocal first_line
            while f.tell() < unit.end:
                pos = f.tell()
                line = f.readline()
                if not line:
                    return
                if first_line is None:
                    first_line = pos
                yield line
        try:
            yield from jsonl_texts(jsonl_rows(lines(), str(path)), unit.text_field, unit.domain)
        except DataError as e:
            raise DataError(_absolute_line(str(e), path, first_line or 0)) from None


def _absolute_line(msg: str, path: Path, offset: int) -> str:
    """jsonl_rows counts lines from the unit's start; say the file's line instead."""
    prefix = f"{path}:"
    if not msg.startswith(prefix) or not offset:
        return msg
    num, _, rest = msg[len(prefix):].partition(":")
    if not num.isdigit():
        return msg
    with open(path, "rb") as f:
        before = f.read(offset).count(b"\n")
    return f"{prefix}{before + int(num)}:{rest}"


class UnitReader:
    """datatrove pipeline step: task `rank` reads the documents of unit `rank`."""
    name = "alignflow unit reader"

    def __init__(self, units: list[Unit]):
        self.units = units

    def __repr__(self) -> str:
        return f"{self.name} ({len(self.units)} units)"

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        from datatrove.data import Document
        unit = self.units[rank]
        for i, text in enumerate(unit_texts(unit)):
            yield Document(text=text, id=f"{unit.path}:{unit.start}:{i}")


def tokenize_units(units: list[Unit], tokenizer_json: Path, eos: str, work: Path,
                   workers: int, executor: str = "local", options: dict | None = None) \
        -> list["TokenFile"]:
    """Tokenize every unit with datatrove, `workers` tasks at a time; one TokenFile per unit,
    in the order given.

    Each task is one process with the Rust tokenizer's own thread pool off, so the work is
    spread by the executor (over processes here, over nodes with Ray) and not twice."""
    from datatrove.pipeline.tokens import DocumentTokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"   # inherited by the executor's processes
    out = work / "tokens"
    # task r tokenizes units[by_size[r]]: the longest tasks first keeps every worker busy
    by_size = sorted(range(len(units)), key=lambda k: -units[k].size)
    pipeline = [UnitReader([units[k] for k in by_size]),
                DocumentTokenizer(output_folder=str(out),
                                  tokenizer_name_or_path=str(tokenizer_json),
                                  eos_token=eos, shuffle_documents=False, save_index=True,
                                  save_final_metadata=True, batch_size=1000)]
    options = dict(options or {})
    if executor == "local":
        from datatrove.executor import LocalPipelineExecutor
        # fork: the builder is a process of its own that runs no threads of torch, and a
        # forkserver's workers spend a second each importing what this process has loaded
        runner = LocalPipelineExecutor(pipeline, tasks=len(units),
                                       workers=max(1, min(workers, len(units))),
                                       logging_dir=str(work / "logs"), skip_completed=False,
                                       start_method="fork", **options)
    elif executor == "ray":
        try:
            from datatrove.executor.ray import RayPipelineExecutor
            import ray  # noqa: F401
        except ImportError:
            raise DataError("data.executor=ray needs the ray package on every node: "
                            "pip install 'ray[default]>=2.50'") from None
        runner = RayPipelineExecutor(pipeline, tasks=len(units), workers=workers,
                                     logging_dir=str(work / "logs"), skip_completed=False,
                                     **options)
    else:
        raise DataError(f"data.executor={executor!r}: use local or ray")
    # datatrove logs a dozen lines per task to stderr; they go to a file beside its task logs
    # (printed when a task fails), the stage's log keeps one line
    log = work / "executor.log"
    saved = os.dup(2)
    try:
        with open(log, "w") as sink:
            os.dup2(sink.fileno(), 2)
            try:
                runner.run()   # a worker's DataError comes back to this process as itself
            finally:
                os.dup2(saved, 2)
    except Exception:
        print(log.read_text()[-4000:], file=sys.stderr)
        raise
    finally:
        os.close(saved)
    files = [None] * len(units)
    for rank, k in enumerate(by_size):
        files[k] = TokenFile(out / f"{rank:05d}_unshuffled.ds")
    for unit, tf in zip(units, files):
        if not tf.path.exists():
            raise DataError(f"tokenizing {unit.path} (bytes {unit.start}-{unit.end}) wrote no "
                            f"token file; see {work / 'logs'}")
    return files


class TokenFile:
    """One datatrove token file: flat token ids and the end of each document."""

    def __init__(self, path: Path):
        self.path = path
        meta = Path(f"{path}.metadata")
        size = int(meta.read_text().splitlines()[0].rsplit("|", 1)[1]) if meta.exists() else 2
        self.dtype = np.dtype(np.uint32 if size == 4 else np.uint16)
        index = Path(f"{path}.index")
        self.ends = np.fromfile(index, dtype="<u8").astype(np.int64) if index.exists() \
            and path.stat().st_size else np.zeros(0, np.int64)


class SourceTokens:
    """The documents of one source across its units' token files, in unit order."""

    def __init__(self, files: list[TokenFile]):
        self.files = files
        ends = [f.ends for f in files] or [np.zeros(0, np.int64)]
        lens = [np.diff(e, prepend=0) for e in ends]
        self.lens = np.concatenate(lens)
        self.start = np.concatenate([e - n for e, n in zip(ends, lens)])
        self.file_of = np.concatenate([np.full(len(e), i, np.int32) for i, e in enumerate(ends)])
        self._open: dict[int, object] = {}

    def read(self, doc: int, count: int) -> np.ndarray:
        """The first `count` tokens of document `doc`."""
        i = int(self.file_of[doc])
        tf = self.files[i]
        if i not in self._open:
            self._open[i] = open(tf.path, "rb")
        f = self._open[i]
        f.seek(int(self.start[doc]) * tf.dtype.itemsize)
        return np.fromfile(f, dtype=tf.dtype, count=count)

    def close(self) -> None:
        for f in self._open.values():
            f.close()
        self._open = {}


def write_stream(texts: Iterator[str], tok, path: Path, val_tokens: int, target: int) -> bool:
    """Tokenize a stream (a hub dataset) into one token file in datatrove's layout until it
    holds the validation quota and then `target` training tokens; True when the stream ended
    first. A stream is read on rank 0 in one process, in the stream's own (shuffled) order."""
    from stages.data import _batched
    dtype = token_dtype(len(tok))
    ends, total, held, train, full = [], 0, 0, 0, False
    with open(path, "wb") as f:
        for batch in _batched(texts, 256):
            for ids in tok(batch, add_special_tokens=False)["input_ids"]:
                arr = np.asarray(ids + [tok.eos_token_id], dtype=dtype)
                f.write(arr.tobytes())
                total += len(arr)
                ends.append(total)
                if held < val_tokens:
                    held += len(arr)
                else:
                    train += len(arr)
                    full = train >= target
                if full:
                    break
            if full:
                break
    Path(f"{path}.index").write_bytes(np.asarray(ends, "<u8").tobytes())
    Path(f"{path}.metadata").write_text(f"stream|{dtype.itemsize}\n{total}\n")
    return not full


# --- packed shards ------------------------------------------------------------------------

class ShardWriter:
    """Packs documents into rows of seq_len and writes `rows_per_shard` rows per .npy shard as
    they fill; the tail that does not fill a row is dropped."""

    def __init__(self, root: Path, seq_len: int, rows_per_shard: int, dtype: np.dtype,
                 vocab: int):
        self.root, self.seq_len, self.dtype = root, seq_len, dtype
        self.shard_tokens = rows_per_shard * seq_len
        self.buf = np.empty(self.shard_tokens, dtype)
        self.fill = 0
        self.pending: list[list] = []   # [domain, tokens] in the buffer, in order
        self.shards: list[dict] = []
        self.counts = np.zeros(vocab, np.int64)   # for the unigram baseline
        self.max_id = -1
        (root / "train").mkdir(parents=True, exist_ok=True)

    def add(self, tokens: np.ndarray, domain: str) -> None:
        at = 0
        while at < len(tokens):
            n = min(len(tokens) - at, self.shard_tokens - self.fill)
            self.buf[self.fill:self.fill + n] = tokens[at:at + n]
            self.fill += n
            self.pending.append([domain, n])
            at += n
            if self.fill == self.shard_tokens:
                self._flush(self.fill)

    def _flush(self, n: int) -> None:
        rows = self.buf[:n].reshape(-1, self.seq_len)
        per_domain: dict[str, int] = {}
        left = n
        while left and self.pending:
            domain, k = self.pending[0]
            take = min(k, left)
            per_domain[domain] = per_domain.get(domain, 0) + take
            left -= take
            if take == k:
                self.pending.pop(0)
            else:
                self.pending[0][1] -= take
        self.counts += np.bincount(rows.reshape(-1), minlength=len(self.counts))[:len(self.counts)]
        self.max_id = max(self.max_id, int(rows.max()))
        rel = f"train/{len(self.shards):05d}.npy"
        np.save(self.root / rel, rows)
        self.shards.append({"file": rel, "rows": int(rows.shape[0]),
                            "sha256": sha256_file(self.root / rel),
                            "tokens_per_domain": per_domain})
        self.fill = 0

    def close(self) -> list[dict]:
        whole = self.fill - self.fill % self.seq_len
        if whole:
            self._flush(whole)
        self.fill, self.pending = 0, []
        return self.shards


def read_index(root: Path) -> dict:
    path = root / INDEX
    if not path.is_file():
        raise DataError(f"{root}: no {INDEX}; this dataset was built before token shards "
                        f"(rebuild it: the stage does so when its inputs are unchanged "
                        f"but its code is newer)")
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise DataError(f"{path}: format {index.get('format')!r}, expected {FORMAT!r}")
    return index


class TokenRows:
    """The packed rows of a split, memory-mapped shard by shard; `rows[idx]` gathers int64
    rows. Shapes and dtypes are checked against the index when opened."""

    def __init__(self, root: Path, shards: list[dict], seq_len: int, dtype: str):
        self.maps = []
        for s in shards:
            path = root / s["file"]
            if not path.is_file():
                raise DataError(f"{path}: shard missing (the index lists it)")
            arr = np.load(path, mmap_mode="r")
            if arr.shape != (s["rows"], seq_len) or arr.dtype != np.dtype(dtype):
                raise DataError(f"{path}: shard holds {arr.shape} {arr.dtype}, the index says "
                                f"({s['rows']}, {seq_len}) {dtype}: damaged or from another build")
            self.maps.append(arr)
        self.starts = np.cumsum([0] + [len(m) for m in self.maps])
        self.seq_len = seq_len

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.atleast_1d(np.asarray(idx, dtype=np.int64))
        if len(idx) and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"row index out of range 0..{len(self) - 1}")
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        out = np.empty((len(idx), self.seq_len), np.int64)
        for i, (s, r) in enumerate(zip(shard, idx - self.starts[shard])):
            out[i] = self.maps[s][r]
        return out


def open_dataset(root: Path) -> tuple[dict, TokenRows, dict[str, np.ndarray]]:
    """(index, train rows, validation rows per domain) of a dataset artifact directory."""
    index = read_index(root)
    train = TokenRows(root, index["shards"], index["seq_len"], index["dtype"])
    val = {d: TokenRows(root, [v], index["seq_len"], index["dtype"])[np.arange(v["rows"])]
           for d, v in sorted(index["val"].items())}
    return index, train, val


def check_fits(index: dict, tokenizer: str, vocab: int, where: str) -> None:
    """A dataset tokenized for another model would train on ids that mean other words."""
    if index.get("tokenizer") != tokenizer:
        raise DataError(f"{where}: built with tokenizer {str(index.get('tokenizer'))[:12]}, the "
                        f"model reads tokenizer {tokenizer[:12]}; rebuild the dataset with the "
                        f"model's tokenizer")
    if index["max_token_id"] >= vocab:
        raise DataError(f"{where}: token id {index['max_token_id']} is beyond the model's "
                        f"{vocab} embeddings")
