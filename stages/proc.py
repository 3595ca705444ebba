"""Process-level helpers that both the stages and the torch-free launcher need: a free port
and DeepSpeed's CPU shared-memory buffers, which DeepSpeed itself never unlinks."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

SHM_DIR = Path("/dev/shm")
HANDSHAKE = "ALIGNFLOW_ARTIFACT="   # the line by which a stage tells its launcher the result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def release_shm(port: str | int, rank: str | int = "*") -> list[Path]:
    """Unlink DeepSpeed's CPU allreduce buffers of the job on `port` (one rank's, or all).
    Every multi-rank CPU job left ~66 MB per rank in /dev/shm (measured: 18 GiB after a day of
    tests, and a machine that stalled)."""
    gone = []
    for f in SHM_DIR.glob(f"deepspeed_allreduce_buffer_*_{port}_{rank}"):
        f.unlink(missing_ok=True)
        gone.append(f)
    return gone


def release_job_shm(cmd: list[str]) -> None:
    """Unlink the shared-memory buffers DeepSpeed's CPU allreduce leaves behind for this job's
    port, whatever way it ended (a rank killed or crashed never cleans up after itself)."""
    if "--master_port" in cmd:
        release_shm(cmd[cmd.index("--master_port") + 1])


def leaked_shm(shm: Path = SHM_DIR, older_than_s: float = 3600,
               min_age_s: float = 60) -> list[Path]:
    """DeepSpeed CPU allreduce buffers that no live process maps or holds open: left by jobs
    launched outside alignflow and killed (a rank's own cleanup never ran). When some process
    cannot be inspected (another user's), only buffers older than `older_than_s` count; one
    younger than `min_age_s` may be between its creation and its mapping, and never counts."""
    files = set(shm.glob("deepspeed_allreduce_buffer_*"))
    in_use, blind = set(), False
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            held = proc.joinpath("maps").read_text() + "".join(
                f"{os.readlink(fd)}\n" for fd in proc.joinpath("fd").iterdir())
        except OSError:             # gone meanwhile, or not ours to read
            blind = blind or proc.exists()
            continue
        in_use |= {f for f in files if str(f) in held}
    cutoff = time.time() - (max(older_than_s, min_age_s) if blind else min_age_s)
    return sorted(f for f in files - in_use if f.exists() and f.stat().st_mtime < cutoff)


# --- DeepSpeed's JIT-built ops -----------------------------------------------------------

BATON_STALE_S = 1800   # a JIT build of a DeepSpeed op takes ~100 s on 2 cores


def extensions_dir() -> Path:
    """Where torch builds DeepSpeed's ops for this environment: one folder per venv, because
    two venvs sharing ~/.cache/torch_extensions rebuild the op for each other every launch."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path(sys.prefix) / "torch_extensions")


def stale_build_locks(root: Path, older_than_s: float = BATON_STALE_S) -> list[Path]:
    """torch's build lock files (`<op>/lock`) older than a build can take: left by a process
    killed while it built an op, they make every later launch wait for ever without a word."""
    cutoff = time.time() - older_than_s
    found = [*root.glob("*/*/lock"), *root.glob("*/lock")]
    return sorted(p for p in found if p.is_file() and p.stat().st_mtime < cutoff)


# --- the job's guard ----------------------------------------------------------------------

GRACE_S = 10.0   # between SIGTERM and SIGKILL when a job is stopped


def guard(parent: int, cmd: list[str], poll_s: float = 0.5) -> int:
    """Run `cmd` as a child in this process's group (the job's), and stop the whole group when
    `parent` (the flow process) goes away, even by SIGKILL or the OOM killer: without it the
    launcher and its ranks train on for nobody. Returns the child's exit code."""
    import signal
    import subprocess
    child = subprocess.Popen(cmd)
    # A SIGTERM to the group is meant for the launcher and ranks; the guard stays to finish
    # the job off with SIGKILL after the grace.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            return child.wait(timeout=poll_s)
        except subprocess.TimeoutExpired:
            pass
        if not _alive(parent):
            os.killpg(0, signal.SIGTERM)
            try:
                child.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                pass
            release_job_shm(cmd)
            os.killpg(0, signal.SIGKILL)     # the guard goes with them
            return 137


def _alive(pid: int) -> bool:
    if os.getppid() != pid:      # reparented: the parent is gone
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


if __name__ == "__main__":
    # python -m stages.proc guard PARENT_PID -- COMMAND ...
    if len(sys.argv) < 5 or sys.argv[1] != "guard" or sys.argv[3] != "--":
        sys.exit("usage: python -m stages.proc guard PARENT_PID -- COMMAND ...")
    sys.exit(guard(int(sys.argv[2]), sys.argv[4:]))
