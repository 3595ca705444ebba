"""End to end through a real Prefect server, as the UI drives it: a server on a free loopback
port, `alignflow serve` serving the deployments, runs created with the Run button's API call
(POST /api/deployments/{id}/create_flow_run), the cache skip of a second run, and a
cancellation that must leave no process of the job alive."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from stages.proc import free_port
from flows.params import PRESETS
from stages.artifacts import ArtifactStore
from tests.conftest import REPO

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def wait_for(what, check, timeout: float, every: float = 1.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (got := check()) is not None:
            return got
        time.sleep(every)
    raise TimeoutError(f"{what} after {timeout}s")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(root / "prefect"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "ALIGNFLOW_HOME": str(root / "home"),
           "PREFECT_LOCAL_STORAGE_PATH": str(root / "results")}
    (root / "prefect").mkdir()
    logs = {n: open(root / f"{n}.log", "w") for n in ("server", "serve")}
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=env, stdout=logs["server"],
                              stderr=subprocess.STDOUT, start_new_session=True)
    procs = [server]
    try:
        http = httpx.Client(base_url=api, timeout=30)

        def healthy():
            try:
                return http.get("/health").status_code == 200 or None
            except httpx.HTTPError:
                return None
        wait_for("server not healthy", healthy, 180)
        store = str(root / "store")
        procs.append(subprocess.Popen([str(BIN / "alignflow"), "--store", store, "serve",
                                       "--automations", "infra/automations.yaml"],
                                      cwd=REPO, env=env, stdout=logs["serve"],
                                      stderr=subprocess.STDOUT, start_new_session=True))

        def deployment(name):
            r = http.get(f"/deployments/name/{name}")
            return r.json()["id"] if r.status_code == 200 else None
        ids = {n: wait_for(f"deployment {n} not served", lambda n=n: deployment(n), 120)
               for n in ("alignment-pipeline/pipeline-tiny", "pretrain/pretrain", "ppo/ppo")}
        yield http, ids, ArtifactStore(store), store, root
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)
        for f in logs.values():
            f.close()


def run_deployment(http, deployment_id: str, parameters: dict) -> str:
    """Exactly what the UI's Run button sends."""
    for _ in range(30):   # SQLite answers 503 while another writer holds the database
        r = http.post(f"/deployments/{deployment_id}/create_flow_run",
                      json={"parameters": parameters})
        if r.status_code != 503:
            break
        time.sleep(2)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def final_state(http, run_id: str, timeout: float) -> str:
    def done():
        state = http.get(f"/flow_runs/{run_id}").json()["state"]
        return state["type"] if state["type"] in ("COMPLETED", "FAILED", "CRASHED",
                                                  "CANCELLED") else None
    return wait_for(f"flow run {run_id} not finished", done, timeout, every=2)


def job_processes(marker: str) -> list[int]:
    out = subprocess.run(["ps", "-eww", "-o", "pid=,args="], capture_output=True, text=True).stdout
    return [int(l.split()[0]) for l in out.splitlines()
            if marker in l and "ps -eww" not in l]


def test_run_from_the_api_then_cached_rerun(served):
    http, ids, store, store_root, root = served
    params = PRESETS["tiny"].model_copy(deep=True)
    params.store = store_root
    params.ppo.overrides.append("train.max_steps=2")          # a custom parameter from the form
    body = {"params": params.model_dump(mode="json")}
    run = run_deployment(http, ids["alignment-pipeline/pipeline-tiny"], body)
    state = final_state(http, run, 900)
    assert state == "COMPLETED", (root / "serve.log").read_text()[-4000:]
    names = ("tiny-pretrain", "tiny-sft", "tiny-rm", "tiny-ppo")
    assert all(len(store.versions(n)) == 1 for n in names)
    keys = {a["key"] for a in http.post("/artifacts/filter", json={}).json()}
    assert {f"{n}-lineage" for n in names} <= keys and "tiny-ppo-metrics" in keys
    ppo = store.get("tiny-ppo@latest")
    assert ppo.manifest["flow_run_id"] and "train.max_steps=2" in ppo.manifest["command"]

    t0 = time.time()
    again = run_deployment(http, ids["alignment-pipeline/pipeline-tiny"], body)
    assert final_state(http, again, 600) == "COMPLETED"
    assert all(len(store.versions(n)) == 1 for n in names), "an unchanged stage retrained"
    print(f"cached rerun through the server: {time.time() - t0:.1f} s")


