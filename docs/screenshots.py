"""Screenshots of the Prefect UI for the README, from a real server on this machine.

    .venv/bin/python docs/screenshots.py          # needs chromium (apt-get install chromium)

Starts `alignflow server` on a free port and `alignflow serve` (with the automations), runs the
tiny pipeline through the API as the Run button does, and saves, from headless Chromium:
docs/run-form.png (the sft deployment's Run form with its typed settings), docs/flow-run.png
(the pipeline's flow-run graph) and docs/lineage.png (the PPO model's lineage artifact).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from flows.params import PRESETS  # noqa: E402
from stages.proc import free_port  # noqa: E402

BIN = Path(sys.executable).parent


def wait_for(what, check, timeout: float, every: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (got := check()) is not None:
            return got
        time.sleep(every)
    raise TimeoutError(f"{what} after {timeout}s")


def shoot(url: str, out: Path, tmp: Path, height: int = 1100) -> None:
    subprocess.run([shutil.which("chromium") or "chromium", "--headless", "--no-sandbox",
                    "--disable-gpu", f"--user-data-dir={tmp / out.stem}",
                    f"--window-size=1400,{height}", "--virtual-time-budget=25000",
                    "--hide-scrollbars", f"--screenshot={out}", url],
                   capture_output=True, timeout=180, check=True)
    print(f"  {out.relative_to(REPO)}  <- {url}")


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="alignflow-shots-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "ALIGNFLOW_HOME": str(root / "home"),
           "PREFECT_API_URL": f"{base}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    procs = [subprocess.Popen([str(BIN / "alignflow"), "server", "--port", str(port)], env=env,
                              stdout=open(root / "server.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)]
    try:
        http = httpx.Client(base_url=f"{base}/api", timeout=30)

        def healthy():
            try:
                return http.get("/health").status_code == 200 or None
            except httpx.HTTPError:
                return None
        wait_for("server", healthy, 180)
        token = http.get("/csrf-token", params={"client": "shots"}).json()["token"]
        http.headers.update({"Prefect-Csrf-Token": token, "Prefect-Csrf-Client": "shots"})
        store = str(root / "store")
        procs.append(subprocess.Popen(
            [str(BIN / "alignflow"), "--store", store, "serve", "--automations",
             "infra/automations.yaml"], cwd=REPO, env=env, stdout=open(root / "serve.log", "w"),
            stderr=subprocess.STDOUT, start_new_session=True))

        def deployment(name):
            r = http.get(f"/deployments/name/{name}")
            return r.json()["id"] if r.status_code == 200 else None
        pipe = wait_for("served", lambda: deployment("alignment-pipeline/pipeline-tiny"), 180)
        sft = wait_for("sft served", lambda: deployment("sft/sft"), 60)
        params = PRESETS["tiny"].model_copy(deep=True)
        params.store = store
        for _ in range(30):   # SQLite answers 503 while another writer holds the database
            r = http.post(f"/deployments/{pipe}/create_flow_run",
                          json={"parameters": {"params": params.model_dump(mode="json")}})
            if r.status_code != 503:
                break
            time.sleep(2)
        assert r.status_code == 201, r.text
        run = r.json()
        print(f"pipeline run {run['id']} started; waiting for it")

        def done():
            state = http.get(f"/flow_runs/{run['id']}").json()["state"]["type"]
            return state if state in ("COMPLETED", "FAILED", "CRASHED") else None
        assert wait_for("pipeline", done, 1500, every=3) == "COMPLETED", \
            (root / "serve.log").read_text()[-3000:]
        lineage = max((a for a in http.post("/artifacts/filter", json={"artifacts": {"key": {
            "any_": ["tiny-ppo-lineage"]}}}).json()), key=lambda a: a["created"])
        docs = REPO / "docs"
        # The V2 UI (/v2, Prefect 3.7+) renders the Mermaid graph of the lineage artifact.
        shoot(f"{base}/deployments/deployment/{sft}/run", docs / "run-form.png", root, 2000)
        shoot(f"{base}/v2/runs/flow-run/{run['id']}", docs / "flow-run.png", root)
        shoot(f"{base}/v2/artifacts/artifact/{lineage['id']}", docs / "lineage.png", root, 1400)
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, 15)
                p.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, 9)


if __name__ == "__main__":
    main()
