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


def test_pack_has_no_padding_and_counts_domains():
    pieces = [("a", np.array([1, 2, 3, 0], np.int32)), ("b", np.array([4, 5, 0], np.int32)),
              ("a", np.array([6, 7, 8, 9, 0], np.int32))]
    rows, per_domain = D.pack(pieces, seq_len=4, seed=0)
    assert rows.shape == (3, 4)                       # 12 tokens, no tail
    assert sorted(rows.reshape(-1).tolist()) == sorted([1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 0])
    assert per_domain == {"a": 9, "b": 3}
    rows2, _ = D.pack(pieces, seq_len=4, seed=0)
    assert (rows == rows2).all()
    with pytest.raises(D.DataError, match="not one row"):
        D.pack(pieces[:1], seq_len=8, seed=0)


def src(**kw):
    return SourceConfig(**{"domain": "books", "weight": 1, "type": "files", "paths": ["x.jsonl"],
                           **kw})


def test_sample_repeats_short_source_within_max_epochs(tok):
    docs = ["the quick brown fox jumps over the lazy dog"] * 5
    per_doc = len(tok(docs[0], add_special_tokens=False)["input_ids"]) + 1
    s = D.sample_source(src(max_epochs=3), iter(docs), tok, target=per_doc * 8, val_tokens=1,
                        seed=0)
    assert len(s.val) == 1 and sum(map(len, s.train)) == per_doc * 8
    assert s.epochs == 2.0                            # 4 training docs read twice
    with pytest.raises(D.DataError, match=r"needs .* training tokens .* max_epochs 1.0"):
        D.sample_source(src(), iter(docs), tok, target=per_doc * 8, val_tokens=1, seed=0)
    with pytest.raises(D.DataError, match="no documents"):
        D.sample_source(src(), iter([]), tok, target=10, val_tokens=1, seed=0)


def test_mixture_proportions_within_two_points(tmp_path, tok):
    from stages.pretrain import build_dataset
    cfg = load_config(PretrainConfig, TINY)
    mixture = D.load_mixture(cfg.data.mixture)
    stats = build_dataset(cfg, mixture, tok, None, tmp_path / "a")
    assert stats["tokens"] == stats["rows"] * cfg.data.seq_len
    for domain, w in mixture.domain_weights().items():
        assert abs(stats["realized"][domain] - w) <= 0.02, domain
    assert abs(sum(stats["realized"].values()) - 1) < 1e-9
    assert 0 < stats["unigram_val_loss"] < np.log(len(tok))
    rows = D.read_rows(tmp_path / "a" / "train.parquet")
    assert rows.shape == (stats["rows"], 64) and rows.dtype == np.int32
    assert {p.stem for p in (tmp_path / "a" / "val").iterdir()} == set(mixture.domain_weights())
    build_dataset(cfg, mixture, tok, None, tmp_path / "b")   # same seed, same bytes
    assert (tmp_path / "a" / "train.parquet").read_bytes() == \
        (tmp_path / "b" / "train.parquet").read_bytes()


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
