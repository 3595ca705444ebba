import json
import os
import re
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


def test_ranks_filling_the_download_cache_at_once_do_not_race(tmp_path, monkeypatch):
    # Before: every rank downloaded and os.replace'd into the same cache folder; the loser of
    # the race died with ENOTEMPTY.
    import threading
    from stages import artifacts as A
    store = ArtifactStore(f"memory://alignflow-cache-{os.getpid()}")
    art = put(store, tmp_path, FILES, kind="model", name="remote")
    real_get, downloads = store.fs.get, []

    def slow_get(*a, **kw):
        downloads.append(1)
        time.sleep(0.3)                  # the window in which another rank arrives
        return real_get(*a, **kw)
    monkeypatch.setattr(store.fs, "get", slow_get)
    errors, paths = [], []

    def rank():
        try:
            paths.append(store.local_path(art.digest))
        except Exception as e:       # noqa: BLE001 - what the test looks for
            errors.append(e)
    threads = [threading.Thread(target=rank) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(paths)) == 1 and len(downloads) == 1
    # a cached copy damaged on disk is fetched again, not trusted
    A._VERIFIED_CACHE.clear()
    (paths[0] / "config.json").write_text("rot")
    assert (store.local_path(art.digest) / "config.json").read_text() == '{"a": 1}'
    assert len(downloads) == 2


def test_two_writers_cannot_take_one_version_number_on_an_object_store(tmp_path, monkeypatch):
    # Before: exists() then pipe_file(), so two writers that both looked first both wrote. Now
    # the write itself is the conditional create the filesystem offers (mode "xb").
    store = ArtifactStore(f"memory://alignflow-versions-{os.getpid()}")
    path = f"{store.base}/names/m/000001.json"
    modes, real_open = [], store.fs.open
    monkeypatch.setattr(store.fs, "open", lambda p, mode="rb", **kw: (
        modes.append(mode), real_open(p, mode, **kw))[1])
    assert store._create_exclusive(path, b'{"first": 1}') is True and modes == ["xb"]
    assert store._create_exclusive(path, b'{"second": 2}') is False
    assert store.fs.cat_file(path) == b'{"first": 1}'


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


def test_a_damaged_copy_does_not_block_its_digest(store, tmp_path):
    # Before: put saw the manifest, skipped publishing, and then raised on every later put.
    art = put(store, tmp_path, FILES, kind="model", name="m")
    (Path(store.base) / "artifacts" / art.digest / "model.safetensors").write_bytes(b"rot")
    again = put(store, tmp_path, FILES, kind="model", name="m")
    assert again.digest == art.digest and store.get("m").digest == art.digest    # verified
    (kept,) = (Path(store.base) / "quarantine").iterdir()
    assert kept.name.startswith(art.digest) and (kept / "model.safetensors").read_bytes() == b"rot"


@pytest.mark.parametrize("damage", ["garbage", "dangling", "no-manifest"])
def test_damage_under_names_is_named_and_seen_by_verify(pipeline_store, capsys, damage):
    from flows.cli import main
    store, arts = pipeline_store
    names = Path(store.base) / "names"
    if damage == "garbage":
        (names / "demo-rm" / "000002.json").write_text("{not json")
        want = "version record"
    elif damage == "dangling":
        (names / "demo-rm" / "000002.json").write_text(json.dumps(
            {"name": "demo-rm", "version": 2, "digest": "ab" * 32, "created": "now"}))
        want = "which is not in"
    else:
        (Path(store.base) / "artifacts" / arts["rm"].digest / "manifest.json").unlink()
        want = "which is not in|manifest.json not found"
    # a stage resolving the name gets an error naming the problem, not a traceback
    with pytest.raises(ArtifactError, match=want):
        store.get("demo-rm")
    # the listing still shows every other model, and says what is wrong with this one
    code = main(["--store", store.root, "models"])
    out, err = capsys.readouterr()
    assert code == 1 and "demo-sft" in out and "demo-ppo" in out and re.search(want, err)
    code = main(["--store", store.root, "verify"])
    out, _ = capsys.readouterr()
    assert code == 1 and "DAMAGED" in out and re.search(want, out)
    code = main(["--store", store.root, "lineage", "demo-ppo"])
    _, err = capsys.readouterr()
    assert code in (0, 2) and "Traceback" not in err


