"""`alignflow server` as a web page on the same machine sees it: a cross-site POST to the API
on 127.0.0.1 must not start anything, and the UI must talk to the port it was started on."""
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from stages.proc import free_port

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    env = {**os.environ, "ALIGNFLOW_HOME": str(root / "home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(root / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "alignflow"), "server", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(f"{base}/api/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.time() < deadline, \
                (root / "server.log").read_text()[-3000:]
            time.sleep(1)
        yield base
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


def test_a_cross_site_post_is_refused_and_a_client_with_the_token_is_served(server):
    # Before: CSRF protection off and CORS "*": any page could POST create_flow_run.
    foreign = {"Origin": "http://evil.example"}
    r = httpx.post(f"{server}/api/deployments/filter", json={}, headers=foreign, timeout=30)
    assert r.status_code == 403, r.text
    pre = httpx.options(f"{server}/api/deployments/filter", timeout=30, headers={
        **foreign, "Access-Control-Request-Method": "POST"})
    assert pre.headers.get("access-control-allow-origin") not in ("*", "http://evil.example")
    token = httpx.get(f"{server}/api/csrf-token", params={"client": "alignflow-test"},
                      timeout=30).json()["token"]
    ok = httpx.post(f"{server}/api/deployments/filter", json={}, timeout=30, headers={
        "Prefect-Csrf-Token": token, "Prefect-Csrf-Client": "alignflow-test"})
    assert ok.status_code == 200, ok.text


def test_the_ui_talks_to_the_port_it_was_started_on(server):
    # Before: `alignflow server --port 4277` served a UI whose API URL said 4200.
    settings = httpx.get(f"{server}/ui-settings", timeout=30).json()
    assert settings["api_url"] == f"{server}/api"
