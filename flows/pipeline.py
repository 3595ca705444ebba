"""Prefect flows: the pipeline diagram and one subflow per stage. They only orchestrate: build
the launch command, stream its output into the Prefect logs, pass artifact references, publish
Prefect artifacts. Everything heavy happens in the stage processes."""

from __future__ import annotations

import base64
import json
import re

from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_link_artifact, create_markdown_artifact,
                               create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from prefect.context import get_run_context

from flows.launch import build_command, launch_inputs, run_stage
from flows.params import PipelineParams, StageParams, form_overrides, settings_form
from stages import lineage
from stages.config import STAGES
from stages.artifacts import ArtifactStore, json_digest, now_iso
from stages.metrics import BASELINE, canonical, headline_of


@task(name="corpus")
def corpus_task(recipe: str, store: str | None) -> str:
    """Build (or reuse) the corpus artifact a mixture reads."""
    from stages.corpus import build_corpus
    log = get_run_logger()
    started = now_iso()
    st = ArtifactStore(store)
    digest = build_corpus(recipe, st, log=log.info).digest
    announce(st, digest, started)
    return digest


@task(name="import")
def import_task(source: str, store: str | None) -> str:
    """Import (or reuse) a pretrained model: the SFT parent of a pipeline that starts there.
    In a child process, as every stage: the flow never imports torch."""
    import sys
    from flows.launch import run_stage
    log = get_run_logger()
    started = now_iso()
    st = ArtifactStore(store)
    code, digest = run_stage([sys.executable, "-m", "stages.imports", source,
                              "--store", st.root], on_line=log.info)
    if code != 0 or not digest:
        raise RuntimeError(f"import of {source} failed (exit {code}); its last lines are above")
    announce(st, digest, started)
    return digest


COMMITTED = "alignflow.artifact.committed"


def announce(store: ArtifactStore, digest: str, since: str) -> None:
    """A Prefect event per artifact this launch committed: the result and any parent it built
    (tokenizer, dataset, example set). Automations chain stages on them
    (infra/automations.yaml); `alignflow.standalone` says whether a pipeline run goes on by
    itself (false) or nothing follows unless an automation starts it (true)."""
    from prefect.events import emit_event
    from prefect.runtime import flow_run
    standalone = "false" if flow_run.parent_flow_run_id else "true"
    art = store.get(digest, verify=False)
    for a in [art, *(store.get(p["digest"], verify=False) for p in art.parents)]:
        if a.manifest.get("created", "") < since:
            continue      # reused, not committed now
        emit_event(COMMITTED, resource=artifact_resource(store, a, standalone),
                   related=[{"prefect.resource.id": f"alignflow.artifact.{p['digest']}",
                             "prefect.resource.role": p.get("role", "parent")}
                            for p in a.parents],
                   payload={"digest": a.digest, "name": a.manifest.get("name"),
                            "parents": a.parents, "headline": headline_of(a.manifest)["text"]})


def artifact_resource(store: ArtifactStore, art, standalone: str) -> dict[str, str]:
    name = art.manifest.get("name") or ""
    version = next((v.version for v in reversed(store.versions(name)) if v.digest == art.digest),
                   None) if name else None
    return {"prefect.resource.id": f"alignflow.artifact.{art.digest}",
            "prefect.resource.name": f"{name}@{version}" if version else art.short,
            "alignflow.digest": art.digest, "alignflow.kind": art.kind,
            "alignflow.stage": art.stage or "data", "alignflow.name": name,
            "alignflow.version": str(version or ""),
            "alignflow.data": art.manifest.get("example_stats", {}).get("kind", ""),
            "alignflow.standalone": standalone}


