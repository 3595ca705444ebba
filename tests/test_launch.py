"""The job's lifetime: a launched stage never outlives the flow that started it, a silent hang
is timed out, and a second Ctrl-C cannot cut a stop short. Plain processes stand in for the
launcher: what is tested is the process handling, not DeepSpeed."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from flows.launch import run_stage, stop_group
from tests.conftest import REPO


def sleeper(pid_file) -> list[str]:
    return [sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write("
                                  f"str(os.getpid())); time.sleep(600)"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (dead, not yet reaped by its parent) counts as gone
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1][0] != "Z"


def wait_for(cond, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


def test_the_job_dies_with_a_sigkilled_flow_process(tmp_path):
    # Before: the launcher ran in its own session and trained on for nobody.
    pid_file = tmp_path / "job.pid"
    flow = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        from flows.launch import run_stage
        run_stage({sleeper(pid_file)!r})
    """)], cwd=REPO)
    assert wait_for(pid_file.exists, 30) and wait_for(lambda: pid_file.read_text(), 5)
    job = int(pid_file.read_text())
    assert alive(job)
    flow.kill()
    flow.wait()
    assert wait_for(lambda: not alive(job), 20), "the job outlived the flow process"


def test_a_silent_hang_is_timed_out(tmp_path):
    # Before: the deadline was checked only when a line arrived.
    pid_file = tmp_path / "job.pid"
    t0 = time.time()
    with pytest.raises(TimeoutError, match="ran past 2"):
        run_stage(sleeper(pid_file), timeout=2, on_line=lambda line: None)
    assert time.time() - t0 < 20
    assert not alive(int(pid_file.read_text()))


def test_a_second_ctrl_c_does_not_cut_the_stop_short(tmp_path):
    stubborn = subprocess.Popen(
        [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                               "signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"],
        start_new_session=True, stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout.readline().strip() == "ready"
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
    with pytest.raises(KeyboardInterrupt):       # delivered, but only once the group is gone
        stop_group(stubborn, grace=2)
    assert stubborn.returncode == -signal.SIGKILL


def test_a_build_lock_left_by_a_killed_launch_is_removed(tmp_path, monkeypatch):
    # A launch killed while DeepSpeed JIT-built its op left torch's `lock` file, and every
    # later launch slept in FileBaton.wait for ever (seen: two test runs hung 12 minutes).
    from stages.proc import stale_build_locks
    op = tmp_path / "py311_cpu" / "deepspeed_shm_comm"
    op.mkdir(parents=True)
    (op / "lock").touch()
    assert stale_build_locks(tmp_path) == []               # a build may be under way
    os.utime(op / "lock", (time.time() - 3600, time.time() - 3600))
    assert stale_build_locks(tmp_path) == [op / "lock"]
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lines = []
    run_stage([sys.executable, "-c", "print('ran')"], on_line=lines.append)
    assert not (op / "lock").exists() and "ran" in lines
    assert any("a build lock left by a killed launch" in line for line in lines)
