"""Prefect flows: the pipeline diagram and one subflow per stage. They only orchestrate: build
the launch command, stream its output into the Prefect logs, pass artifact references, publish
Prefect artifacts. Everything heavy happens in the stage processes."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import get_run_context

from flows.launch import build_command, run_stage
from flows.params import PipelineParams, StageParams
from stages import lineage
from stages.artifacts import ArtifactStore


@task(name="corpus")
def corpus_task(recipe: str, store: str | None) -> str:
    """Build (or reuse) the corpus artifact a mixture reads."""
    from stages.corpus import build_corpus
    log = get_run_logger()
    return build_corpus(recipe, ArtifactStore(store), log=log.info).digest


@task(name="launch")
def launch_task(stage: str, params: StageParams, store: str | None,
                parents: dict[str, str] | None = None) -> str:
    """Run `deepspeed --module stages.<stage>` and return the artifact digest it printed.
    `parents` (config field -> digest) pins the exact artifacts the previous stages produced."""
    log = get_run_logger()
    overrides = [*([f"run.store={store}"] if store else []),
                 *(["run.force=true"] if params.force else []),
                 *(f"{k}={v}" for k, v in (parents or {}).items()), *params.overrides]
    cmd = build_command(stage, params.config, overrides)
    log.info("launching: %s", " ".join(cmd))
    # A relaunch after a failure finds the same work directory (keyed by the stage's inputs)
    # and resumes from its last complete checkpoint.
    ctx = get_run_context()
    run_id = str(getattr(getattr(ctx, "task_run", None), "flow_run_id", "") or "")
    code, digest = run_stage(cmd, env={"ALIGNFLOW_FLOW_RUN_ID": run_id}, on_line=log.info)
    if code != 0 or not digest:
        raise RuntimeError(f"stage {stage} failed with exit code {code}; see the log above")
    return digest


def publish(stage: str, digest: str, store: ArtifactStore) -> None:
    """Report, metrics table and the model's lineage as Prefect artifacts."""
    art = store.get(digest, verify=False)
    name = art.manifest.get("name") or stage
    g = lineage.build(store, digest)
    metrics = {k: v for k, v in art.manifest.get("metrics", {}).items()
               if isinstance(v, (int, float))}
    create_table_artifact(key=f"{slug(name)}-metrics", table=[
        {"metric": k, "value": round(v, 6) if isinstance(v, float) else v}
        for k, v in sorted(metrics.items())], description=f"{stage} metrics of {art.short}")
    create_markdown_artifact(key=f"{slug(name)}-lineage", description=f"lineage of {name}",
                             markdown=f"# {name} `{art.short}`\n\nStore: `{store.root}`\n\n"
                                      f"```\n{lineage.render_text(g)}\n```\n\n"
                                      f"```mermaid\n{lineage.render_mermaid(g)}\n```\n")


def slug(name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in name.lower())


def launch(stage: str, params: StageParams, store: str | None,
           parents: dict[str, str] | None = None) -> str:
    return launch_task.with_options(retries=params.retries,
                                    retry_delay_seconds=params.retry_delay_s)(
        stage, params, store, parents)


@flow(name="pretrain")
def pretrain_flow(params: StageParams = StageParams(config="configs/demo/pretrain.yaml"),
                  store: str | None = None) -> str:
    """Pretrain on the config's mixture (default: the demo model on the demo corpus)."""
    digest = launch("pretrain", params, store)
    publish("pretrain", digest, ArtifactStore(store))
    return digest


@flow(name="sft")
def sft_flow(params: StageParams = StageParams(config="configs/demo/sft.yaml"),
             parent: str | None = None, store: str | None = None) -> str:
    """Fine-tune `parent` (a digest or name@version; default: the config's parent)."""
    digest = launch("sft", params, store, {"parent": parent} if parent else None)
    publish("sft", digest, ArtifactStore(store))
    return digest


@flow(name="rm")
def rm_flow(params: StageParams = StageParams(config="configs/demo/rm.yaml"),
            parent: str | None = None, store: str | None = None) -> str:
    """Train a reward model from the SFT model `parent` (default: the config's parent)."""
    digest = launch("rm", params, store, {"parent": parent} if parent else None)
    publish("rm", digest, ArtifactStore(store))
    return digest


def validate(params: PipelineParams) -> None:
    """Load every stage's config with its overrides: a typo in the last stage fails now, not
    after the first stages have trained."""
    from stages.config import SCHEMAS, ConfigError, load_config
    if not params.stages():
        raise ConfigError(f"from_stage={params.from_stage}: that stage has no parameters")
    for stage in params.stages():
        p = getattr(params, stage)
        load_config(SCHEMAS[stage], p.config, p.overrides)


@flow(name="ppo")
def ppo_flow(params: StageParams = StageParams(config="configs/demo/ppo.yaml"),
             actor: str | None = None, reward: str | None = None,
             store: str | None = None) -> str:
    """PPO on the SFT model `actor` against the reward model `reward` (defaults: the config's)."""
    pins = {k: v for k, v in (("actor", actor), ("reward", reward)) if v}
    digest = launch("ppo", params, store, pins)
    publish("ppo", digest, ArtifactStore(store))
    return digest


@flow(name="alignment-pipeline")
def alignment_pipeline(params: PipelineParams = PipelineParams()) -> dict[str, str]:
    """corpus -> pretrain -> sft -> rm -> ppo, from `from_stage` on. Unchanged stages are
    skipped from the artifact store, so a failed run started again resumes at the stage that
    failed (and that stage at its last checkpoint)."""
    validate(params)
    run = params.stages()
    out: dict[str, str] = {}
    if "pretrain" in run:
        if params.corpus:
            out["corpus"] = corpus_task(params.corpus, params.store)
        out["pretrain"] = pretrain_flow(params.pretrain, params.store)
    if "sft" in run:
        out["sft"] = sft_flow(params.sft, out.get("pretrain"), params.store)
    if "rm" in run:
        out["rm"] = rm_flow(params.rm, out.get("sft"), params.store)
    if "ppo" in run:
        out["ppo"] = ppo_flow(params.ppo, out.get("sft"), out.get("rm"), params.store)
    return out
