"""Flows under prefect_test_harness: the pipeline runs the real launcher and publishes artifacts."""
import shlex
import subprocess
import sys

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.params import PRESETS
from stages.artifacts import ArtifactStore
from stages.configfile import ConfigError
from tests.conftest import REPO


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    import os
    home = tmp_path_factory.mktemp("prefect")
    # The harness isolates the database only: results go to this session's folder too.
    isolated = {"PREFECT_HOME": str(home), "PREFECT_LOCAL_STORAGE_PATH": str(home / "results")}
    old = {k: os.environ.get(k) for k in isolated}
    os.environ.update(isolated)
    with prefect_test_harness(server_startup_timeout=120):
        yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


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
        assert {f"{name}-lineage", f"{name}-metrics", f"{name}-report",
                f"{name}-checkpoint"} <= set(got)
    assert "| gold/accuracy |" in got["tiny-sft-report"].data
    assert "held-out gold accuracy" in got["tiny-sft-report"].data   # the stage's headline
    assert "Sample generations" in got["tiny-ppo-report"].data
    # the curves are in the page itself; a file:// link is one no browser would open there
    assert "![training curves](data:image/png;base64," in got["tiny-ppo-report"].data
    assert "file://" not in got["tiny-ppo-report"].data

    async def progress():
        async with get_client() as client:
            return [a for a in await client.read_artifacts() if a.type == "progress"]
    bars = asyncio.run(progress())
    assert len(bars) >= 4 and all(float(a.data) == 100.0 for a in bars)
    assert rm.short in got["tiny-rm-lineage"].data and pre.short in got["tiny-rm-lineage"].data
    assert "flowchart BT" in got["tiny-rm-lineage"].data

    # a second run with unchanged inputs reuses every model instead of training again
    again = alignment_pipeline(params)
    assert again == out
    assert all(len(store.versions(n)) == 1
               for n in ("tiny-pretrain", "tiny-sft", "tiny-rm", "tiny-ppo"))
    # decided in the flow: no launcher started, so no new progress bar either
    assert len(asyncio.run(progress())) == len(bars)

    # ... and the UI shows those skips as Cached, not as quick Completed launches
    async def launches():
        async with get_client() as client:
            return [r for r in await client.read_task_runs() if r.name.startswith("launch")]
    states = [r.state for r in asyncio.run(launches())]
    cached = [st for st in states if st.name == "Cached"]
    assert len(cached) == 4 and all(st.type.value == "COMPLETED" and "unchanged inputs: "
                                    "reusing tiny-" in st.message for st in cached)
    assert len(states) - len(cached) == 4          # the first run's four launches trained


def test_from_stage_runs_only_the_later_stages(harness, tmp_path):
    """from_stage=rm takes its SFT parent from the rm config (tiny-sft@latest) and runs rm and
    ppo only; a forced rm trains again, to the same weights: the same digest, no new version
    (timings are not part of an artifact's digest)."""
    from flows.pipeline import alignment_pipeline
    params = PRESETS["tiny"].model_copy(deep=True)
    params.store = str(tmp_path / "store")
    first = alignment_pipeline(params)
    # --explain: what would train and why, without running anything
    from flows.launch import explain
    store = ArtifactStore(params.store)

    def plan(p):
        return explain([(st, getattr(p, st).config, getattr(p, st).overrides,
                         getattr(p, st).force) for st in p.stages()], store)
    assert all(" reuse " in line for line in plan(params)), plan(params)
    changed = params.model_copy(deep=True)
    changed.sft.overrides.append("optim.lr=0.002")
    lines = plan(changed)
    assert lines[0].startswith("pretrain  reuse")
    assert lines[1].startswith("sft       train tiny-sft") and "optim.lr: 0.001 -> 0.002" in lines[1]
    assert "an earlier stage trains" in lines[2] and "an earlier stage trains" in lines[3]
    params.from_stage = "rm"
    params.rm.force = True
    out = alignment_pipeline(params)
    assert set(out) == {"rm", "ppo"}
    store = ArtifactStore(params.store)
    assert out["rm"] == first["rm"] and out["ppo"] == first["ppo"]
    assert len(store.versions("tiny-rm")) == 1 and len(store.versions("tiny-sft")) == 1
    roles = {p["role"]: p["digest"] for p in store.get(out["rm"]).parents}
    assert roles["model"] == first["sft"]


