"""Content-addressed artifact store: the single source of truth for lineage.

Layout under the root (a local path or any fsspec URL):

    artifacts/<digest>/manifest.json   what it is, where it came from (written last)
    artifacts/<digest>/...             the files; digest = sha256 over their paths and hashes
    names/<name>/<version>.json        a name's version history, one immutable file per version
    inputs/<input_key>.json            stage inputs -> digest, so unchanged stages can be skipped
    tmp/                               staging; never read, swept by `gc`

An artifact exists once its manifest exists. On a local disk the whole directory is staged,
fsynced and renamed into place; on object stores the manifest is uploaded after every file, so a
writer killed at any point leaves either nothing visible or a complete artifact. Reads verify every
file against the manifest. Nothing here is a pickle, and nothing imports torch (flows use it).
"""

from __future__ import annotations

import ast
import errno
import fcntl
import getpass
import hashlib
import json
import os
import platform
import posixpath
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from stages.configfile import REPO_ROOT

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
KINDS = ("corpus", "tokenizer", "dataset", "model", "adapter")   # what the stages produce
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")   # never in a model
TRACKED_PACKAGES = ("alignflow", "torch", "transformers", "trl", "datasets", "tokenizers",
                    "deepspeed", "prefect", "pyarrow", "peft", "pydantic", "fsspec")
_CHUNK = 1 << 20
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")   # a model name: also a folder under names/


_VERIFIED_CACHE: set[str] = set()   # cached downloads this process has checked once


class ArtifactError(Exception):
    """Base for store errors; messages name the artifact and the file."""


class NotFound(ArtifactError):
    pass


class DamagedArtifact(ArtifactError):
    pass


def default_home() -> Path:
    return Path(os.environ.get("ALIGNFLOW_HOME", ".alignflow")).absolute()


def default_store_root() -> str:
    return os.environ.get("ALIGNFLOW_STORE") or str(default_home() / "store")


# --- hashing ------------------------------------------------------------------------------

def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_tree(root: str | Path) -> dict[str, dict]:
    """{relative posix path: {sha256, size}} for every file below root except the manifest."""
    root = Path(root)
    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != MANIFEST:
            files[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return files


def tree_digest(files: dict[str, dict]) -> str:
    # Paths are part of the digest: renaming a file changes the artifact.
    canon = json.dumps({k: files[k]["sha256"] for k in sorted(files)}, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def json_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"),
                                     default=str).encode()).hexdigest()


# --- provenance ---------------------------------------------------------------------------

def code_version(repo: str | Path | None = None) -> dict:
    """Git commit and dirty flag of the code that produced an artifact."""
    repo = Path(repo or REPO_ROOT)

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                              timeout=20).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD") or None
        dirty = bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"commit": commit, "dirty": dirty}


STAGES_DIR = Path(__file__).resolve().parent
# The module whose code decides each kind of input key (the tokenizer and packed dataset are
# built by functions of the pretrain stage).
KEY_MODULES = {"tokenizer": "pretrain", "dataset": "pretrain", "corpus": "corpus"}


