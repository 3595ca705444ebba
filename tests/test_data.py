import numpy as np
import pytest
import yaml

from stages import data as D
from stages import engine as E
from stages.config import OptimConfig, PretrainConfig
from stages.configfile import ConfigError, load_config
from stages.datacfg import SourceConfig
from stages.model import flops_per_token
from tests.conftest import REPO

TINY = REPO / "configs" / "tiny" / "pretrain.yaml"


@pytest.fixture(scope="module")
def tok():
    mixture = D.load_mixture(REPO / "datasets_cfg" / "tiny_mixture.yaml")
    texts = (d for s in mixture.sources for d in D.source_documents(s, 0))
    return D.train_tokenizer(texts, 400)


def test_tokenizer_reserves_special_tokens(tok):
    assert tok.eos_token == D.EOS and tok.pad_token == D.PAD
    assert all(tok.convert_tokens_to_ids(t) is not None for t in D.CHAT_TOKENS)
    ids = tok("def f(x): return x", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == "def f(x): return x"  # byte-level: lossless
    with pytest.raises(ConfigError, match="smaller than the 256 byte tokens"):
        D.train_tokenizer(iter(["x"]), 100)


def test_shard_writer_packs_rows_without_padding_and_counts_domains(tmp_path):
    from stages import tokens as T
    w = T.ShardWriter(tmp_path, seq_len=4, rows_per_shard=2, dtype=np.dtype(np.uint16), vocab=16)
    w.add(np.array([1, 2, 3, 0], np.uint16), "a")
    w.add(np.array([4, 5, 0], np.uint16), "b")
    w.add(np.array([6, 7, 8, 9, 0, 10, 11], np.uint16), "a")   # 14 tokens: 3 rows + a tail of 2
    shards = w.close()
    assert [s["rows"] for s in shards] == [2, 1]              # written as they filled
    assert shards[0]["tokens_per_domain"] == {"a": 5, "b": 3}
    assert shards[1]["tokens_per_domain"] == {"a": 4}          # the tail is not counted
    rows = T.TokenRows(tmp_path, shards, 4, "uint16")
    assert len(rows) == 3 and rows[[0, 1, 2]].dtype == np.int64
    assert rows[[0, 1, 2]].reshape(-1).tolist() == [1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 0]
    assert rows[[2, 0]].tolist() == [[7, 8, 9, 0], [1, 2, 3, 0]]
    assert w.counts[0] == 3 and w.max_id == 9
    with pytest.raises(IndexError):
        rows[[3]]


def test_a_shard_that_does_not_match_its_index_is_refused(tmp_path):
    from stages import tokens as T
    w = T.ShardWriter(tmp_path, seq_len=4, rows_per_shard=2, dtype=np.dtype(np.uint16), vocab=16)
    w.add(np.arange(8, dtype=np.uint16), "a")
    shards = w.close()
    np.save(tmp_path / shards[0]["file"], np.zeros((1, 4), np.uint16))   # a row lost
    with pytest.raises(D.DataError, match=r"train/00000.npy: shard holds \(1, 4\) uint16, the "
                       r"index says \(2, 4\)"):
        T.TokenRows(tmp_path, shards, 4, "uint16")
    (tmp_path / shards[0]["file"]).unlink()
    with pytest.raises(D.DataError, match="shard missing"):
        T.TokenRows(tmp_path, shards, 4, "uint16")


def test_token_dtype_fits_the_vocabulary():
    from stages import tokens as T
    assert T.token_dtype(8192) == np.uint16 and T.token_dtype(65536) == np.uint16
    assert T.token_dtype(65537) == np.uint32 and T.token_dtype(100, "uint32") == np.uint32
    with pytest.raises(D.DataError, match=r"uint16 cannot hold a vocabulary of 128,256 tokens"):
        T.token_dtype(128_256, "uint16")


def test_a_dataset_of_another_tokenizer_is_refused():
    from stages import tokens as T
    index = {"tokenizer": "a" * 64, "max_token_id": 511}
    T.check_fits(index, "a" * 64, 512, "dataset x")
    with pytest.raises(D.DataError, match="built with tokenizer aaaaaaaaaaaa, the model reads "
                       "tokenizer bbbbbbbbbbbb"):
        T.check_fits(index, "b" * 64, 512, "dataset x")
    with pytest.raises(D.DataError, match="token id 511 is beyond the model's 500 embeddings"):
        T.check_fits(index, "a" * 64, 500, "dataset x")


def src(**kw):
    return SourceConfig(**{"domain": "books", "weight": 1, "type": "files", "paths": ["x.jsonl"],
                           **kw})


def test_sample_repeats_short_source_within_max_epochs():
    lens = np.full(5, 10)                             # five documents of 10 tokens
    order = np.array([4, 2, 0, 1, 3])
    p = D.sample_plan(src(max_epochs=3), lens, order, target=80, val_tokens=1, seed=0)
    assert p.val.tolist() == [4]                      # held out first, whole
    assert p.train_lens.sum() == 80 and 4 not in p.train_docs
    assert p.train_docs[:4].tolist() == [2, 0, 1, 3]  # first pass in the given order
    assert sorted(p.train_docs[4:].tolist()) == [0, 1, 2, 3]   # second pass, reshuffled
    assert p.epochs == 2.0                            # 4 training docs read twice
    cut = D.sample_plan(src(max_epochs=3), lens, order, target=25, val_tokens=1, seed=0)
    assert cut.train_lens.tolist() == [10, 10, 5]     # the last document is cut at the target
    with pytest.raises(D.DataError, match=r"needs 80 training tokens .* max_epochs 1.0"):
        D.sample_plan(src(), lens, order, target=80, val_tokens=1, seed=0)
    with pytest.raises(D.DataError, match="no documents"):
        D.sample_plan(src(), lens[:0], order[:0], target=10, val_tokens=1, seed=0)
    # a stream that was not read to the end is not an error: it stopped at what it needed
    open_ended = D.sample_plan(src(), lens, order, target=30, val_tokens=1, seed=0,
                               exhausted=False)
    assert open_ended.epochs is None and open_ended.train_lens.sum() == 30


def build(tmp_path, tok, name, *overrides):
    from stages.pretrain import build_dataset
    cfg = load_config(PretrainConfig, TINY, list(overrides))
    out = tmp_path / name
    stats = build_dataset(cfg, D.load_mixture(cfg.data.mixture), tok, None, out)
    return cfg, stats, out


def test_mixture_proportions_within_two_points(tmp_path, tok):
    from stages import tokens as T
    cfg, stats, out = build(tmp_path, tok, "a", "data.shard_tokens=8192", "data.workers=2")
    mixture = D.load_mixture(cfg.data.mixture)
    assert stats["tokens"] == stats["rows"] * cfg.data.seq_len
    for domain, w in mixture.domain_weights().items():
        assert abs(stats["realized"][domain] - w) <= 0.02, domain
    assert abs(sum(stats["realized"].values()) - 1) < 1e-9
    assert 0 < stats["unigram_val_loss"] < np.log(len(tok))
    index, rows, val = T.open_dataset(out)
    assert len(rows) == stats["rows"] and index["dtype"] == "uint16"
    assert len(index["shards"]) == -(-stats["rows"] // (8192 // 64)) > 1   # shards as they fill
    assert sum(sum(s["tokens_per_domain"].values()) for s in index["shards"]) == stats["tokens"]
    assert set(val) == set(mixture.domain_weights())
    assert all(set(v) == {"documents", "epochs", "tokens"} for v in stats["sources"].values())


def test_the_dataset_is_the_same_for_any_worker_count_and_unit_size(tmp_path, tok, monkeypatch):
    from stages import pretrain as P
    _, _, one = build(tmp_path, tok, "one", "data.workers=1")
    monkeypatch.setattr(P, "UNIT_BYTES", 20_000)      # tiny files split into many tasks
    _, _, two = build(tmp_path, tok, "two", "data.workers=2")
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files)
    _, _, seeded = build(tmp_path, tok, "seed", "data.workers=2", "run.seed=7")
    assert (seeded / "train/00000.npy").read_bytes() != (one / "train/00000.npy").read_bytes()


def test_a_large_jsonl_file_splits_on_line_boundaries(tmp_path):
    from stages import tokens as T
    f = tmp_path / "d.jsonl"
    texts = [f"document {i} " + "x" * (i % 7) for i in range(200)]
    f.write_text("".join(f'{{"text": "{t}"}}\n' for t in texts))
    units = T.file_units(0, [f], "text", "books", unit_bytes=500)
    assert len(units) > 5
    assert [t for u in units for t in T.unit_texts(u)] == texts
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n' * 60 + '{"text": 7}\n')
    with pytest.raises(D.DataError, match=r"bad.jsonl:61: field 'text' must be text"):
        [t for u in T.file_units(0, [bad], "text", "books", 300) for t in T.unit_texts(u)]


def test_a_stream_stops_at_the_tokens_it_needs(tmp_path, tok):
    from stages import tokens as T
    said = []

    def stream():
        for i in range(1000):
            said.append(i)
            yield f"streamed document number {i}"
    ended = T.write_stream(stream(), tok, tmp_path / "s.ds", val_tokens=20, target=100)
    toks = T.SourceTokens([T.TokenFile(tmp_path / "s.ds")])
    assert not ended and len(said) < 1000             # stopped early, not read to the end
    p = D.sample_plan(src(), toks.lens, np.arange(len(toks.lens)), 100, 20, 0, exhausted=ended)
    assert p.train_lens.sum() == 100
    assert toks.read(0, int(toks.lens[0]))[-1] == tok.eos_token_id
    assert T.write_stream(iter(["one", "two"]), tok, tmp_path / "e.ds", 1, 10_000)   # ended


def test_mixture_file_errors(tmp_path):
    bad = tmp_path / "m.yaml"
    bad.write_text(yaml.safe_dump({"name": "m", "sources": [
        {"domain": "a", "weight": 0, "type": "files", "paths": ["x"]},
        {"domain": "b", "weight": 1, "type": "hub"},
        {"domain": "c", "weight": 1, "type": "ftp"}]}))
    with pytest.raises(ConfigError) as e:
        D.load_mixture(bad)
    msg = str(e.value)
    assert str(bad) in msg and "sources.0.weight" in msg and "greater than 0" in msg
    assert "needs dataset" in msg and "sources.2.type" in msg and "'hub', 'files'" in msg
    with pytest.raises(ConfigError, match="mixture file not found"):
        D.load_mixture(tmp_path / "none.yaml")


def test_missing_files_and_absent_text_field(tmp_path):
    with pytest.raises(D.DataError, match="no files match"):
        D.source_files(src(paths=[str(tmp_path / "*.jsonl")]))
    f = tmp_path / "d.jsonl"
    f.write_text('{"body": "x"}\n')
    with pytest.raises(D.DataError, match=r"d.jsonl:1: no field 'text'.*fields: body"):
        list(D.source_documents(src(paths=[str(f)]), 0))


# Bad file contents, by class: each one an error naming the file and line, never a raw
# UnicodeDecodeError, JSONDecodeError or a number trained on as its repr.
BAD_CONTENTS = [
    ("d.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n', r"d.jsonl:2: not UTF-8 text"),
    ("d.jsonl", b'{"text": "fine"}\n{"text": "cut\n', r"d.jsonl:2: not valid JSON"),
    ("d.jsonl", b'["text", "a list"]\n', r"d.jsonl:1: each line must be a JSON object, got list"),
    ("d.jsonl", b'{"text": 42}\n', r"d.jsonl:1: field 'text' must be text, got int 42"),
    ("d.jsonl", b'{"text": {"nested": "x"}}\n', r"d.jsonl:1: field 'text' must be text, got dict"),
    ("d.txt", b"line one\nline \xff two\n", r"d.txt:2: not UTF-8 text"),
    ("d.parquet", b"PAR1 this is not parquet", r"d.parquet: not a readable parquet file"),
]


@pytest.mark.parametrize("name, content, message", BAD_CONTENTS)
def test_bad_file_contents_name_the_file_and_line(tmp_path, name, content, message):
    f = tmp_path / name
    f.write_bytes(content)
    with pytest.raises(D.DataError, match=message):
        list(D.source_documents(src(paths=[str(f)]), 0))


def test_a_parquet_text_column_of_numbers_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "n.parquet")
    with pytest.raises(D.DataError, match=r"n.parquet: column 'text' must be text, its type is int64"):
        list(D.source_documents(src(paths=[str(tmp_path / "n.parquet")]), 0))


def test_batch_rows_cover_each_epoch_once_across_ranks():
    n_rows, mb, accum, world = 24, 2, 3, 2
    seen = []
    for step in range(2):                             # 2 steps x 12 rows = one epoch
        for micro in range(accum):
            for rank in range(world):
                d = E.Dist(rank, world, rank, None)
                seen += E_rows(step, micro, accum, mb, d, n_rows).tolist()
    assert sorted(seen) == list(range(n_rows))
    d0 = E.Dist(0, world, 0, None)
    assert (E_rows(5, 1, accum, mb, d0, n_rows) == E_rows(5, 1, accum, mb, d0, n_rows)).all()


def E_rows(step, micro, accum, mb, d, n_rows):
    from stages.pretrain import batch_rows
    return batch_rows(step, micro, accum, mb, d, n_rows, seed=7)


def test_lr_schedule_warmup_then_cosine_to_floor():
    f = E.lr_lambda(OptimConfig(warmup_steps=4, min_lr_ratio=0.1), max_steps=104)
    assert f(0) == pytest.approx(0.2) and f(3) == pytest.approx(0.8)
    assert f(4) == pytest.approx(1.0)
    assert f(54) == pytest.approx(0.55)               # half way: (1 + 0.1) / 2
    assert f(104) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_flops_per_token():
    # 6N + 12 L H T for N=1e6, L=2, H=64, T=128
    assert flops_per_token(1_000_000, 2, 64, 128) == 6_000_000 + 12 * 2 * 64 * 128


def test_training_curves_png(tmp_path):
    import json as _json
    from stages import plots
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(_json.dumps({"step": s, "train/loss": 3 - s / 10, "rl/kl": s / 100})
                           + "\n" for s in range(1, 6)))
    out = plots.curves(log, tmp_path / "c.png", "test")
    assert out.read_bytes()[:4] == b"\x89PNG"
    log.write_text(_json.dumps({"step": 1, "train/loss": 1.0}) + "\n")   # one point: nothing to draw
    assert plots.curves(log, tmp_path / "d.png", "test") is None


def test_a_rank_that_dies_of_a_bug_releases_its_shared_memory(tmp_path, monkeypatch):
    # A traceback keeps its traceback, but the rank's DeepSpeed buffer must not outlive it.
    from stages import proc
    monkeypatch.setattr(proc, "SHM_DIR", tmp_path)
    monkeypatch.setenv("MASTER_PORT", "39999")
    monkeypatch.setenv("RANK", "1")
    mine = tmp_path / "deepspeed_allreduce_buffer_0_39999_1"
    other = tmp_path / "deepspeed_allreduce_buffer_0_39999_0"
    mine.write_bytes(b"x")
    other.write_bytes(b"x")

    def bug():
        raise KeyError("a bug")
    with pytest.raises(KeyError, match="a bug"):
        E.run(bug)
    assert not mine.exists() and other.exists()