def test_verify_quarantines_on_request(store, tmp_path, capsys):
    from flows.cli import main
    art = put(store, tmp_path, FILES, kind="model", name="m")
    (Path(store.base) / "artifacts" / art.digest / "config.json").write_text("{}")
    assert main(["--store", store.root, "verify", "--quarantine"]) == 1
    assert "moved to" in capsys.readouterr().out
    assert not (Path(store.base) / "artifacts" / art.digest).exists()
    assert main(["--store", store.root, "verify"]) == 1      # the name now points at nothing
    put(store, tmp_path, FILES, kind="model", name="m")       # a rerun republishes it
    assert main(["--store", store.root, "verify"]) == 0


@pytest.mark.parametrize("ref", ["../names/m", "a/b", "..", "m@../1", "/etc/passwd"])
def test_references_are_checked_before_they_touch_a_path(store, tmp_path, ref):
    put(store, tmp_path, FILES, kind="model", name="m")
    with pytest.raises(NotFound, match="not a reference|version must be"):
        store.resolve(ref)


def test_a_symlink_in_an_artifact_source_is_refused(store, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    with pytest.raises(ArtifactError, match="model.safetensors: a symbolic link"):
        store.put(src, kind="model")


def test_a_move_across_a_bind_mount_falls_back_to_a_copy(store, tmp_path, monkeypatch):
    # A bind mount shares st_dev and still refuses rename with EXDEV (containers, k8s subPaths).
    import errno
    real = os.rename

    def rename(a, b):
        if "src-" in str(a):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real(a, b)
    monkeypatch.setattr(os, "rename", rename)
    art = put(store, tmp_path, FILES, kind="model", name="m", move=True)
    assert store.get("m").digest == art.digest


def test_a_read_only_store_is_said_so_before_any_work(tmp_path, monkeypatch):
    import errno

    def read_only(self, *a, **kw):
        raise OSError(errno.EROFS, "Read-only file system", str(self))
    monkeypatch.setattr(Path, "mkdir", read_only)      # a read-only mount, as root sees it too
    with pytest.raises(ArtifactError, match=r"store .*ro is not writable \(Read-only file system\)"):
        ArtifactStore(tmp_path / "ro").check_writable()
    monkeypatch.undo()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="is a file"):
        ArtifactStore(tmp_path / "file").check_writable()


def test_each_key_fingerprints_only_the_code_it_runs(tmp_path):
    # Before: every key hashed all of stages/*.py: a comment in ppo.py retrained the corpus,
    # pretraining, SFT and the RM.
    import shutil
    from stages.artifacts import STAGES_DIR, code_fingerprint
    for f in STAGES_DIR.glob("*.py"):
        shutil.copy(f, tmp_path / f.name)
    kinds = ["corpus", "examples-sft", "tokenizer", "dataset", "pretrain", "sft", "rm", "ppo"]

    def changed_by(module: str) -> set[str]:
        before = {k: code_fingerprint(k, tmp_path) for k in kinds}
        with open(tmp_path / f"{module}.py", "a") as f:
            f.write("\n# an edited comment\n")
        return {k for k in kinds if code_fingerprint(k, tmp_path) != before[k]}
    assert changed_by("ppo") == {"ppo"}
    assert changed_by("losses") == {"ppo"}
    assert changed_by("sft") == {"sft"}
    assert changed_by("pretrain") == {"pretrain", "tokenizer", "dataset"}
    assert changed_by("data") == set(kinds) - {"corpus"}
    assert changed_by("lineage") == set()          # read by the CLI, not by any stage
    assert changed_by("artifacts") == set(kinds)
