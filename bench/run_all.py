"""Every benchmark, one after another: `.venv/bin/python bench/run_all.py [--quick]`.

pretrain throughput (stage vs bare PyTorch), demo corpus build cold and warm, pretraining data
at growing sizes (build time and memory, 2 tokenizer workers vs 1), datatrove vs datasets.map,
PPO throughput and, without --quick, PPO and GRPO side by side with TRL's trainers
(needs demo-sft and demo-rm: run `bash scripts/demo.sh` first, or it is reported as skipped),
pipeline orchestration overhead and cached rerun, RL quality (also after the demo). --quick uses
the tiny preset for the pipeline, fewer PPO steps and one seed of two RL runs. Each prints its figures and writes its JSON to bench/results/.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    quick = "--quick" in sys.argv[1:]
    runs = [("pretrain_throughput", []), ("corpus_build", []),
            ("data_scaling", ["--sizes", "1e6", "4e6", "--speedup-size", "4e6"] if quick else []),
            ("tokenize_engines", []),
            ("ppo_throughput", ["--steps", "6"] if quick else []),
            *([] if quick else [("ppo_throughput", ["--peer", "trl-ppo"]),
                                ("ppo_throughput", ["--peer", "trl-grpo"])]),
            ("pipeline_overhead", ["--preset", "tiny" if quick else "demo"]),
            ("rl_quality", ["--seeds", "1", "--only", "gae:rm", "grpo:checker", "--steps", "40"]
             if quick else ["--jobs", "2", "--set", "grpo:optim.lr=3e-4"])]
    failed = []
    for name, extra in runs:
        print(f"\n=== {name} ===", flush=True)
        t0 = time.time()
        code = subprocess.run([sys.executable, str(REPO / "bench" / f"{name}.py"), *extra],
                              cwd=REPO).returncode
        print(f"=== {name}: {'ok' if code == 0 else f'FAILED ({code})'} in "
              f"{time.time() - t0:.0f} s", flush=True)
        if code:
            failed.append(name)
    print(f"\n{len(runs) - len(failed)} of {len(runs)} benchmarks ran"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