def test_a_committed_reward_model_starts_ppo_with_it(served):
    # infra/automations.yaml, applied by `alignflow serve --automations`: the event a
    # standalone RM run emits on commit creates a PPO run whose `reward` is the new digest.
    import uuid
    from datetime import datetime, timezone
    http, ids, store, store_root, root = served
    digest = uuid.uuid4().hex * 2
    event = {"id": str(uuid.uuid4()), "occurred": datetime.now(timezone.utc).isoformat(),
             "event": "alignflow.artifact.committed", "payload": {"digest": digest},
             "resource": {"prefect.resource.id": f"alignflow.artifact.{digest}",
                          "alignflow.digest": digest, "alignflow.kind": "model",
                          "alignflow.stage": "rm", "alignflow.name": "tiny-rm",
                          "alignflow.standalone": "true"}}
    assert http.post("/events", json=[event]).status_code == 204

    def started():
        runs = http.post("/flow_runs/filter", json={"flow_runs": {"deployment_id": {
            "any_": [ids["ppo/ppo"]]}}}).json()
        return next((r for r in runs if r["parameters"].get("reward") == digest), None)
    run = wait_for("no PPO run started for the new reward model", started, 120)
    assert run["parameters"]["store"] == store_root
    final_state(http, run["id"], 300)     # it fails fast (no such model); let it end here


def test_cancel_stops_the_launcher_and_every_rank(served):
    http, ids, store, store_root, root = served
    marker = f"run.store={store_root}-cancel"
    body = {"params": {"config": "configs/tiny/pretrain.yaml",
                       "overrides": ["train.max_steps=100000", "run.name=tiny-cancel",
                                     "checkpoint.every_steps=100000"]},
            "store": store_root + "-cancel"}
    run = run_deployment(http, ids["pretrain/pretrain"], body)
    # Wait until the ranks train: a rank is a python process running stages.pretrain.
    wait_for("stage ranks never started", lambda: (
        [p for p in job_processes(marker) if "--local_rank" in " ".join(
            open(f"/proc/{p}/cmdline").read().split("\0"))] or None)
        if job_processes(marker) else None, 300)
    time.sleep(3)
    t0 = time.time()
    r = http.post(f"/flow_runs/{run}/set_state",
                  json={"state": {"type": "CANCELLING", "name": "Cancelling"}, "force": True})
    assert r.status_code in (200, 201), r.text
    wait_for("job processes survived cancellation", lambda: None if job_processes(marker)
             else True, 15, every=0.5)
    stopped_s = time.time() - t0
    assert final_state(http, run, 60) in ("CANCELLED", "CRASHED")
    assert not store.versions("tiny-cancel"), "a cancelled run registered an artifact"
    assert not ArtifactStore(store_root + "-cancel").versions("tiny-cancel")
    print(f"cancellation stopped every process in {stopped_s:.1f} s")


def chromium() -> str | None:
    import shutil
    return next((p for p in ("chromium", "chromium-browser", "google-chrome") if shutil.which(p)),
                None)


def rendered(url: str, tmp: Path, shows=lambda dom: True, tries: int = 3) -> str:
    """The page's DOM after its scripts ran, from headless Chromium, once it `shows` what is
    expected. The UI fetches its data after the first paint; on a loaded CI machine those
    requests can outlast Chromium's virtual time budget, leaving only the page header (seen in
    CI), so a page that does not show its data yet is loaded again with twice the budget."""
    budget = 20000
    for attempt in range(tries):
        out = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                              f"--user-data-dir={tmp}-{attempt}",
                              f"--virtual-time-budget={budget}", "--dump-dom", url],
                             capture_output=True, text=True, timeout=180)
        if shows(out.stdout):
            break
        budget *= 2
    return out.stdout


@pytest.mark.skipif(chromium() is None, reason="chromium is not installed "
                    "(apt-get install chromium)")