@task(name="launch")
def launch_task(stage: str, params: StageParams, store: str | None,
                parents: dict[str, str] | None = None, form: list[str] = ()) -> str:
    """Run `deepspeed --module stages.<stage>` and return the artifact digest it printed.
    `parents` (config field -> digest) pins the exact artifacts the previous stages produced;
    `form` are the Run form's changed settings as overrides (the free-text ones come last)."""
    log = get_run_logger()
    started = now_iso()
    ctx = get_run_context()
    run_id = str(getattr(getattr(ctx, "task_run", None), "flow_run_id", "") or "")
    # What a rank needs is on its command line: DeepSpeed's multi-node runner forwards only a
    # few environment variables to the other nodes.
    overrides = [*([f"run.store={store}"] if store else []),
                 *([f"run.flow_run_id={run_id}"] if run_id else []),
                 *(["run.force=true"] if params.force else []), *form,
                 *(f"{k}={v}" for k, v in (parents or {}).items()), *params.overrides]
    cmd = build_command(stage, params.config, overrides)
    # Decided here, before any launcher starts: an unchanged stage costs a second, not the
    # launcher's start and the stage's data checks.
    st = ArtifactStore(store)
    inputs = launch_inputs(stage, params.config, overrides, st)
    key = json_digest(inputs) if inputs and not params.force else None
    if key and (hit := st.find_by_inputs(f"launch-{key}")) is not None:
        if hit.manifest.get("name"):
            st.tag(hit.manifest["name"], hit.digest)
        log.info("unchanged inputs: reusing %s %s %s without launching (force=true retrains)",
                 stage, hit.manifest.get("name"), hit.short)
        return cached(hit.digest, f"unchanged inputs: reusing {hit.manifest.get('name')} "
                                  f"{hit.short} without launching")
    log.info("launching: %s", " ".join(cmd))
    # A relaunch after a failure finds the same work directory (keyed by the stage's inputs)
    # and resumes from its last complete checkpoint.
    progress = Progress(stage)
    reused = []
    code, digest = run_stage(cmd, on_line=lambda line: (
        log.info(line), progress.see(line),
        "unchanged inputs: reusing" in line and reused.append(line)))
    progress.done()
    if code != 0 or not digest:
        raise RuntimeError(f"stage {stage} failed with exit code {code}; see the log above")
    if inputs:
        st.remember(f"launch-{json_digest(inputs)}", digest, detail={
            "stage": stage, "name": st.get(digest, verify=False).manifest.get("name"),
            "inputs": inputs})
    announce(st, digest, started)
    if reused:     # the stage itself found an identical earlier result
        return cached(digest, reused[0].split("] ", 1)[-1])
    return digest


def cached(digest: str, message: str):
    """The task's end state when nothing was trained: Completed, named Cached, so the UI shows
    the skip for what it is; its result is still the digest."""
    from prefect.states import Completed
    return Completed(data=digest, name="Cached", message=message)


class Progress:
    """A Prefect progress artifact moved by the step counters in the stage's output: our
    stages log "step N/M", the HF trainers' progress bars print "N/M ["."""

    STEP = re.compile(r"(?:step |\| ?)(\d+)/(\d+)\b")

    def __init__(self, stage: str):
        self.id = create_progress_artifact(0.0, description=f"{stage}: training progress")
        self.shown = 0

    def see(self, line: str) -> None:
        found = self.STEP.findall(line)
        if found and int(found[-1][1]) > 0:
            pct = min(100, int(100 * int(found[-1][0]) / int(found[-1][1])))
            if pct > self.shown:   # one update per percent, not one per line
                self.shown = pct
                update_progress_artifact(self.id, float(pct))

    def done(self) -> None:
        if self.shown < 100:
            update_progress_artifact(self.id, 100.0)


