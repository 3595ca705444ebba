"""Demo corpus build throughput, cold (empty download cache) and warm (packages cached).

    .venv/bin/python bench/corpus_build.py [--recipe datasets_cfg/demo_corpus.yaml]

Both builds are forced into fresh stores; cold downloads every package from the registries,
warm reuses the download cache, so the difference is the fetch time. Prints MB/s of text
produced and writes bench/results/corpus_build-<device>.json. A script, not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="datasets_cfg/demo_corpus.yaml")
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="alignflow-bench-corpus-"))
    os.environ["ALIGNFLOW_HOME"] = str(root / "home")   # an empty download cache
    from stages.artifacts import ArtifactStore
    from stages.corpus import build_corpus
    runs = {}
    for label in ("cold", "warm"):
        t0 = time.time()
        art = build_corpus(args.recipe, ArtifactStore(str(root / label)), force=True,
                           log=lambda *a: None)
        runs[label] = {"seconds": time.time() - t0, "chars": art.manifest["metrics"]["data/chars"],
                       "documents": art.manifest["metrics"]["data/documents"], "digest": art.digest}
    from common import machine_info, save
    result = {"benchmark": "corpus_build", "recipe": args.recipe, **runs,
              "same_digest": runs["cold"]["digest"] == runs["warm"]["digest"],
              "machine": machine_info(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(f"\ncorpus build ({args.recipe}: {runs['warm']['chars'] / 1e6:.1f} MB of text, "
          f"{runs['warm']['documents']} documents)")
    for label in ("cold", "warm"):
        r = runs[label]
        print(f"  {label}: {r['seconds']:6.1f} s   {r['chars'] / 1e6 / r['seconds']:6.2f} MB/s")
    print(f"  same digest cold and warm: {result['same_digest']}")
    save(result, args.out, "corpus_build")


if __name__ == "__main__":
    main()
