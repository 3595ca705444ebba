"""Corpus builder, offline: readers on literal inputs, a .deb built here, and a whole build from
Python's standard library with a missing optional source and its fallback."""
import gzip
import io
import json
import tarfile

import pytest
import yaml

from stages import corpus as C
from stages.artifacts import ArtifactStore
from stages.configfile import ConfigError, DataError


def ex(**kw):
    return C.Extract(**{"members": ["*"], **kw})


def test_readers():
    rows = b'{"type": "c4", "text": "kept"}\n{"type": "owt", "text": "dropped"}\n'
    assert list(C.read("a.jsonl", rows, ex(reader="jsonl", where={"type": "c4"}))) == ["kept"]
    assert list(C.read("b", b"The/at jury/nn said/vbd ``/`` no/at ''/'' ./.",
                       ex(reader="brown"))) == ['The jury said " no ".']
    pod = b"=head1 NAME\n\n=head2 How do I B<bold> C<code>?\n\nLike I<this>.\n\n=head2 Two?\n\nYes."
    assert [d.split()[0:4] for d in C.read("f.pod", pod, ex(reader="pod"))] == \
        [["How", "do", "I", "bold"], ["Two?", "Yes."]]
    mail = json.dumps({"text": "Subject: Re: hello\nFrom: a@b\n\nbody text\n"}).encode()
    assert [d.strip() for d in C.read("m.json", mail, ex(reader="email", subject="^Re:"))] == \
        ["body text"]
    assert list(C.read("m.json", mail, ex(reader="email", subject="^(?!Re:)"))) == []
    fact = json.dumps({"Intro": {"Background": {"text": "<p>An island.</p>"}}}).encode()
    assert list(C.read("je.json", fact, ex(reader="factbook"))) == ["An island."]
    assert list(C.read("x.gz", gzip.compress(b"zipped"), ex(reader="gzip_text"))) == ["zipped"]


def test_normalize_and_split():
    assert C.normalize("a\r\nb  \n\n\n\n\x07c\u0065\u0301") == "a\nb\n\nc\u00e9"
    parts = C.split_paragraphs("\n\n".join(["x" * 40] * 5), limit=100)
    assert all(len(p) <= 100 for p in parts) and "".join(parts).count("x") == 200
    assert C.split_paragraphs("y" * 250, limit=100) == ["y" * 100, "y" * 100, "y" * 50]


