"""Flows under prefect_test_harness: the pipeline runs the real launcher and publishes artifacts."""
import subprocess
import sys

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.params import PRESETS
from stages.artifacts import ArtifactStore
from tests.conftest import REPO


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    import os
    home = tmp_path_factory.mktemp("prefect")
    old = os.environ.get("PREFECT_HOME")
    os.environ["PREFECT_HOME"] = str(home)
    with prefect_test_harness(server_startup_timeout=120):
        yield
    if old is None:
        os.environ.pop("PREFECT_HOME", None)
    else:
        os.environ["PREFECT_HOME"] = old


def test_flows_never_import_torch():
    code = ("import sys, flows.cli, flows.pipeline, flows.launch, flows.params; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_pipeline_flow_chains_stages_and_publishes_lineage(harness, tmp_path):
    import asyncio
    from prefect.client.orchestration import get_client
    from flows.pipeline import alignment_pipeline
    params = PRESETS["tiny"].model_copy(deep=True)
    params.store = str(tmp_path / "store")
    out = alignment_pipeline(params)
    assert set(out) == {"pretrain", "sft", "rm", "ppo"}
    store = ArtifactStore(params.store)
    pre, sft, rm = (store.get(out[s]) for s in ("pretrain", "sft", "rm"))
    assert pre.manifest["name"] == "tiny-pretrain" and pre.manifest["flow_run_id"]
    assert {p["role"]: p["digest"] for p in sft.parents}["model"] == pre.digest
    assert {p["role"]: p["digest"] for p in rm.parents}["model"] == sft.digest
    ppo = store.get(out["ppo"])
    roles = {p["role"]: p["digest"] for p in ppo.parents}
    assert roles["actor"] == sft.digest and roles["reward"] == rm.digest
    # the flow passed the parent digest, not a name: the command in the manifest says so
    assert f"parent={pre.digest}" in sft.manifest["command"]

    async def artifacts():
        async with get_client() as client:
            return {a.key: a for a in await client.read_artifacts() if a.key}
    got = asyncio.run(artifacts())
    for name in ("tiny-pretrain", "tiny-sft", "tiny-rm", "tiny-ppo"):
        assert f"{name}-lineage" in got and f"{name}-metrics" in got
    assert rm.short in got["tiny-rm-lineage"].data and pre.short in got["tiny-rm-lineage"].data
    assert "flowchart BT" in got["tiny-rm-lineage"].data

    # a second run with unchanged inputs reuses every model instead of training again
    again = alignment_pipeline(params)
    assert again == out
    assert all(len(store.versions(n)) == 1
               for n in ("tiny-pretrain", "tiny-sft", "tiny-rm", "tiny-ppo"))
