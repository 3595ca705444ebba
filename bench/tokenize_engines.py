"""Tokenizing the demo corpus with datatrove (what the pretrain stage uses) and with
`datasets.map(num_proc=N)`, 1 and 2 processes each, alternating: the measurement behind the
engine choice in the README.

    [ALIGNFLOW_HOME=<home>] .venv/bin/python bench/tokenize_engines.py [--rounds 1]

Both read the same JSON-lines files with the demo tokenizer (trained first if the home lacks
it, by the demo pretrain config) with the Rust tokenizer's own threads off, so the processes
are the only parallelism. Writes bench/results/tokenize_engines.json. A script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def with_datatrove(files: list[Path], tokenizer_json: Path, eos: str, workers: int) -> dict:
    from stages import tokens as T
    work = Path(tempfile.mkdtemp(prefix="engines-dt-"))
    try:
        units = [u for i, f in enumerate(files)
                 for u in T.file_units(i, [f], "text", "bench", 4 << 20)]
        t0 = time.time()
        out = T.tokenize_units(units, tokenizer_json, eos, work, workers)
        seconds = time.time() - t0
        return {"s": round(seconds, 2), "tokens": int(sum(int(f.ends[-1]) for f in out
                                                          if len(f.ends)))}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def with_datasets(files: list[Path], tokenizer_json: Path, workers: int) -> dict:
    import datasets
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json))
    cache = tempfile.mkdtemp(prefix="engines-ds-")
    try:
        t0 = time.time()
        ds = datasets.load_dataset("json", data_files=[str(f) for f in files], split="train",
                                   cache_dir=cache)
        ds = ds.map(lambda b: {"ids": tok(b["text"], add_special_tokens=False)["input_ids"]},
                    batched=True, num_proc=workers if workers > 1 else None,
                    remove_columns=ds.column_names)
        seconds = time.time() - t0
        return {"s": round(seconds, 2), "tokens": int(sum(len(x) + 1 for x in ds["ids"]))}
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "bench/results/tokenize_engines.json"))
    args = ap.parse_args()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from bench.common import machine_info
    from stages import pretrain as P
    from stages.artifacts import ArtifactStore
    from stages.config import PretrainConfig
    from stages.configfile import load_config
    from stages.corpus import build_corpus
    cfg = load_config(PretrainConfig, REPO / "configs/demo/pretrain.yaml")
    home = os.environ.get("ALIGNFLOW_HOME", str(REPO / ".alignflow"))
    store = ArtifactStore(str(Path(home) / "store"))
    corpus = build_corpus(REPO / "datasets_cfg/demo_corpus.yaml", store)
    mixture = P.preflight(cfg, store)
    fps = [P.source_fingerprint(s, store) for s in mixture.sources]
    tok, _ = P.get_tokenizer(cfg, mixture, fps, store)
    tmp = Path(tempfile.mkdtemp(prefix="engines-"))
    tok.backend_tokenizer.save(str(tmp / "tokenizer.json"))
    files = sorted(corpus.local_path().rglob("*.jsonl"))
    runs = []
    for _ in range(args.rounds):
        for workers in (1, 2):
            for engine in ("datatrove", "datasets.map"):
                r = with_datatrove(files, tmp / "tokenizer.json", tok.eos_token, workers) \
                    if engine == "datatrove" else with_datasets(files, tmp / "tokenizer.json",
                                                                 workers)
                r.update(engine=engine, workers=workers, tokens_per_s=round(r["tokens"] / r["s"]))
                runs.append(r)
                print(f"  {engine:13s} {workers} process(es): {r['s']:6.1f} s, "
                      f"{r['tokens_per_s']:>9,} tokens/s ({r['tokens']:,} tokens)", flush=True)
    result = {"corpus": corpus.digest, "files": len(files), "runs": runs,
              "machine": machine_info(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"  written to {args.out}")


if __name__ == "__main__":
    main()