def code_modules(module: str, root: Path = STAGES_DIR) -> list[str]:
    """`module` and every stages module it imports, directly or through others (any import
    statement, also inside a function), by reading the source, not by importing it."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        path = root / f"{name}.py"
        if name in seen or not path.is_file():
            continue
        seen.add(name)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                todo += [a.name.split(".")[1] for a in node.names
                         if a.name.startswith("stages.")]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if node.module == "stages":
                    todo += [a.name for a in node.names]
                elif node.module.startswith("stages."):
                    todo.append(node.module.split(".")[1])
    return sorted(seen)


def code_hashes(key_kind: str, root: Path = STAGES_DIR) -> dict[str, str]:
    """{module: sha256} of the code an input key of this kind depends on: the module that
    computes it and the stages modules it imports."""
    module = KEY_MODULES.get(key_kind) or key_kind.split("-")[0]
    return {m: sha256_file(root / f"{m}.py") for m in code_modules(module, root)}


def code_fingerprint(key_kind: str, root: Path = STAGES_DIR) -> str:
    """Digest of `code_hashes`. Editing ppo.py reruns PPO only; editing data.py reruns what
    reads data; editing a README, a flow or a module nobody imports reruns nothing."""
    return json_digest(code_hashes(key_kind, root))


# Fields that say where a run happens, not what it computes: they never bust the cache.
_NOT_INPUTS = (("run", "store"), ("run", "work_dir"), ("run", "log_every"), ("run", "force"),
               ("run", "flow_run_id"), ("data", "workers"), ("data", "executor"),
               ("deepspeed", "master_port"), ("deepspeed", "hostfile"))


def inputs_of(config: dict) -> dict:
    """The resolved config without the fields that only say where and by whom it runs."""
    cfg = json.loads(json.dumps(config))
    for section, key in _NOT_INPUTS:
        cfg.get(section, {}).pop(key, None)
    return cfg


def input_key(stage: str, config: dict, parents: list[dict]) -> str:
    """What decides a stage's output: its resolved config, its parents' digests, its code."""
    return json_digest({"stage": stage, "config": inputs_of(config),
                        "code": code_fingerprint(stage),
                        "parents": sorted((p["role"], p["digest"]) for p in parents)})


def package_versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def host_info() -> dict:
    return {"hostname": socket.gethostname(), "platform": platform.platform(),
            "user": getpass.getuser(), "cpus": os.cpu_count()}


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- the store ----------------------------------------------------------------------------

@dataclass
class Artifact:
    digest: str
    manifest: dict
    store: "ArtifactStore"

    @property
    def short(self) -> str:
        return self.digest[:12]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def stage(self) -> str | None:
        return self.manifest.get("stage")

    @property
    def parents(self) -> list[dict]:
        return self.manifest.get("parents", [])

    def local_path(self) -> Path:
        """A verified local directory with the files (downloaded first for remote stores)."""
        return self.store.local_path(self.digest)

    def __str__(self) -> str:
        return f"{self.kind} {self.short}"


@dataclass
class Version:
    name: str
    version: int
    digest: str
    created: str


class ArtifactStore:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = str(root or default_store_root())
        self.fs, self.base = fsspec.core.url_to_fs(self.root)
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            self.base = str(Path(self.base).absolute())

    def __repr__(self) -> str:
        return f"ArtifactStore({self.root!r})"

    def _p(self, *parts: str) -> str:
        return posixpath.join(self.base, *parts)

    def _dir(self, digest: str) -> str:
        return self._p("artifacts", digest)

    # -- writing ---------------------------------------------------------------------------

    def put(self, src: str | Path, *, kind: str, stage: str | None = None,
            name: str | None = None, parents: list[dict] | None = None,
            config: dict | None = None, datasets: dict | None = None,
            metrics: dict | None = None, timings: dict | None = None,
            command: list[str] | str | None = None, input_key: str | None = None,
            extra: dict | None = None, move: bool = False,
            flow_run_id: str | None = None) -> Artifact:
        """Store the files of directory `src` as one artifact and register it under `name`.

        parents: [{"role": "model", "digest": ...}]; every parent must already be in the store.
        input_key: the stage inputs' digest (see `find_by_inputs`).
        """
        if kind not in KINDS:
            raise ArtifactError(f"unknown artifact kind {kind!r}; allowed: {', '.join(KINDS)}")
        src = Path(src)
        if not src.is_dir():
            raise ArtifactError(f"{src}: artifact source must be a directory")
        links = sorted(p for p in src.rglob("*") if p.is_symlink())
        if links:
            # A link would store whatever it points at today (or a path outside the artifact).
            raise ArtifactError(f"{links[0]}: a symbolic link in an artifact source; copy the "
                                f"file it points to instead")
        if kind in ("model", "adapter"):
            pickles = sorted(p for p in src.rglob("*") if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise ArtifactError(
                    f"{pickles[0].relative_to(src)}: a pickle ({pickles[0].suffix}) in a {kind} "
                    f"artifact; loading it could run code. Store safetensors or JSON instead")
        parents = list(parents or [])
        for p in parents:
            self.get(p["digest"], verify=False)
        files = hash_tree(src)
        if not files:
            raise ArtifactError(f"{src}: no files to store")
        digest = tree_digest(files)
        manifest = {
            "schema_version": SCHEMA_VERSION, "digest": digest, "kind": kind, "stage": stage,
            "name": name, "files": files, "parents": parents, "config": config or {},
            "datasets": datasets or {}, "metrics": metrics or {}, "timings": timings or {},
            "command": command, "flow_run_id": flow_run_id or os.environ.get("ALIGNFLOW_FLOW_RUN_ID") or None,
            "input_key": input_key, "code": code_version(), "packages": package_versions(),
            "host": host_info(), "created": now_iso(), **(extra or {}),
        }
        if self._exists(digest):
            try:
                self.verify(digest)
            except ArtifactError as e:   # a damaged copy must not block this digest for ever
                where = self.quarantine(digest)
                print(f"[alignflow] {e}; moved to {where}, publishing again", file=sys.stderr)
        if not self._exists(digest):
            self._publish(src, digest, manifest, move)
        art = self.get(digest)
        if name:
            self._register(name, digest)
        if input_key:
            self.remember(input_key, digest)
        return art

    def remember(self, input_key: str, digest: str, detail: dict | None = None) -> None:
        """Record that these inputs gave this artifact (find_by_inputs reads it back);
        `detail`, what the inputs were, lets a later run say what changed."""
        self._write_atomic(self._p("inputs", f"{input_key}.json"), json.dumps(
            {"digest": digest, "created": now_iso(), **(detail or {})}).encode())

    def last_launch(self, stage: str, name: str) -> dict | None:
        """The newest launch record of this stage and model name (with its inputs)."""
        root = self._p("inputs")
        best = None
        for path in self.fs.glob(posixpath.join(root, "launch-*.json")) \
                if self.fs.exists(root) else []:
            try:
                rec = json.loads(self.fs.cat_file(path))
            except ValueError:
                continue
            if rec.get("stage") == stage and rec.get("name") == name and \
                    (best is None or rec["created"] >= best["created"]):
                best = rec
        return best

    def _exists(self, digest: str) -> bool:
        return self.fs.exists(posixpath.join(self._dir(digest), MANIFEST))

    def _publish(self, src: Path, digest: str, manifest: dict, move: bool) -> None:
        body = json.dumps(manifest, indent=2, sort_keys=True).encode()
        final = self._dir(digest)
        if self.local:
            if Path(final).exists():     # a directory without its manifest: damage, not data
                self.quarantine(digest)
            stage = Path(self._p("tmp", f"{digest[:12]}-{uuid.uuid4().hex[:8]}"))
            stage.parent.mkdir(parents=True, exist_ok=True)
            moved = False
            if move:
                try:
                    os.rename(src, stage)
                    moved = True
                except OSError as e:
                    # Equal st_dev is no promise: bind mounts (containers, k8s subPaths) share
                    # a device and still refuse a rename across them with EXDEV.
                    if e.errno != errno.EXDEV:
                        raise
            if not moved:
                shutil.copytree(src, stage, symlinks=True)
            (stage / MANIFEST).write_bytes(body)
            fsync_tree(stage)
            Path(final).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(stage, final)
            except OSError:  # a concurrent writer published the same content first
                shutil.rmtree(stage, ignore_errors=True)
                if not self._exists(digest):
                    raise
            _fsync_dir(Path(final).parent)
        else:
            for rel in manifest["files"]:
                self.fs.put_file(str(src / rel), posixpath.join(final, rel))
            # The manifest goes last: it is the commit marker readers look for.
            self.fs.pipe_file(posixpath.join(final, MANIFEST), body)

    def _write_atomic(self, path: str, data: bytes) -> None:
        if self.local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            write_durable(Path(path), data)
        else:
            self.fs.pipe_file(path, data)  # single-object writes are atomic on object stores

    def tag(self, name: str, ref: str) -> Version:
        """Make an existing artifact the latest version of `name` (no-op if it already is)."""
        return self._register(name, self.get(ref, verify=False).digest)

    def _register(self, name: str, digest: str) -> Version:
        _check_name(name)
        history = self.versions(name)
        if history and history[-1].digest == digest:
            return history[-1]  # an unchanged rerun is not a new version
        number = history[-1].version + 1 if history else 1
        while True:
            v = Version(name, number, digest, now_iso())
            if self._create_exclusive(self._p("names", name, f"{number:06d}.json"),
                                      json.dumps(v.__dict__).encode()):
                return v
            number += 1  # another writer took this number

    def _create_exclusive(self, path: str, data: bytes) -> bool:
        if self.local:
            p = Path(path)
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}")
            tmp.write_bytes(data)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            try:
                os.link(tmp, p)  # atomic and exclusive: a complete file or none
                return True
            except FileExistsError:
                return False
            finally:
                tmp.unlink()
        try:
            # Exclusive create where the filesystem has it (memory, s3 with If-None-Match):
            # two writers cannot both take one version number.
            with self.fs.open(path, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (NotImplementedError, ValueError, TypeError):
            pass
        if self.fs.exists(path):  # no exclusive create: best effort, a one-request window
            return False
        self.fs.pipe_file(path, data)
        return True

    def quarantine(self, digest: str) -> str:
        """Move a damaged artifact out of the way (kept for inspection, never read again)."""
        dest = self._p("quarantine", f"{digest}-{time.strftime('%Y%m%dT%H%M%S')}")
        if self.local:
            Path(dest).parent.mkdir(parents=True, exist_ok=True)
            os.rename(self._dir(digest), dest)
        else:
            self.fs.mv(self._dir(digest), dest, recursive=True)
        return dest

    def check_writable(self) -> None:
        """A clear error now rather than a traceback at the first write, hours later."""
        if not self.local:
            return
        base = Path(self.base)
        if base.exists() and not base.is_dir():
            raise ArtifactError(f"store {self.root} is a file, not a store directory")
        probe = base / "tmp" / f".probe-{uuid.uuid4().hex[:8]}"
        try:
            probe.parent.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ArtifactError(f"store {self.root} is not writable ({e.strerror}); give "
                                f"run.store a directory this user can write") from None

    def check_names(self) -> list[str]:
        """Problems under names/: unreadable version records, versions naming an artifact the
        store does not hold."""
        problems, have = [], set(self.digests())
        for name in self.names():
            try:
                history = self.versions(name)
            except ArtifactError as e:
                problems.append(str(e))
                continue
            problems += [f"{name}@{v.version} names artifact {v.digest[:12]}, which is not in "
                         f"the store" for v in history if v.digest not in have]
        return problems

    # -- locks -----------------------------------------------------------------------------

    def lock_path(self, name: str) -> Path:
        """Locks live in a local store itself (every home sharing it sees them); for an object
        store, in this machine's home."""
        root = Path(self.base) if self.local else default_home()
        return root / "locks" / f"{name}.lock"

    # -- reading ---------------------------------------------------------------------------

    def get(self, ref: str, verify: bool = True) -> Artifact:
        digest = self.resolve(ref)
        try:
            manifest = self._read_manifest(digest)
        except NotFound:
            if digest.startswith(ref.strip()):
                raise
            raise NotFound(f"'{ref}' names artifact {digest[:12]}, which is not in store "
                           f"{self.root} (removed, or the store was copied without it)") from None
        art = Artifact(digest, manifest, self)
        if verify:
            self.verify(digest, manifest)
        return art

    def _read_manifest(self, digest: str) -> dict:
        path = posixpath.join(self._dir(digest), MANIFEST)
        try:
            manifest = json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            raise NotFound(f"artifact {digest[:12]}: {path} not found") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise DamagedArtifact(f"artifact {digest[:12]}: {path} is not valid JSON ({e})") \
                from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise DamagedArtifact(f"artifact {digest[:12]}: {path} has no file list")
        if manifest.get("digest") != digest:
            raise DamagedArtifact(f"artifact {digest[:12]}: {path} names digest "
                                  f"{str(manifest.get('digest'))[:12]}, not its directory's")
        return manifest

    def verify(self, digest: str, manifest: dict | None = None) -> None:
        """Check every file against the manifest; raise DamagedArtifact naming the file."""
        manifest = manifest or self._read_manifest(digest)
        root = self._dir(digest)
        expected = manifest["files"]
        where = f"artifact {digest[:12]} ({manifest.get('kind')}, {manifest.get('name') or '-'})"
        actual = self._list_files(root)
        for rel in sorted(set(expected) - set(actual)):
            raise DamagedArtifact(f"{where}: file missing: {posixpath.join(root, rel)}")
        for rel in sorted(set(actual) - set(expected)):
            raise DamagedArtifact(f"{where}: unexpected file: {posixpath.join(root, rel)}")
        for rel, info in sorted(expected.items()):
            path = posixpath.join(root, rel)
            if actual[rel] != info["size"]:
                raise DamagedArtifact(f"{where}: file {path} has {actual[rel]} bytes, manifest "
                                      f"says {info['size']} (truncated or overwritten)")
            if self._sha256(path) != info["sha256"]:
                raise DamagedArtifact(f"{where}: file {path} does not match its sha256 in the "
                                      f"manifest (content changed)")
        if tree_digest(expected) != digest:
            raise DamagedArtifact(f"{where}: the manifest's file list does not hash to {digest}")

    def _list_files(self, root: str) -> dict[str, int]:
        out = {}
        for path, info in self.fs.find(root, detail=True).items():
            rel = posixpath.relpath(path, root)
            if rel != MANIFEST and info.get("type", "file") == "file":
                out[rel] = info["size"]
        return out

    def _sha256(self, path: str) -> str:
        if self.local:
            return sha256_file(path)
        h = hashlib.sha256()
        with self.fs.open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()

    def local_path(self, digest: str) -> Path:
        if self.local:
            return Path(self._dir(digest))
        cache = default_home() / "cache" / digest
        if digest in _VERIFIED_CACHE:
            return cache
        # One download per node: the ranks of a node share the cache, and without the lock
        # two of them race on the final rename (ENOTEMPTY killed the job).
        with exclusive(default_home() / "locks" / f"cache-{digest[:16]}.lock",
                       f"download of {digest[:12]}", lambda m: None):
            if (cache / MANIFEST).exists() and tree_digest(hash_tree(cache)) != digest:
                shutil.rmtree(cache)            # a damaged copy: fetch it again
            if not (cache / MANIFEST).exists():
                tmp = cache.with_name(f".{digest}.{uuid.uuid4().hex[:8]}")
                self.fs.get(self._dir(digest) + "/", str(tmp), recursive=True)
                if tree_digest(hash_tree(tmp)) != digest:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise DamagedArtifact(f"artifact {digest[:12]}: download does not match "
                                          f"digest")
                shutil.rmtree(cache, ignore_errors=True)   # a partial copy without manifest
                os.replace(tmp, cache)
        _VERIFIED_CACHE.add(digest)
        return cache

    # -- names and references --------------------------------------------------------------

    def resolve(self, ref: str) -> str:
        """name, name@latest, name@N, or a digest prefix (>= 6 hex chars) -> full digest."""
        ref = ref.strip()
        name, _, ver = ref.partition("@")
        if not NAME.fullmatch(name) or ".." in name:
            # Checked before the name becomes a path: 'a/../../x' must not walk the disk.
            if ref.endswith(".gguf") and os.path.isfile(ref) or any(
                    os.path.isfile(os.path.join(ref, f)) for f in ("config.json", "tokenizer.json")):
                # A path would train on bytes no manifest records (and that may change under
                # a cached run): the import hashes them once and becomes the lineage root.
                raise NotFound(f"'{ref}' is a path, not an artifact: import it first with "
                               f"`alignflow import {ref} --name NAME`, then use NAME")
            raise NotFound(f"'{ref}' is not a reference: use a model name (letters, digits, "
                           f"'.', '_', '-'), name@N, name@latest or a digest")
        if self.fs.exists(self._p("names", name)):
            history = self.versions(name)
            if not history:
                raise NotFound(f"model '{name}' has no versions")
            if ver in ("", "latest"):
                return history[-1].digest
            if not ver.isdigit():
                raise NotFound(f"'{ref}': version must be 'latest' or a number")
            for v in history:
                if v.version == int(ver):
                    return v.digest
            raise NotFound(f"'{ref}': {name} has versions 1..{history[-1].version}")
        if not ver and re.fullmatch(r"[0-9a-f]{6,64}", ref):
            hits = [d for d in self.digests() if d.startswith(ref)]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise NotFound(f"digest prefix '{ref}' is ambiguous: "
                               f"{', '.join(h[:12] for h in hits)}")
        raise NotFound(f"no artifact or model named '{ref}' in store {self.root}")

    def digests(self) -> list[str]:
        """The published artifacts: directories with their manifest."""
        return [d for d in self.directories() if self._exists(d)]

    def directories(self) -> list[str]:
        """Every artifact directory, with or without its manifest (for verify)."""
        root = self._p("artifacts")
        if not self.fs.exists(root):
            return []
        return sorted(b for p in self.fs.ls(root, detail=False)
                      if re.fullmatch(r"[0-9a-f]{64}", b := posixpath.basename(p.rstrip("/"))))

    def names(self) -> list[str]:
        root = self._p("names")
        if not self.fs.exists(root):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(root, detail=False))

    def versions(self, name: str) -> list[Version]:
        root = self._p("names", name)
        if not self.fs.exists(root):
            return []
        out = []
        for path in self.fs.ls(root, detail=False):
            if re.fullmatch(r"\d{6}\.json", posixpath.basename(path)):
                out.append(self._version(name, path))
        return sorted(out, key=lambda v: v.version)

    def _version(self, name: str, path: str) -> Version:
        try:
            v = Version(**json.loads(self.fs.cat_file(path)))
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            raise DamagedArtifact(f"model '{name}': version record {path} is damaged "
                                  f"({type(e).__name__}: {e}); remove it or restore it from "
                                  f"a backup") from None
        if not re.fullmatch(r"[0-9a-f]{64}", str(v.digest)) or v.name != name:
            raise DamagedArtifact(f"model '{name}': version record {path} does not name a "
                                  f"digest of {name}")
        return v

    def find_by_inputs(self, input_key: str) -> Artifact | None:
        """The artifact a stage produced from exactly these inputs, if it is still intact."""
        path = self._p("inputs", f"{input_key}.json")
        if not self.fs.exists(path):
            return None
        digest = json.loads(self.fs.cat_file(path))["digest"]
        try:
            return self.get(digest)
        except ArtifactError:
            return None  # damaged or removed: the stage must run again

    def gc(self, older_than_s: float = 3600) -> list[str]:
        """Remove staging left by killed writers (never touches published artifacts)."""
        root = self._p("tmp")
        if not self.fs.exists(root):
            return []
        removed, cutoff = [], time.time() - older_than_s
        for path in self.fs.ls(root, detail=False):
            mtime = os.stat(path).st_mtime if self.local else 0
            if mtime <= cutoff:
                self.fs.rm(path, recursive=True)
                removed.append(path)
        return removed