def report(stage: str, art, store: ArtifactStore) -> str:
    """Markdown: metrics against the parent, config changes since the previous version,
    sample generations, curves and where the checkpoint is."""
    m = canonical(art.manifest.get("metrics", {}), art.stage)
    name = art.manifest.get("name") or stage
    lines = [f"# {stage} `{name}` {art.short}", "", headline_of(art.manifest)["text"], "",
             "| metric | this model | baseline |", "|---|---|---|"]
    for k, v in sorted(m.items()):
        if isinstance(v, (int, float)) and not k.startswith(BASELINE):
            lines.append(f"| {k} | {_fmt(v)} | {_fmt(m.get(BASELINE + k, ''))} |")
    history = store.versions(name)
    older = [v.digest for v in history if v.digest != art.digest]
    if older:
        d = lineage.diff(store, older[-1], art.digest)
        lines += ["", f"## Changes since the previous version ({older[-1][:12]})", "",
                  "```", lineage.render_diff(d, lineage.labels(store)), "```"]
    files = store.local_path(art.digest) if store.local else None
    samples = files / "samples.json" if files else None
    if samples and samples.exists():
        lines += ["", "## Sample generations", "", "| prompt | response | answer |", "|---|---|---|"]
        for r in json.loads(samples.read_text())[:8]:
            cells = [str(r.get(k, "")).replace("|", "\\|").replace("\n", " ")[:80]
                     for k in ("prompt", "response", "answer")]
            lines.append("| " + " | ".join(cells) + " |")
    if files and (files / "curves.png").exists() and \
            (files / "curves.png").stat().st_size <= CURVES_INLINE_MAX:
        # Inline: a file:// link is one no browser on the UI's page will open.
        data = base64.b64encode((files / "curves.png").read_bytes()).decode()
        lines += ["", "## Training curves", "", f"![training curves](data:image/png;base64,{data})"]
    where = files if files else f"{store.root.rstrip('/')}/artifacts/{art.digest}"
    lines += ["", f"Checkpoint: `{where}`  (`alignflow --store {store.root} show {art.short}`; "
                  f"loads with `from_pretrained` once local)"]
    return "\n".join(lines) + "\n"


CURVES_INLINE_MAX = 1 << 20     # bytes of PNG a report embeds


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def publish(stage: str, digest: str, store: ArtifactStore) -> None:
    """Report, metrics table, checkpoint link and the model's lineage as Prefect artifacts.
    Also on a skip, so the UI shows every run complete."""
    art = store.get(digest, verify=False)
    name = art.manifest.get("name") or stage
    g = lineage.build(store, digest)
    create_markdown_artifact(key=f"{slug(name)}-report", markdown=report(stage, art, store),
                             description=f"{stage} report of {art.short}")
    # On an object store the link is the artifact's URL there (s3://, gs://, https://).
    create_link_artifact(key=f"{slug(name)}-checkpoint",
                         link=f"file://{store.local_path(digest)}" if store.local else
                         f"{store.root.rstrip('/')}/artifacts/{digest}",
                         link_text=f"{name} {art.short}", description="the exported model")
    metrics = {k: v for k, v in canonical(art.manifest.get("metrics", {}), art.stage).items()
               if isinstance(v, (int, float))}
    create_table_artifact(key=f"{slug(name)}-metrics", table=[
        {"metric": k, "value": round(v, 6) if isinstance(v, float) else v}
        for k, v in sorted(metrics.items())], description=f"{stage} metrics of {art.short}")
    create_markdown_artifact(key=f"{slug(name)}-lineage", description=f"lineage of {name}",
                             markdown=f"# {name} `{art.short}`\n\nStore: `{store.root}`\n\n"
                                      f"```mermaid\n{lineage.render_mermaid(g)}\n```\n\n"
                                      f"```\n{lineage.render_text(g)}\n```\n")


def slug(name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in name.lower())


def retriable(task, task_run, state) -> bool:
    """Bad input found before the launch (a config error) fails the same way every time:
    relaunching it only delays the error the UI shows."""
    from stages.configfile import ConfigError
    return not isinstance(state.result(raise_on_failure=False), ConfigError)


def launch(stage: str, params: StageParams, store: str | None,
           parents: dict[str, str] | None = None, settings=None) -> str:
    form = form_overrides(settings, SETTINGS[stage]())
    return launch_task.with_options(retries=params.retries, retry_condition_fn=retriable,
                                    retry_delay_seconds=params.retry_delay_s)(
        stage, params, store, parents, form, return_state=True).result()