def test_a_failed_stage_is_relaunched_as_often_as_asked(harness, tmp_path):
    import asyncio
    from prefect.client.orchestration import get_client
    from flows.params import StageParams
    from flows.pipeline import sft_flow
    params = StageParams(config="configs/tiny/sft.yaml", retries=1, retry_delay_s=0)
    with pytest.raises(Exception, match="stage sft failed"):
        sft_flow(params, parent="0" * 64, store=str(tmp_path / "store"))

    async def launches():
        async with get_client() as client:
            runs = await client.read_task_runs()
            return [r.run_count for r in runs if r.name.startswith("launch")
                    and r.state.is_failed()]
    assert 2 in asyncio.run(launches())


def test_bad_input_fails_once_with_its_message_in_the_flow_run(harness, tmp_path):
    # What the UI shows: the flow run's state message names the field; no relaunch, no start.
    import asyncio
    from prefect.client.orchestration import get_client
    from flows.params import StageParams
    from flows.pipeline import sft_flow
    from stages.configfile import ConfigError
    params = StageParams(config="configs/tiny/sft.yaml", retries=3, retry_delay_s=0,
                         overrides=["optim.lrr=0.1"])
    state = sft_flow(params, store=str(tmp_path / "store"), return_state=True)
    assert state.is_failed() and "unknown field 'optim.lrr'" in state.message
    with pytest.raises(ConfigError):
        state.result()

    async def launch_runs():
        async with get_client() as client:
            return [r for r in await client.read_task_runs(
                flow_run_filter=None) if r.flow_run_id == state.state_details.flow_run_id]
    (run,) = asyncio.run(launch_runs())
    assert run.run_count == 1 and not (tmp_path / "store").exists()


def test_the_run_form_is_typed_from_the_stage_schema(harness, tmp_path, monkeypatch):
    # Before: a config path and free-text overrides; changing a learning rate meant knowing
    # the key's spelling. Now each stage deployment has typed, described settings with the
    # deployment's YAML values as defaults.
    from flows import pipeline
    from flows.deploy import deployments
    from flows.params import StageParams
    dep = next(d for d in deployments([], store=str(tmp_path)) if d.name == "sft")
    schema = dep._parameter_openapi_schema.model_dump()
    lr = schema["definitions"]["SftSettings"]["properties"]["optim__lr"]
    assert lr["title"] == "optim.lr" and lr["default"] == 0.001 and lr["exclusiveMinimum"] == 0
    assert "Peak learning rate" in lr["description"]
    # reference fields name the store's models (the test store has one)
    from stages.artifacts import ArtifactStore
    src = tmp_path / "m"
    src.mkdir()
    (src / "config.json").write_text("{}")
    ArtifactStore(str(tmp_path)).put(src, kind="model", stage="sft", name="my-sft")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "rows.txt").write_text("rows")
    ArtifactStore(str(tmp_path)).put(tmp_path / "d", kind="dataset", stage="sft", name="my-data")
    dep = next(d for d in deployments([], store=str(tmp_path)) if d.name == "rm")
    parent = dep._parameter_openapi_schema.model_dump()["definitions"]["RmSettings"][
        "properties"]["parent"]
    assert "Models in the store when served: my-sft." in parent["description"]
    assert parent["examples"] == ["my-sft"]
    # a changed field becomes an override; unchanged ones leave the chosen YAML alone
    launched = []

    def fake_run_stage(cmd, **kw):
        launched.append(cmd)
        raise RuntimeError("stopped before the launcher")
    monkeypatch.setattr(pipeline, "run_stage", fake_run_stage)
    state = pipeline.sft_flow(StageParams(config="configs/tiny/sft.yaml"),
                              settings=pipeline.SftSettings(optim__lr=0.002),
                              store=str(tmp_path / "store"), return_state=True)
    assert state.is_failed() and "stopped before the launcher" in state.message
    (cmd,) = launched
    assert "optim.lr=0.002" in cmd and not any(a.startswith("train.max_steps=") for a in cmd)
    # a bad value is refused by the form's types and limits, naming the field, before any run
    launched.clear()
    with pytest.raises(Exception, match="optim__lr"):
        pipeline.sft_flow(StageParams(config="configs/tiny/sft.yaml"),
                          settings={"optim__lr": -1}, store=str(tmp_path / "store"))
    assert not launched


