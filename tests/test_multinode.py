"""Two "nodes" on this one machine: DeepSpeed's launcher with a two-host hostfile, started once
per node with --no_ssh --node_rank (what a cluster scheduler does), each node with a home of
its own and one shared store."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from flows.launch import deepspeed_exe, release_job_shm
from stages.proc import free_port
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def start_nodes(tmp_path: Path, name: str, *overrides: str, stage: str = "pretrain",
                store: Path | None = None) -> list[subprocess.Popen]:
    hosts = tmp_path / "hostfile"
    hosts.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    cmd = [deepspeed_exe(), "--hostfile", str(hosts), "--num_nodes", "2", "--num_gpus", "1",
           "--no_ssh", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "--module", f"stages.{stage}", "--config", str(REPO / "configs" / "tiny" /
                                                          f"{stage}.yaml"),
           f"run.store={store or tmp_path / 'store'}", "deepspeed.num_gpus=1",
           "deepspeed.num_nodes=2", f"deepspeed.hostfile={hosts}", *overrides]
    procs = []
    for node in (0, 1):
        log = open(tmp_path / f"{name}-node{node}.log", "w")
        node_cmd = cmd[:1] + [f"--node_rank={node}"] + cmd[1:]
        procs.append(subprocess.Popen(
            node_cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "ALIGNFLOW_HOME": str(tmp_path / f"home-node{node}")}))
        procs[-1].cmd = node_cmd
    return procs


def finish(procs, timeout=600) -> list[int]:
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=timeout))
        finally:
            kill(p)
    return codes


def kill(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()
    release_job_shm(p.cmd)


def logs(tmp_path: Path, name: str) -> str:
    return "".join((tmp_path / f"{name}-node{n}.log").read_text() for n in (0, 1))


def curve(work: Path) -> dict[int, float]:
    (path,) = work.glob("*/metrics.jsonl")
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_node_local_work_directories_are_refused_before_training(tmp_path):
    # Before: node 0 resumed from its checkpoint while node 1 (no marker in its own home)
    # restarted at step 0, and the job hung at its last step.
    codes = finish(start_nodes(tmp_path, "local"))
    out = logs(tmp_path, "local")
    assert codes == [2, 2], out[-4000:]
    assert "the work directory is not shared" in out and "rank 1 on" in out
    assert "home-node1" in out and "Traceback" not in out


def test_two_nodes_killed_mid_run_resume_to_the_same_losses(tmp_path):
    steps = ["train.max_steps=16", "checkpoint.every_steps=4", "train.eval_every=100"]
    codes = finish(start_nodes(tmp_path, "straight", *steps,
                               f"run.work_dir={tmp_path / 'straight'}"))
    assert codes == [0, 0], logs(tmp_path, "straight")[-4000:]
    straight = curve(tmp_path / "straight")

    shared = tmp_path / "shared"
    run = [*steps, f"run.work_dir={shared}", "run.force=true"]
    procs = start_nodes(tmp_path, "killed", *run)
    deadline = time.time() + 300
    while not list(shared.glob("*/checkpoints/complete")):
        assert all(p.poll() is None for p in procs) and time.time() < deadline, \
            logs(tmp_path, "killed")[-4000:]
        time.sleep(0.05)
    kill(procs[1])                                # node 1 dies; node 0 follows or is killed
    try:
        procs[0].wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    kill(procs[0])
    (marker,) = shared.glob("*/checkpoints/complete")
    killed_at = int(marker.read_text().strip().removeprefix("step"))
    assert 0 < killed_at < 16

    codes = finish(start_nodes(tmp_path, "resumed", *run))
    out = logs(tmp_path, "resumed")
    assert codes == [0, 0], out[-4000:]
    assert f"at step {killed_at}" in out or "resumed from" in out
    resumed = curve(shared)
    assert max(resumed) == 16
    for step in range(killed_at + 1, 17):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5), step


def test_ppo_on_two_nodes(chain, tmp_path):
    # The actor, critic, reference and reward engines across two nodes, each node with its own
    # home: rollouts, the global whitening and the checkpoints meet in the shared work dir.
    root, store, _, _ = chain
    codes = finish(start_nodes(tmp_path, "ppo", "train.max_steps=3", "checkpoint.every_steps=2",
                               "run.name=tiny-ppo-two-nodes", f"run.work_dir={tmp_path / 'w'}",
                               stage="ppo", store=root / "store"))
    out = logs(tmp_path, "ppo")
    assert codes == [0, 0], out[-4000:]
    art = store.get("tiny-ppo-two-nodes")
    assert art.manifest["config"]["deepspeed"]["num_nodes"] == 2
    assert "rl/reward" in art.manifest["metrics"] and "2 rank(s)" in out