def make_deb(path, files: dict[str, bytes]):
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:gz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    out = b"!<arch>\n"
    for name, blob in (("debian-binary", b"2.0\n"), ("data.tar.gz", data.getvalue())):
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(blob):<10}`\n".encode() + blob
        out += b"\n" if len(blob) % 2 else b""
    path.write_bytes(out)


def test_deb_members_without_dpkg(tmp_path):
    deb = tmp_path / "pkg_1.0_all.deb"
    make_deb(deb, {"usr/share/doc/a.txt": b"alpha", "usr/share/doc/b.bin": b"beta"})
    got = list(C.members(deb, ex(reader="text", members=["usr/share/doc/*.txt"])))
    assert got == [("usr/share/doc/a.txt", b"alpha")]


def recipe(tmp_path, sources):
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump({"name": "stdlib-corpus", "min_chars": 50, "max_doc_chars": 4000,
                                 "sources": sources}))
    return p


STDLIB = {"name": "stdlib", "domain": "github", "license": "PSF-2.0", "fetch": {"via": "stdlib"},
          "extract": {"reader": "text", "members": ["json/*.py", "email/*.py"]}}
MISSING = {"name": "faq", "domain": "stackexchange", "license": "x", "optional": True,
           "fetch": {"via": "apt", "spec": "no-such-package"},
           "extract": {"reader": "text", "members": ["*"]}}
FALLBACK = {"name": "faq-fallback", "domain": "stackexchange", "license": "PSF-2.0",
            "fallback": True, "fetch": {"via": "stdlib"},
            "extract": {"reader": "text", "members": ["pydoc_data/topics.py"]}}


def test_build_offline_with_fallback_is_deterministic(tmp_path, monkeypatch):
    def unavailable(f, dest):
        raise C.Unavailable("apt-get is not installed")
    monkeypatch.setattr(C, "_download", unavailable)
    store = ArtifactStore(tmp_path / "store")
    path = recipe(tmp_path, [STDLIB, MISSING, FALLBACK])
    lines = []
    art = C.build_corpus(path, store, log=lines.append)
    stats = art.manifest["corpus_stats"]
    assert stats["missing"] == {"faq": "apt-get is not installed"}
    assert stats["fallbacks_used"] == ["faq-fallback"]
    assert any("using fallback faq-fallback" in l for l in lines)
    assert set(stats["domains"]) == {"github", "stackexchange"}
    docs = [json.loads(l)["text"] for l in
            (art.local_path() / "github" / "stdlib.jsonl").read_text().splitlines()]
    assert docs and all(50 <= len(d) <= 4000 for d in docs) and len(set(docs)) == len(docs)
    assert {s["name"] for s in art.manifest["sources"]} == {"stdlib", "faq-fallback"}
    assert C.build_corpus(path, store).digest == art.digest          # reused: unchanged recipe
    again = C.build_corpus(path, store, force=True)                  # rebuilt: same bytes
    assert again.digest == art.digest


def test_required_source_missing_and_recipe_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "_download", lambda f, d: (_ for _ in ()).throw(
        C.Unavailable("npm is not installed")))
    req = {**MISSING, "optional": False, "fetch": {"via": "npm", "spec": "x@1", "sha256": "ab"}}
    with pytest.raises(ConfigError, match=r"source faq \(npm x@1\): npm is not installed"):
        C.build_corpus(recipe(tmp_path, [req]), ArtifactStore(tmp_path / "s"))
    unpinned = {**MISSING, "fetch": {"via": "pip", "spec": "evals==3"}}
    with pytest.raises(ConfigError, match="needs a pinned sha256"):
        C.load_recipe(recipe(tmp_path, [unpinned]))
    nothing = {**STDLIB, "extract": {"reader": "text", "members": ["no/such/*.py"]}}
    with pytest.raises(ConfigError, match="no documents extracted"):
        C.build_corpus(recipe(tmp_path, [nothing]), ArtifactStore(tmp_path / "s"))


def test_a_reader_that_does_not_fit_its_files_is_named(tmp_path):
    # Python sources read as JSON lines: the recipe is wrong, and the error says which part.
    wrong = {**STDLIB, "extract": {"reader": "jsonl", "members": ["json/__init__.py"],
                                   "field": "text"}}
    with pytest.raises(DataError, match=r"__init__.py:\d+: not valid JSON"):
        C.build_corpus(recipe(tmp_path, [wrong]), ArtifactStore(tmp_path / "s"))
    wrong = {**STDLIB, "extract": {"reader": "json", "members": ["json/tool.py"]}}
    with pytest.raises(DataError, match=r"source stdlib: reader 'json' does not fit member "
                                        r"json/tool.py"):
        C.build_corpus(recipe(tmp_path, [wrong]), ArtifactStore(tmp_path / "s"))


def test_a_malformed_recipe_is_a_config_error(tmp_path, capsys):
    bad = tmp_path / "r.yaml"
    bad.write_text("name: x\nsources: [\n  - {a: 1\n")
    assert C.main(["--config", str(bad), "--store", str(tmp_path / "s")]) == 2
    assert f"{bad}: not valid YAML" in capsys.readouterr().err


def test_pinned_hash_mismatch_is_refused(tmp_path, monkeypatch):
    def fake(f, dest):
        dest.mkdir(parents=True)
        (dest / "pkg.whl").write_bytes(b"tampered")
        return dest / "pkg.whl"
    monkeypatch.setattr(C, "_download", fake)
    f = C.Fetch(via="pip", spec="pkg==1", sha256="0" * 64)
    with pytest.raises(ConfigError, match="does not match the pinned"):
        C.fetch(f, tmp_path / "cache")


def test_a_wrong_sdist_is_refused_before_any_of_its_code_runs(tmp_path):
    # pip prepares an sdist's metadata by running its setup.py; the pinned hash must be
    # checked before that, or a swapped file on the index runs code on this machine.
    marker = tmp_path / "setup_py_ran"
    src = tmp_path / "evil-1.0"
    src.mkdir()
    (src / "setup.py").write_text(f"import pathlib; pathlib.Path({str(marker)!r}).write_text('x')\n"
                                  "from setuptools import setup; setup(name='evil', version='1.0')\n")
    sdist = tmp_path / "evil-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        tar.add(src, arcname="evil-1.0")
    pinned = C.Fetch(via="pip", spec=str(sdist), sha256="0" * 64)
    with pytest.raises(C.Unavailable, match="(?s)sha256.*0000"):
        C._download(pinned, tmp_path / "cache" / "evil")
    assert not marker.exists()
    assert not list((tmp_path / "cache").glob("*"))      # nothing half-downloaded left behind


def test_an_archive_member_over_the_cap_is_refused_not_read(tmp_path):
    big = tmp_path / "big.tar.gz"
    with tarfile.open(big, "w:gz") as tar:
        data = b"a" * (2 << 20)
        info = tarfile.TarInfo("docs/huge.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(DataError, match=r"big.tar.gz: member docs/huge.txt is over max_member_mb=1"):
        list(C.members(big, ex(reader="text", members=["docs/*"], max_member_mb=1)))
    assert [n for n, _ in C.members(big, ex(reader="text", members=["docs/*"]))] == ["docs/huge.txt"]