def test_deployments_and_schedules_with_parameters(tmp_path):
    from flows.deploy import deployments, load_schedules
    schedules = load_schedules(REPO / "infra" / "schedules.yaml")
    deps = {d.name: d for d in deployments(schedules, store=str(tmp_path))}
    assert set(deps) == {"pipeline-demo", "pipeline-tiny", "pretrain", "sft", "rm", "ppo"}
    nightly = deps["pipeline-demo"].schedules[0]
    assert nightly.schedule.cron == "0 2 * * *"
    assert nightly.parameters["params"]["from_stage"] == "rm"
    # the schedule's parameters are merged into the deployment's, not replacing them
    assert nightly.parameters["params"]["sft"]["config"] == "configs/demo/sft.yaml"
    assert deps["pipeline-tiny"].parameters["params"]["pretrain"]["config"] == \
        "configs/tiny/pretrain.yaml"
    assert deps["pipeline-tiny"].parameters["params"]["store"] == str(tmp_path)
    bad = tmp_path / "s.yaml"
    bad.write_text("schedules:\n  - {deployment: nightly, cron: '0 2 * * *'}\n")
    with pytest.raises(ConfigError, match="unknown deployments .'nightly'."):
        deployments(load_schedules(bad))
    bad.write_text("schedules:\n  - {deployment: rm}\n")
    with pytest.raises(ConfigError, match="exactly one of cron, interval_s"):
        load_schedules(bad)


def test_multi_node_launch_command_through_a_hostfile():
    from flows.launch import build_command
    cmd = build_command("pretrain", REPO / "configs" / "tiny" / "pretrain.yaml",
                        ["deepspeed.hostfile=infra/hostfiles/two-nodes.txt",
                         "deepspeed.num_nodes=2", "deepspeed.num_gpus=2",
                         "train.global_batch_size=16", "deepspeed.master_port=29999"])
    i = cmd.index("--hostfile")
    assert cmd[i + 1].endswith("infra/hostfiles/two-nodes.txt")
    assert cmd[cmd.index("--num_nodes") + 1] == "2" and cmd[cmd.index("--num_gpus") + 1] == "2"
    assert cmd[cmd.index("--master_port") + 1] == "29999"
    assert cmd[cmd.index("--module") + 1] == "stages.pretrain"
    with pytest.raises(ConfigError, match="global_batch_size"):
        build_command("pretrain", REPO / "configs" / "tiny" / "pretrain.yaml",
                      ["deepspeed.hostfile=infra/hostfiles/two-nodes.txt",
                       "deepspeed.num_nodes=2", "deepspeed.num_gpus=2",
                       "train.global_batch_size=6"])


def test_remote_ranks_get_store_and_work_dir_on_the_command_line(tmp_path, monkeypatch):
    # Before: the store and home reached remote ranks only through the environment, which
    # DeepSpeed's pdsh runner does not forward; they wrote to a node-local default store.
    from flows.launch import build_command
    from stages.config import SCHEMAS
    from stages.configfile import parse_stage_args
    monkeypatch.setenv("ALIGNFLOW_STORE", str(tmp_path / "team-store"))
    tiny = REPO / "configs" / "tiny" / "pretrain.yaml"
    hostfile = ["deepspeed.hostfile=infra/hostfiles/two-nodes.txt", "deepspeed.num_nodes=2",
                "deepspeed.num_gpus=2", "train.global_batch_size=16"]
    cmd = build_command("pretrain", tiny, hostfile)
    assert f"run.store={tmp_path / 'team-store'}" in cmd
    assert f"run.work_dir={tmp_path / 'home' / 'runs' / 'tiny-pretrain'}" in cmd
    # The runner joins arguments into a remote shell command: none may hold what a shell
    # would interpret, and the stage still reads the value exactly.
    odd = "/shared/my runs/$USER;touch x 'q'"
    cmd = build_command("pretrain", tiny, [*hostfile, f"run.work_dir={odd}", "optim.lr=0.002"])
    args = cmd[cmd.index("--config"):]
    assert all(shlex.quote(a) == a for a in args[2:]), args
    cfg, _, _ = parse_stage_args(SCHEMAS["pretrain"], args)
    assert cfg.run.work_dir == odd and cfg.optim.lr == 0.002
    assert cfg.run.store == str(tmp_path / "team-store")