# The Run form of each stage deployment: typed fields from the stage's schema, shown with the
# values of the config the deployment runs by default.
SETTINGS = {stage: settings_form(stage, f"configs/demo/{stage}.yaml") for stage in STAGES}
PretrainSettings, SftSettings, RmSettings, PpoSettings = (SETTINGS[s] for s in STAGES)


@flow(name="pretrain")
def pretrain_flow(params: StageParams = StageParams(config="configs/demo/pretrain.yaml"),
                  settings: PretrainSettings = PretrainSettings(),
                  store: str | None = None) -> str:
    """Pretrain on the config's mixture (default: the demo model on the demo corpus)."""
    digest = launch("pretrain", params, store, settings=settings)
    publish("pretrain", digest, ArtifactStore(store))
    return digest


@flow(name="sft")
def sft_flow(params: StageParams = StageParams(config="configs/demo/sft.yaml"),
             settings: SftSettings = SftSettings(), parent: str | None = None,
             store: str | None = None) -> str:
    """Fine-tune `parent` (a digest or name@version; default: the config's parent)."""
    digest = launch("sft", params, store, {"parent": parent} if parent else None, settings)
    publish("sft", digest, ArtifactStore(store))
    return digest


@flow(name="rm")
def rm_flow(params: StageParams = StageParams(config="configs/demo/rm.yaml"),
            settings: RmSettings = RmSettings(), parent: str | None = None,
            store: str | None = None) -> str:
    """Train a reward model from the SFT model `parent` (default: the config's parent)."""
    digest = launch("rm", params, store, {"parent": parent} if parent else None, settings)
    publish("rm", digest, ArtifactStore(store))
    return digest


def validate(params: PipelineParams) -> None:
    """Load every stage's config with its overrides: a typo in the last stage fails now, not
    after the first stages have trained."""
    from stages.config import load_stage_config
    from stages.configfile import ConfigError
    if not params.stages():
        raise ConfigError(f"from_stage={params.from_stage}: that stage has no parameters")
    for stage in params.stages():
        p = getattr(params, stage)
        load_stage_config(stage, p.config, p.overrides)


@flow(name="ppo")
def ppo_flow(params: StageParams = StageParams(config="configs/demo/ppo.yaml"),
             settings: PpoSettings = PpoSettings(), actor: str | None = None,
             reward: str | None = None, store: str | None = None) -> str:
    """PPO on the SFT model `actor` against the reward model `reward` (defaults: the config's)."""
    pins = {k: v for k, v in (("actor", actor), ("reward", reward)) if v}
    digest = launch("ppo", params, store, pins, settings)
    publish("ppo", digest, ArtifactStore(store))
    return digest


@flow(name="alignment-pipeline")
def alignment_pipeline(params: PipelineParams = PipelineParams()) -> dict[str, str]:
    """corpus -> pretrain -> sft -> rm -> ppo (or import -> sft -> ...), from `from_stage` on.
    Unchanged stages are
    skipped from the artifact store, so a failed run started again resumes at the stage that
    failed (and that stage at its last checkpoint)."""
    validate(params)
    run = params.stages()
    out: dict[str, str] = {}
    if "pretrain" in run:
        if params.corpus:
            out["corpus"] = corpus_task(params.corpus, params.store)
        out["pretrain"] = pretrain_flow(params.pretrain, store=params.store)
    if params.model and run[0] == "sft":
        out["import"] = import_task(params.model, params.store)
    if "sft" in run:
        out["sft"] = sft_flow(params.sft, parent=out.get("pretrain") or out.get("import"),
                              store=params.store)
    if "rm" in run:
        out["rm"] = rm_flow(params.rm, parent=out.get("sft"), store=params.store)
    if "ppo" in run:
        out["ppo"] = ppo_flow(params.ppo, actor=out.get("sft"), reward=out.get("rm"),
                              store=params.store)
    return out
