"""What every benchmark shares: the machine it ran on and where its JSON goes."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def machine_info() -> dict:
    import torch
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version(),
            "device_slug": (gpu or f"cpu{os.cpu_count()}").replace(" ", "-").lower()}



def commit() -> str | None:
    """The checkout's commit, "+dirty" where tracked files differ from it: the code a figure
    was measured on."""
    import subprocess
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ".", ":!bench/results"],
                               cwd=REPO).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def save(result: dict, out: str | Path, stem: str) -> Path:
    """Write `result` (with the machine and the time added) as <out>/<stem>-<device>.json."""
    result.setdefault("machine", machine_info())
    result.setdefault("commit", commit())
    result.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dest = out / f"{stem}-{result['machine']['device_slug']}.json"
    dest.write_text(json.dumps(result, indent=2))
    print(f"  written to {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest}")
    return dest
