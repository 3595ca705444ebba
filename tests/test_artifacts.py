import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.artifacts import (ArtifactError, ArtifactStore, DamagedArtifact, NotFound,
                              tree_digest, hash_tree)
from tests.conftest import REPO, put, write_files

FILES = {"model.safetensors": b"\x00\x01weights" * 100, "config.json": '{"a": 1}',
         "sub/tokenizer.json": "{}"}


def test_put_get_roundtrip_and_manifest_fields(store, tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNFLOW_FLOW_RUN_ID", "run-1234")
    art = put(store, tmp_path, FILES, kind="model", stage="pretrain", name="m",
              config={"optim": {"lr": 0.1}}, metrics={"val_loss": 2.0},
              command=["deepspeed", "--module", "stages.pretrain"], timings={"train_s": 1.5})
    got = store.get("m")
    assert got.digest == art.digest and len(art.digest) == 64
    m = got.manifest
    assert m["kind"] == "model" and m["stage"] == "pretrain"
    assert m["config"] == {"optim": {"lr": 0.1}} and m["metrics"] == {"val_loss": 2.0}
    assert m["flow_run_id"] == "run-1234" and m["timings"] == {"train_s": 1.5}
    assert m["command"][:2] == ["deepspeed", "--module"]
    assert set(m["files"]) == set(FILES)
    assert m["packages"]["torch"] and m["packages"]["python"]
    assert {"commit", "dirty"} <= set(m["code"]) and m["host"]["hostname"] and m["created"]
    assert (got.local_path() / "sub" / "tokenizer.json").read_text() == "{}"


def test_digest_is_content_only_and_stable(store, tmp_path):
    a = put(store, tmp_path, FILES, kind="model", name="m")
    b = put(store, tmp_path, FILES, kind="model", name="m", metrics={"x": 1})
    assert a.digest == b.digest
    assert [v.version for v in store.versions("m")] == [1]  # unchanged rerun: no new version
    renamed = dict(FILES)
    renamed["weights.safetensors"] = renamed.pop("model.safetensors")
    assert put(store, tmp_path, renamed, kind="model").digest != a.digest
    assert tree_digest(hash_tree(a.local_path())) == a.digest


@pytest.mark.parametrize("name", ["training_args.bin", "pytorch_model.bin", "opt.pt", "x.pkl",
                                  "sub/state.pickle"])
def test_a_model_artifact_holds_no_pickle(store, tmp_path, name):
    with pytest.raises(ArtifactError, match=f"{name}: a pickle"):
        put(store, tmp_path, {**FILES, name: b"\x80\x04"}, kind="model", name="m")
    assert store.versions("m") == []


def test_versions_and_references(store, tmp_path):
    d = [put(store, tmp_path, {"w": f"v{i}"}, kind="model", name="demo-ppo").digest
         for i in range(3)]
    assert [v.version for v in store.versions("demo-ppo")] == [1, 2, 3]
    assert store.resolve("demo-ppo") == store.resolve("demo-ppo@latest") == d[2]
    assert store.resolve("demo-ppo@1") == d[0]
    assert store.resolve(d[1][:10]) == d[1]
    with pytest.raises(NotFound, match="versions 1..3"):
        store.resolve("demo-ppo@7")
    with pytest.raises(NotFound, match="no artifact or model named 'nope'"):
        store.resolve("nope")
    # back to an older content makes a new version pointing at it
    put(store, tmp_path, {"w": "v0"}, kind="model", name="demo-ppo")
    assert store.resolve("demo-ppo@4") == d[0]


def test_ambiguous_prefix(store, tmp_path):
    digests = [put(store, tmp_path, {"w": str(i)}, kind="model").digest for i in range(40)]
    firsts = {}
    for dg in digests:
        firsts.setdefault(dg[:1], []).append(dg)
    shared = next(v for v in firsts.values() if len(v) > 1)  # 40 digests, 16 first chars
    common = os.path.commonprefix(shared)
    if len(common) >= 6:
        with pytest.raises(NotFound, match="ambiguous"):
            store.resolve(common)
    assert store.resolve(shared[0][:12]) == shared[0]


def test_parent_must_exist(store, tmp_path):
    with pytest.raises(NotFound):
        put(store, tmp_path, FILES, kind="model", parents=[{"role": "model", "digest": "ab" * 32}])


def test_bad_kind_and_name(store, tmp_path):
    with pytest.raises(ArtifactError, match="unknown artifact kind"):
        put(store, tmp_path, FILES, kind="weights")
    with pytest.raises(ArtifactError, match="model name"):
        put(store, tmp_path, FILES, kind="model", name="../evil")


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated or overwritten"),
    ("flip", "does not match its sha256"),
    ("missing", "file missing"),
    ("extra", "unexpected file"),
    ("manifest", "not valid JSON"),
])
def test_damaged_artifact_is_refused_naming_the_file(store, tmp_path, damage, message):
    art = put(store, tmp_path, FILES, kind="model", name="m")
    root = Path(store.base) / "artifacts" / art.digest
    target = root / "model.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-7])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[5] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "missing":
        target.unlink()
    elif damage == "extra":
        (root / "stray.bin").write_bytes(b"x")
        target = root / "stray.bin"
    elif damage == "manifest":
        (root / "manifest.json").write_text('{"digest": ')
        target = root / "manifest.json"
    with pytest.raises(DamagedArtifact, match=message) as e:
        store.get("m")
    assert str(target) in str(e.value)


