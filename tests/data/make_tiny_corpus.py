"""Writes tests/data/tiny/<domain>.jsonl: a small real-text corpus for the stage tests.

Run once with the Python whose stdlib you want to sample (the committed files came from 3.11.7):
    python tests/data/make_tiny_corpus.py
Text comes from pydoc's topic pages (prose) and stdlib modules (code), PSF-licensed.
"""
import json
import sysconfig
from pathlib import Path

from pydoc_data.topics import topics

OUT = Path(__file__).parent / "tiny"
PROSE = sorted(topics.items())
DOMAINS = ["commoncrawl", "c4", "wikipedia", "books", "arxiv", "stackexchange"]
CODE = ["textwrap.py", "colorsys.py", "bisect.py", "heapq.py", "shlex.py", "fnmatch.py",
        "glob.py", "keyword.py", "reprlib.py", "numbers.py", "graphlib.py", "statistics.py"]


def main():
    OUT.mkdir(exist_ok=True)
    buckets = {d: [] for d in DOMAINS}
    for i, (name, text) in enumerate(PROSE):
        buckets[DOMAINS[i % len(DOMAINS)]].append(text.strip()[:6000])
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    buckets["github"] = [(stdlib / f).read_text()[:8000] for f in CODE]
    for d, docs in buckets.items():
        with open(OUT / f"{d}.jsonl", "w") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}) + "\n")
        print(d, len(docs), sum(len(x) for x in docs))
    # Question/answer pairs for the SFT fixture: each topic page's opening sentence.
    with open(OUT / "faq.jsonl", "w") as f:
        for name, text in PROSE[:60]:
            first = " ".join(text.strip().split("\n\n")[1:2]).replace("\n", " ")[:160]
            answer = first.rsplit(" ", 1)[0] if len(first) == 160 else first
            if answer:
                f.write(json.dumps({"question": f"What is '{name}' in Python?",
                                    "answer": answer}) + "\n")


if __name__ == "__main__":
    main()
