"""Pretraining data at growing sizes: build time, tokens/s, peak memory of the build and of a
training rank, and the speed-up of 2 tokenizer workers over 1.

    [ALIGNFLOW_HOME=<home>] .venv/bin/python bench/data_scaling.py \
        [--sizes 1e6 4e6 16e6 64e6] [--speedup-size 16e6] [--steps 3]

The demo corpus is built first when the home's store lacks it. The mixture is the demo's
(datasets_cfg/demo_mixture.yaml) with max_epochs raised so the demo corpus, repeated, can give
64M tokens. For each size: a child process builds the dataset artifact the way the stage does (`get_dataset`:
tokenize, sample, pack, register) and reports its wall time and its peak RSS (its own or its largest worker's); then the real stage trains the
demo model for `--steps` steps on that dataset under the deepspeed launcher, and the largest
process it leaves (the rank) gives the rank's peak RSS. The speed-up builds the same dataset
with data.workers=1 and =2 into scratch directories, alternating for `--rounds` rounds (this
machine's speed drifts by tens of percent over minutes), and reports the median ratio of the
tokenize phase (the part the workers share) and of the whole build. Writes
bench/results/data_scaling.json. A script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.common import machine_info  # noqa: E402

CONFIG = "configs/demo/pretrain.yaml"

BUILD = r'''
import json, resource, sys, tempfile, time
from pathlib import Path
from stages import pretrain as P
from stages.artifacts import ArtifactStore
from stages.config import PretrainConfig
from stages.configfile import load_config
cfg = load_config(PretrainConfig, sys.argv[1], json.loads(sys.argv[2]))
mode = sys.argv[3]
store = ArtifactStore(cfg.run.store)
mixture = P.preflight(cfg, store)
fps = [P.source_fingerprint(s, store) for s in mixture.sources]
tok, tok_digest = P.get_tokenizer(cfg, mixture, fps, store)
t0 = time.time()
out = {}
if mode == "store":
    digest = P.get_dataset(cfg, mixture, fps, tok, tok_digest, store)
    # no phase timings here: an artifact of the same bytes keeps the manifest of its first build
    stats = {**store.get(digest).manifest["mixture_stats"], "timings": {}}
    out["digest"] = digest
else:   # scratch: the build alone, nothing registered
    with tempfile.TemporaryDirectory() as tmp:
        stats = P.build_dataset(cfg, mixture, tok, store, Path(tmp))
out["build_s"] = time.time() - t0
out["tokens"] = stats["tokens"]
out["tokenized_tokens"] = stats.get("tokenized_tokens")
out["timings"] = stats.get("timings", {})
self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
out["peak_rss_mb"] = max(self_kb, child_kb) / 1024
print("RESULT " + json.dumps(out))
'''


def mixture_file(tmp: Path, max_epochs: float) -> Path:
    import yaml
    src = yaml.safe_load((REPO / "datasets_cfg/demo_mixture.yaml").read_text())
    for s in src["sources"]:
        s["max_epochs"] = max_epochs
    # a name of its own: the mixture is part of every data key, so each invocation builds
    # afresh instead of timing a reused artifact
    src["name"] = f"scaling-{time.strftime('%Y%m%d-%H%M%S')}"
    path = tmp / "scaling_mixture.yaml"
    path.write_text(f"# bench/data_scaling.py\n{yaml.safe_dump(src)}")
    return path


def build(overrides: list[str], mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", BUILD, CONFIG, json.dumps(overrides), mode],
                          cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"build failed ({overrides}):\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[7:])


def rank_peak_rss(overrides: list[str], steps: int, name: str) -> float:
    """Peak RSS of the largest process a short stage run leaves: the training rank."""
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "1", "--module",
           "stages.pretrain", "--config", CONFIG, *overrides, f"run.name={name}",
           f"train.max_steps={steps}", f"train.eval_every={steps}", "train.eval_batches=1",
           f"checkpoint.every_steps={steps + 1}", "optim.warmup_steps=1", "run.force=true"]
    script = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
              "print('RSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    proc = subprocess.run([sys.executable, "-c", script, *cmd], cwd=REPO, capture_output=True,
                          text=True)
    if proc.returncode:
        sys.exit(f"stage run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return int(proc.stdout.split("RSS")[-1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e6, 4e6, 16e6, 64e6])
    ap.add_argument("--speedup-size", type=float, default=16e6)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--max-epochs", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=5, help="alternating 1- and 2-worker builds")
    ap.add_argument("--no-speedup", action="store_true", help="skip the 1-vs-2-worker builds "
                    "(the code before the engine had no workers)")
    ap.add_argument("--out", default=str(REPO / "bench/results/data_scaling.json"))
    args = ap.parse_args()
    from stages.artifacts import ArtifactStore
    from stages.corpus import build_corpus
    home = os.environ.get("ALIGNFLOW_HOME", str(REPO / ".alignflow"))
    build_corpus(REPO / "datasets_cfg/demo_corpus.yaml", ArtifactStore(str(Path(home) / "store")))
    tmp = Path(tempfile.mkdtemp(prefix="data-scaling-"))
    base = [f"data.mixture={mixture_file(tmp, args.max_epochs)}"]
    sizes = []
    for n in args.sizes:
        ov = base + [f"data.total_tokens={int(n)}"]
        b = build(ov, "store")
        rss = rank_peak_rss(ov, args.steps, f"bench-data-{int(n)}")
        row = {"tokens": b["tokens"], "build_s": round(b["build_s"], 2),
               "tokens_per_s": round(b["tokens"] / b["build_s"]),
               "build_peak_rss_mb": round(b["peak_rss_mb"], 1),
               "rank_peak_rss_mb": round(rss, 1), "tokenized_tokens": b["tokenized_tokens"]}
        sizes.append(row)
        print(f"{row['tokens']:>12,} tokens  build {row['build_s']:7.1f} s  "
              f"{row['tokens_per_s']:>9,} tok/s  build RSS {row['build_peak_rss_mb']:7.1f} MB  "
              f"rank RSS {row['rank_peak_rss_mb']:7.1f} MB", flush=True)
    result = {"config": CONFIG, "mixture": "datasets_cfg/demo_mixture.yaml with max_epochs="
              f"{args.max_epochs}", "steps": args.steps, "sizes": sizes}
    first, last = sizes[0], sizes[-1]
    result["rss_growth"] = {
        "build": round(last["build_peak_rss_mb"] / first["build_peak_rss_mb"], 3),
        "rank": round(last["rank_peak_rss_mb"] / first["rank_peak_rss_mb"], 3)}
    print(f"peak RSS {first['tokens']:,} -> {last['tokens']:,} tokens: build x"
          f"{result['rss_growth']['build']}, rank x{result['rss_growth']['rank']} (target <= 1.3)")
    if not args.no_speedup:
        # alternating rounds: this machine's speed drifts by tens of percent over minutes
        ov = base + [f"data.total_tokens={int(args.speedup_size)}"]
        rounds = []
        for _ in range(args.rounds):
            runs = {w: build(ov + [f"data.workers={w}"], "scratch") for w in (1, 2)}
            rounds.append({str(w): {"build_s": round(r["build_s"], 2), **r["timings"],
                                    "tokenize_tokens_per_s": round(r["tokenized_tokens"] /
                                                                   r["timings"]["tokenize_s"])}
                           for w, r in runs.items()})
            print(f"  round {len(rounds)}: tokenize 1 worker {runs[1]['timings']['tokenize_s']:.1f} s,"
                  f" 2 workers {runs[2]['timings']['tokenize_s']:.1f} s", flush=True)
        ratios = sorted(r["1"]["tokenize_s"] / r["2"]["tokenize_s"] for r in rounds)
        whole = sorted(r["1"]["build_s"] / r["2"]["build_s"] for r in rounds)
        result["workers"] = rounds
        result["speedup_2_workers"] = round(ratios[len(ratios) // 2], 3)
        result["speedup_2_workers_rounds"] = [round(x, 3) for x in ratios]
        result["speedup_2_workers_whole_build"] = round(whole[len(whole) // 2], 3)
        print(f"2 workers vs 1 at {int(args.speedup_size):,} tokens, median of {args.rounds} "
              f"rounds: tokenize x{result['speedup_2_workers']} "
              f"(rounds {result['speedup_2_workers_rounds']}), whole build "
              f"x{result['speedup_2_workers_whole_build']} (target >= 1.7)")
    else:
        result["speedup_2_workers"] = None
    result["machine"] = machine_info()
    result["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"  written to {args.out}")


if __name__ == "__main__":
    main()