def test_find_by_inputs_skips_damaged(store, tmp_path):
    art = put(store, tmp_path, FILES, kind="model", name="m", input_key="k1")
    assert store.find_by_inputs("k1").digest == art.digest
    assert store.find_by_inputs("k2") is None
    (Path(store.base) / "artifacts" / art.digest / "config.json").write_text("{}")
    assert store.find_by_inputs("k1") is None


def test_fsspec_memory_store(tmp_path):
    store = ArtifactStore(f"memory://alignflow-test-{os.getpid()}")
    a = put(store, tmp_path, FILES, kind="model", name="remote")
    b = put(store, tmp_path, {"w": "2"}, kind="model", name="remote",
            parents=[{"role": "model", "digest": a.digest}])
    assert store.resolve("remote@1") == a.digest and store.get("remote").parents[0]["digest"] \
        == a.digest
    local = b.local_path()  # downloaded into the local cache, digest checked
    assert (local / "w").read_text() == "2"
    # files uploaded but no manifest yet (a writer killed before the commit marker): invisible
    store.fs.pipe_file(f"{store.base}/artifacts/{'c' * 64}/w", b"partial")
    assert "c" * 64 not in store.digests()
    store.fs.pipe_file(f"{store.base}/artifacts/{a.digest}/model.safetensors", b"bad")
    with pytest.raises(DamagedArtifact, match="model.safetensors"):
        store.get("remote@1")


def test_staging_left_by_a_killed_writer_is_invisible_and_collected(store, tmp_path):
    put(store, tmp_path, FILES, kind="model", name="m")
    stale = Path(store.base) / "tmp" / "deadbeef0000-1234"
    write_files(stale, {"model.safetensors": b"half"})
    os.utime(stale, (0, 0))
    assert len(store.digests()) == 1
    assert store.gc(older_than_s=60) == [str(stale)]
    assert store.get("m")


WRITER = r"""
import os, sys, itertools
from pathlib import Path
from stages.artifacts import ArtifactStore
store = ArtifactStore(sys.argv[1])
src = Path(sys.argv[2])
for i in itertools.count():
    d = src / f"a{i}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(os.urandom(8 << 20))
    (d / "config.json").write_text(str(i))
    print("put", i, flush=True)
    store.put(d, kind="model", name="big", input_key=f"k{i}", move=i % 2 == 0)
"""


def test_writer_killed_at_any_point_leaves_store_consistent(store, tmp_path):
    """SIGKILL a writer at spread-out moments; every visible artifact and name must verify."""
    for n, delay in enumerate([0.3, 0.5, 0.8, 1.1, 1.5, 2.0]):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, store.root, str(tmp_path / f"s{n}")],
                                cwd=REPO, stdout=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        fresh = ArtifactStore(store.root)
        for digest in fresh.digests():
            fresh.get(digest)  # raises if anything half-written became visible
        for v in fresh.versions("big"):
            assert fresh.get(f"big@{v.version}").digest == v.digest
        for key_file in (Path(store.base) / "inputs").glob("*.json"):
            json.loads(key_file.read_text())  # never a torn index entry
    assert len(ArtifactStore(store.root).versions("big")) >= 1
