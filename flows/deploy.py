"""Deployments: the pipeline and each stage, so the Prefect UI can start, rerun and schedule them.

`alignflow serve` serves them all from one process (the embedded default: no work pool, no
worker). For GPU machines, infra/prefect.yaml declares the same deployments on a `process` work
pool with one worker per machine. Schedules come from a YAML file (infra/schedules.yaml) and
carry parameters, e.g. a nightly reward-model retrain followed by PPO.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from flows.params import PRESETS
from stages.configfile import ConfigError, Strict, load_config


class ScheduleEntry(Strict):
    deployment: str = Field(description="Deployment name, e.g. pipeline-demo or rm.")
    cron: str | None = None
    interval_s: float | None = Field(None, gt=0)
    timezone: str = "UTC"
    parameters: dict = Field(default_factory=dict, description="Overrides of the deployment's "
                             "default parameters for runs from this schedule.")


class ScheduleFile(Strict):
    schedules: list[ScheduleEntry] = Field(default_factory=list)


class TriggerEntry(Strict):
    deployment: str = Field(description="Deployment to run, e.g. ppo.")
    description: str = ""
    match: dict[str, str] = Field(description="Labels of the committed artifact's event, e.g. "
                                  "{alignflow.kind: model, alignflow.stage: rm}.")
    parameters: dict = Field(default_factory=dict, description="Overrides of the deployment's "
                             "parameters; Jinja templates see the event.")


class TriggerFile(Strict):
    triggers: list[TriggerEntry] = Field(default_factory=list)


def load_triggers(path: str | Path) -> list[TriggerEntry]:
    entries = load_config(TriggerFile, path, what="automations file").triggers
    for i, t in enumerate(entries):
        bad = [k for k in t.match if not k.startswith("alignflow.")]
        if bad:
            raise ConfigError(f"{path}: triggers.{i}.match: {bad[0]!r} is not an alignflow "
                              f"label (alignflow.kind, .stage, .name, .data, .standalone)")
    return entries


def load_schedules(path: str | Path) -> list[ScheduleEntry]:
    entries = load_config(ScheduleFile, path, what="schedules file").schedules
    for i, s in enumerate(entries):
        if (s.cron is None) == (s.interval_s is None):
            raise ConfigError(f"{path}: schedules.{i}: give exactly one of cron, interval_s")
    return entries


def deployments(schedules: list[ScheduleEntry] = (), store: str | None = None,
                triggers: list[TriggerEntry] = ()) -> list:
    """RunnerDeployments of the pipeline (demo and tiny presets) and of each stage, with the
    schedules and event triggers given."""
    from prefect.events import DeploymentEventTrigger
    from prefect.schedules import Cron, Interval

    from flows.pipeline import COMMITTED

    from flows.pipeline import alignment_pipeline, ppo_flow, pretrain_flow, rm_flow, sft_flow

    def pipeline_params(preset: str) -> dict:
        p = PRESETS[preset].model_copy(deep=True)
        p.store = store
        return {"params": p.model_dump(mode="json")}

    specs = {
        "pipeline-demo": (alignment_pipeline, pipeline_params("demo"),
                          "The demo pipeline: corpus, pretrain, sft, rm, ppo."),
        "pipeline-tiny": (alignment_pipeline, pipeline_params("tiny"),
                          "The tiny pipeline: seconds per stage, for smoke tests."),
        "pretrain": (pretrain_flow, {"store": store}, "One pretrain run."),
        "sft": (sft_flow, {"store": store}, "SFT of an existing model (parent: digest or "
                "name@version; empty: the config's)."),
        "rm": (rm_flow, {"store": store}, "A reward model from an existing SFT model."),
        "ppo": (ppo_flow, {"store": store}, "PPO from existing SFT and reward models."),
    }
    unknown = {s.deployment for s in [*schedules, *triggers]} - set(specs)
    if unknown:
        raise ConfigError(f"schedules or triggers name unknown deployments {sorted(unknown)}; "
                          f"known: {', '.join(specs)}")
    out = []
    for name, (fl, params, description) in specs.items():
        sched = []
        for s in schedules:
            if s.deployment != name:
                continue
            merged = _merge(params, s.parameters)
            sched.append(Cron(s.cron, timezone=s.timezone, parameters=merged) if s.cron else
                         Interval(s.interval_s, parameters=merged))
        events = [DeploymentEventTrigger(
            name=t.description or f"{name} on {t.match}", description=t.description,
            expect={COMMITTED}, match={"prefect.resource.id": "alignflow.artifact.*", **t.match},
            parameters=_merge(params, t.parameters)) for t in triggers if t.deployment == name]
        out.append(fl.to_deployment(name=name, parameters=params, description=description,
                                    schedules=sched or None, triggers=events or None,
                                    tags=["alignflow"]))
    names = model_names(store)
    for dep in out:
        list_model_names(dep, names)
    return out


REFERENCES = ("parent", "actor", "reward", "model__init_from")   # settings fields naming models


def model_names(store: str | None) -> list[str]:
    """The names in the store whose latest version is a model (a damaged one is left out)."""
    from stages.artifacts import ArtifactStore
    st, out = ArtifactStore(store), []
    try:
        names = st.names()
    except Exception:   # noqa: BLE001 - an unreadable store lists nothing; serving goes on
        return []
    for name in names:
        try:
            versions = st.versions(name)
            if versions and st.get(versions[-1].digest, verify=False).kind == "model":
                out.append(name)
        except Exception:   # noqa: BLE001
            continue
    return out


def list_model_names(deployment, names: list[str]) -> None:
    """Reference fields of a stage's Run form say which models the store held when served: a
    described string rather than an enum, so a digest or `name@3` still goes (and a model made
    after serving too)."""
    if not names:
        return
    # the schema Prefect registers for the deployment; Prefect edits it the same way for
    # read-only parameters
    for definition in (deployment._parameter_openapi_schema.definitions or {}).values():
        for key in REFERENCES:
            prop = definition.get("properties", {}).get(key)
            if prop is not None:
                prop["description"] = (f"{prop.get('description') or ''} Models in the store "
                                       f"when served: {', '.join(names)}.").strip()
                prop["examples"] = names


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


ZOMBIE_AUTOMATION = "alignflow: crash runs that stopped beating"
HEARTBEAT_S = 60


def zombie_automation():
    """A flow run whose process died (SIGKILL, OOM, a lost node) stays Running for ever: the
    process that would report its end is gone. Runs started by `alignflow serve` send a
    heartbeat every HEARTBEAT_S; this automation marks a run Crashed when three beats are
    missing (Prefect's recipe for zombie flow runs), so the UI and retries see the truth. The
    job itself is already stopped by its guard (stages/proc.py)."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification
    ends = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}
    return Automation(
        name=ZOMBIE_AUTOMATION,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"}, expect={"prefect.flow-run.heartbeat", *ends},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=3 * HEARTBEAT_S)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {3 * HEARTBEAT_S} s: the flow "
                                            f"process died")])


def ensure_automations() -> None:
    """Create the automations alignflow relies on, once per server."""
    from prefect.automations import Automation
    try:
        Automation.read(name=ZOMBIE_AUTOMATION)
    except ValueError:
        zombie_automation().create()