# --- one writer per key -------------------------------------------------------------------

def _holder() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()} since {now_iso()}"


def try_lock(path: Path) -> tuple[int | None, str]:
    """(fd, "") holding an exclusive flock on `path`, or (None, who holds it). The lock lasts
    as long as the fd is open, so a killed holder never leaves a stale lock behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        return None, holder
    _mark(fd)
    return fd, ""


def _mark(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, _holder().encode(), 0)


@contextmanager
def exclusive(path: Path, what: str, log: Callable[[str], None]) -> Iterator[None]:
    """Hold the lock at `path` for the block, waiting (and saying for whom) while another
    process holds it."""
    fd, holder = try_lock(path)
    if fd is None:
        log(f"{what}: {holder} is building the same thing; waiting for it (lock {path})")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        _mark(fd)
    try:
        yield
    finally:
        os.close(fd)


def staging_dir(kind: str, key: str) -> Path:
    """A fresh directory of this writer's own under ALIGNFLOW_HOME/tmp: two builds of one key
    never write into each other's files."""
    d = default_home() / "tmp" / f"{kind}-{key[:12]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    d.mkdir(parents=True)
    return d


def _stderr(msg: str) -> None:
    print(f"[alignflow] {msg}", file=sys.stderr, flush=True)


def build_once(store: ArtifactStore, kind: str, key: str, build: Callable[[Path], Artifact],
               force: bool = False, log: Callable[[str], None] = _stderr) -> Artifact:
    """The artifact these inputs gave before, else `build(staging)`, under a lock named by the
    key: two identical builds at once build once (the second waits, then reuses the first's
    artifact), each writer in a staging directory of its own, removed afterwards."""
    if not force and (hit := store.find_by_inputs(key)) is not None:
        return hit
    with exclusive(store.lock_path(f"{kind}-{key[:16]}"), f"{kind} {key[:12]}", log):
        if not force and (hit := store.find_by_inputs(key)) is not None:
            return hit
        out = staging_dir(kind, key)
        try:
            return build(out)
        finally:
            shutil.rmtree(out, ignore_errors=True)


def _check_name(name: str) -> None:
    if not NAME.fullmatch(name):
        raise ArtifactError(f"model name {name!r}: use letters, digits, '.', '_' and '-'")


def write_durable(path: Path, data: bytes) -> None:
    """Replace `path` atomically with `data`, on disk (file and directory entry) on return:
    readers see the old bytes or the new, never a part, also after a power cut."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def fsync_tree(root: Path) -> None:
    """Every file and directory below `root` (and root) on disk; nothing when it is absent."""
    if not root.exists():
        return
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        _fsync_dir(d)


def _fsync_dir(d: Path) -> None:
    if sys.platform == "win32":
        return
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
