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


def test_pipeline_flow_runs_stage_and_publishes_lineage(harness, tmp_path):
    import asyncio
    from prefect.client.orchestration import get_client
    from flows.pipeline import alignment_pipeline
    params = PRESETS["tiny"].model_copy(deep=True)
    params.store = str(tmp_path / "store")
    out = alignment_pipeline(params)
    store = ArtifactStore(params.store)
    art = store.get(out["pretrain"])
    assert art.manifest["name"] == "tiny-pretrain" and art.manifest["flow_run_id"]

    async def artifacts():
        async with get_client() as client:
            return {a.key: a for a in await client.read_artifacts() if a.key}
    got = asyncio.run(artifacts())
    assert "tiny-pretrain-lineage" in got and "tiny-pretrain-metrics" in got
    assert art.short in got["tiny-pretrain-lineage"].data
    assert "flowchart BT" in got["tiny-pretrain-lineage"].data

    # a second run with unchanged inputs reuses the model instead of training again
    again = alignment_pipeline(params)
    assert again["pretrain"] == out["pretrain"]
    assert len(store.versions("tiny-pretrain")) == 1