def test_launch_key_follows_every_input(tmp_path):
    """The flow's skip key changes with the config, a dataset YAML it names, the files that
    YAML lists and the digest a parent name resolves to; an unresolvable parent gives None."""
    import shutil
    from flows.launch import launch_key
    from tests.conftest import put
    store = ArtifactStore(tmp_path / "store")
    put(store, tmp_path, {"config.json": b"{}"}, kind="model", stage="pretrain", name="m")
    data = tmp_path / "sft.yaml"
    shutil.copy(REPO / "datasets_cfg" / "tiny_sft.yaml", data)
    faq = tmp_path / "faq.jsonl"
    shutil.copy(REPO / "tests" / "data" / "tiny" / "faq.jsonl", faq)
    data.write_text(data.read_text().replace("tests/data/tiny/faq.jsonl", str(faq)))
    cfg = REPO / "configs" / "tiny" / "sft.yaml"
    over = ["parent=m@latest", f"data.dataset={data}"]
    base = launch_key("sft", cfg, over, store)
    assert base and launch_key("sft", cfg, over, store) == base
    assert launch_key("sft", cfg, over + ["optim.lr=2e-3"], store) != base
    faq.write_text(faq.read_text() + faq.read_text().splitlines()[0] + "\n")
    changed_file = launch_key("sft", cfg, over, store)
    assert changed_file != base
    data.write_text(data.read_text().replace("seed: 1", "seed: 5"))
    assert launch_key("sft", cfg, over, store) not in (base, changed_file)
    before = launch_key("sft", cfg, over, store)
    put(store, tmp_path, {"config.json": b"{ }"}, kind="model", stage="pretrain", name="m")
    assert launch_key("sft", cfg, over, store) != before          # m@latest moved
    assert launch_key("sft", cfg, ["parent=nothing@latest", f"data.dataset={data}"],
                      store) is None


def test_serve_installs_the_automation_that_crashes_dead_runs(harness):
    # Before: a flow process killed by SIGKILL or the OOM killer left its runs Running for ever.
    import asyncio
    from datetime import timedelta

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from flows.deploy import HEARTBEAT_S, ZOMBIE_AUTOMATION, ensure_automations
    ensure_automations()
    ensure_automations()                                       # once per server, not per serve

    async def read():
        async with get_client() as client:
            return await client.read_automations_by_name(ZOMBIE_AUTOMATION)
    (auto,) = asyncio.run(read())
    assert auto.trigger.posture == "Proactive" and auto.trigger.within == timedelta(
        seconds=3 * HEARTBEAT_S)
    assert "prefect.flow-run.heartbeat" in auto.trigger.expect
    assert auto.actions[0].state == StateType.CRASHED


def test_a_report_on_an_object_store_points_into_the_store(tmp_path):
    import os
    from flows.pipeline import report
    from tests.conftest import put
    store = ArtifactStore(f"memory://alignflow-report-{os.getpid()}")
    art = put(store, tmp_path, {"model.safetensors": b"w"}, kind="model", stage="sft",
              name="remote-sft", metrics={"eval/loss": 1.0},
              extra={"headline": {"metric": "eval/loss", "value": 1.0, "text": "loss 1.0"}})
    text = report("sft", art, store)
    assert f"Checkpoint: `{store.root}/artifacts/{art.digest}`" in text
    assert f"alignflow --store {store.root} show {art.short}" in text