def test_the_ui_renders_the_run_form_and_a_lineage_artifact(served, tmp_path):
    http, ids, store, store_root, root = served
    ui = str(http.base_url).rstrip("/").removesuffix("/api")
    # Field values live in the inputs' DOM properties, which --dump-dom does not serialize;
    # the labels and descriptions of our parameter models show the form was built from them.
    labels = ("From Stage", "Stage config YAML under configs/ of the alignflow checkout",
              "Relaunch a failed stage", "Empty to stop after SFT")
    form = rendered(f"{ui}/deployments/deployment/{ids['alignment-pipeline/pipeline-tiny']}"
                    f"/run", tmp_path / "a", shows=lambda dom: all(t in dom for t in labels))
    for text in labels:
        assert text in form, f"{text!r} not in the Run form: {form[-2000:]}"
    if not store.versions("tiny-ppo"):
        pytest.skip("needs the pipeline run of test_run_from_the_api_then_cached_rerun")
    # The key's page is the timeline of its versions; one version's page renders its markdown.
    versions = http.post("/artifacts/filter", json={
        "artifacts": {"key": {"any_": ["tiny-ppo-lineage"]}}}).json()
    timeline = rendered(f"{ui}/artifacts/key/tiny-ppo-lineage", tmp_path / "b",
                        shows=lambda dom: any(v["id"][:8] in dom for v in versions))
    assert any(v["id"][:8] in timeline for v in versions), (
        [v["id"] for v in versions], re.sub(r"<[^>]+>", " ", timeline)[-2000:])
    latest = max(versions, key=lambda v: v["created"])
    short = store.get("tiny-ppo@latest").short
    page = rendered(f"{ui}/artifacts/artifact/{latest['id']}", tmp_path / "c",
                    shows=lambda dom: short in dom)
    assert short in page, page[-2000:]
    assert "flowchart BT" in page      # the Mermaid source of the lineage graph


def webdriver_or_skip():
    """Headless Chromium under Selenium, with Debian's chromedriver (.ci/run installs both)."""
    import shutil
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]')")
    driver = shutil.which("chromedriver")
    if chromium() is None or driver is None:
        pytest.skip("chromium and chromedriver are not installed "
                    "(apt-get install chromium chromium-driver)")
    opts = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,3000"):
        opts.add_argument(arg)
    opts.binary_location = shutil.which(chromium())
    return webdriver.Chrome(service=Service(driver), options=opts)


@pytest.mark.browser
def test_a_stage_started_from_the_typed_form_trains_with_the_changed_field(served, tmp_path):
    """A person's path: open the pretrain deployment's Run form, pick the tiny config, change
    the learning rate in the typed settings, press Submit; the model's resolved config carries
    the new rate, and the fields left alone did not override the chosen YAML."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    http, ids, store, store_root, root = served
    ui = str(http.base_url).rstrip("/").removesuffix("/api")
    browser = webdriver_or_skip()

    def field(label: str, kind: str):
        return browser.find_element(
            By.XPATH, f"//label[starts-with(normalize-space(.), '{label}')]/following::{kind}[1]")

    def type_into(element, text: str):
        element.click()
        element.send_keys(Keys.CONTROL, "a")
        element.send_keys(Keys.DELETE)
        element.send_keys(text, Keys.TAB)
    before = {r["id"] for r in http.post("/flow_runs/filter", json={"flow_runs": {
        "deployment_id": {"any_": [ids["pretrain/pretrain"]]}}}).json()}
    try:
        browser.get(f"{ui}/deployments/deployment/{ids['pretrain/pretrain']}/run")
        wait_for("the Run form never showed optim.lr", lambda: browser.find_elements(
            By.XPATH, "//label[starts-with(normalize-space(.), 'optim.lr')]") or None, 60, 0.5)
        type_into(field("Config", "textarea"), "configs/tiny/pretrain.yaml")
        type_into(field("optim.lr", "input"), "0.0015")
        assert field("optim.lr", "input").get_attribute("value") == "0.0015"
        browser.find_element(By.XPATH, "//button[@type='submit' and normalize-space(.)='Submit']"
                             ).click()

        def created():
            runs = http.post("/flow_runs/filter", json={"flow_runs": {"deployment_id": {
                "any_": [ids["pretrain/pretrain"]]}}}).json()
            return next((r for r in runs if r["id"] not in before), None)
        run = wait_for("Submit created no flow run", created, 60)
    except Exception:
        browser.save_screenshot(str(tmp_path / "form.png"))
        raise
    finally:
        browser.quit()
    assert run["parameters"]["settings"]["optim__lr"] == 0.0015
    assert final_state(http, run["id"], 600) == "COMPLETED", \
        (root / "serve.log").read_text()[-4000:]
    model = next(store.get(v.digest) for v in store.versions("tiny-pretrain")
                 if store.get(v.digest).manifest.get("flow_run_id") == run["id"])
    config = model.manifest["config"]
    assert config["optim"]["lr"] == 0.0015
    # the form showed the deployment's demo values; left alone, they did not override tiny's
    assert config["data"]["mixture"] == "datasets_cfg/tiny_mixture.yaml"
    assert config["train"]["max_steps"] == 6
