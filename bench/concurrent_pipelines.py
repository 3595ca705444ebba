"""Several pipelines started at once on one store and one ALIGNFLOW_HOME, as a team shares a
machine: two identical tiny pipelines and two that differ from SFT and from RM on. Counts how
often each stage trained (identical stages must train once), checks every run finished, and
that `alignflow verify` finds the store clean.

    .venv/bin/python bench/concurrent_pipelines.py

Writes bench/results/concurrent_pipelines-<device>.json.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, save  # noqa: E402

PIPELINES = {"a": [], "a-again": [], "b-sft-lr": ["--set", "sft:optim.lr=0.002"],
             "c-rm-lr": ["--set", "rm:optim.lr=0.002"]}
# What must train: pretrain once; sft for a and b; rm for a, b, c; ppo for a, b, c.
EXPECTED = {"pretrain": 1, "sft": 2, "rm": 3, "ppo": 3}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default="/tmp/alignflow-concurrent")
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args()
    root = Path(args.root)
    subprocess.run(["rm", "-rf", str(root)], check=True)
    root.mkdir(parents=True)
    env = {**os.environ, "ALIGNFLOW_HOME": str(root / "home")}
    t0 = time.time()
    procs = {name: subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "--store", str(root / "store"), "run", "--preset",
         "tiny", *extra], cwd=REPO, env=env, stdout=open(root / f"{name}.log", "w"),
        stderr=subprocess.STDOUT) for name, extra in PIPELINES.items()}
    codes = {name: p.wait(timeout=3600) for name, p in procs.items()}
    seconds = time.time() - t0
    logs = {name: (root / f"{name}.log").read_text() for name in PIPELINES}
    trained = {stage: sum(len(re.findall(rf"exported model tiny-{stage} ", text))
                          for text in logs.values()) for stage in EXPECTED}
    waited = sum(text.count("waiting for it") for text in logs.values())
    verify = subprocess.run([sys.executable, "-m", "flows.cli", "--store", str(root / "store"),
                             "verify"], cwd=REPO, capture_output=True, text=True)
    result = {"pipelines": list(PIPELINES), "exit_codes": codes, "seconds": round(seconds, 1),
              "trained": trained, "expected": EXPECTED, "waits": waited,
              "verify_exit": verify.returncode, "verify": verify.stdout.strip().splitlines()[-1]}
    print(f"4 pipelines at once: exit codes {codes}, {seconds / 60:.1f} min")
    for stage in EXPECTED:
        print(f"  {stage:<9} trained {trained[stage]} time(s), expected {EXPECTED[stage]}")
    print(f"  waits for another run's lock: {waited}; verify: {result['verify']}")
    save(result, args.out, "concurrent_pipelines")


if __name__ == "__main__":
    main()
