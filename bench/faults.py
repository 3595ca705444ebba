"""Fault injection, as a user's machine meets it: SIGKILL each stage (the launcher and every
rank, as a preempted node dies) at random moments of its run, relaunch after each kill, and
check that the last relaunch finishes and that the store verifies clean.

    .venv/bin/python bench/faults.py --kills 10             # all four tiny stages
    .venv/bin/python bench/faults.py --kills 3 --stages pretrain sft

Per stage: one uninterrupted run measures its duration T; then `kills` launches are each
killed at a moment drawn uniformly from (1 s, T) (data preparation, training, checkpoint
saves and export all get hit), each relaunch resuming from what the last one left; a final
launch runs to the end. Writes bench/results/faults-<device>.json.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, save  # noqa: E402
from flows.launch import build_command, release_job_shm, run_stage  # noqa: E402

STAGES = ("pretrain", "sft", "rm", "ppo")


def launch(stage: str, root: Path, overrides: list[str], kill_at: float | None):
    cmd = build_command(stage, REPO / "configs" / "tiny" / f"{stage}.yaml",
                        [f"run.store={root / 'store'}", f"run.work_dir={root / 'work' / stage}",
                         *overrides])
    env = {**os.environ, "ALIGNFLOW_HOME": str(root / "home"), "PYTHONUNBUFFERED": "1"}
    if kill_at is None:
        code, digest = run_stage(cmd, env={"ALIGNFLOW_HOME": str(root / "home")},
                                 on_line=lambda line: None, timeout=1200)
        return code, digest
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=kill_at)
        return proc.returncode, None        # finished before the kill came
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return "killed", None
    finally:
        release_job_shm(cmd)


def verify(root: Path) -> tuple[int, str]:
    out = subprocess.run([sys.executable, "-m", "flows.cli", "--store", str(root / "store"),
                          "verify"], cwd=REPO, capture_output=True, text=True)
    return out.returncode, out.stdout.strip().splitlines()[-1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--root", default="/tmp/alignflow-faults")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = p.parse_args()
    root = Path(args.root)
    subprocess.run(["rm", "-rf", str(root)], check=True)
    rng = random.Random(args.seed)
    rows = []
    for stage in args.stages:
        # The stage before runs uninterrupted first, so this one has its parents.
        t0 = time.time()
        code, clean = launch(stage, root, [], None)
        duration = time.time() - t0
        assert code == 0, f"{stage}: the uninterrupted run failed ({code})"
        forced = ["run.force=true", f"run.name=tiny-{stage}-faults"]
        outcomes = []
        for _ in range(args.kills):
            at = rng.uniform(1.0, duration)
            outcomes.append((round(at, 1), launch(stage, root, forced, at)[0]))
        code, digest = launch(stage, root, forced, None)
        vcode, vline = verify(root)
        row = {"stage": stage, "uninterrupted_s": round(duration, 1), "kills": args.kills,
               "killed_at_s": [a for a, _ in outcomes],
               "killed": sum(o == "killed" for _, o in outcomes),
               "finished_before_kill": sum(o == 0 for _, o in outcomes),
               "failed_relaunches": sum(o not in ("killed", 0) for _, o in outcomes),
               "final_exit": code, "same_digest_as_uninterrupted": digest == clean,
               "verify_exit": vcode, "verify": vline}
        rows.append(row)
        print(f"{stage:<9} T={duration:5.1f}s  killed {row['killed']}/{args.kills} "
              f"(finished first: {row['finished_before_kill']}, failed: "
              f"{row['failed_relaunches']})  final exit {code}  same digest {digest == clean}"
              f"  verify: {vline}", flush=True)
    save({"stages": rows, "seed": args.seed}, args.out, "faults")


if __name__ == "__main__":
    main()
