"""`alignflow`: the command line over the artifact store and the pipeline flows."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from stages import lineage
from stages.artifacts import ArtifactError, ArtifactStore, default_home, default_store_root
from stages.config import STAGES
from stages.configfile import REPO_ROOT as REPO
from stages.configfile import ConfigError
from stages.metrics import KEY_METRICS, canonical, headline_of
from stages.proc import leaked_shm


def _fmt_metrics(manifest: dict, limit: int = 4) -> str:
    metrics = canonical(manifest.get("metrics", {}), manifest.get("stage"))
    picked = [(k, metrics[k]) for k in KEY_METRICS if k in metrics][:limit]
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in picked)


def cmd_models(store: ArtifactStore, args) -> int:
    if not args.name:
        rows, damaged = [], []
        for name in store.names():
            try:
                history = store.versions(name)
            except ArtifactError as e:     # one damaged name must not hide all the others
                damaged.append(str(e))
                continue
            if history:
                try:
                    latest = store.get(f"{name}@{history[-1].version}", verify=False)
                except ArtifactError as e:
                    damaged.append(f"{name}@{history[-1].version}: {e}")
                    continue
                rows.append({"name": name, "versions": len(history), "kind": latest.kind,
                             "stage": latest.stage, "latest": history[-1].version,
                             "digest": latest.digest, "created": history[-1].created})
        if args.json:
            print(json.dumps(rows, indent=2))
        elif not rows:
            print(f"no models in {store.root}")
        for r in rows if not args.json else []:
            print(f"{r['name']:<28} {r['kind']:<10} {r['stage'] or '-':<9} "
                  f"v{r['latest']:<4} {r['digest'][:12]}  {r['created']}")
        for problem in damaged:
            print(f"error: {problem}", file=sys.stderr)
        return 1 if damaged else 0
    history = store.versions(args.name)
    if not history:
        print(f"error: no model named '{args.name}' in {store.root}", file=sys.stderr)
        return 1
    rows = []
    for v in history:
        art = store.get(v.digest, verify=False)
        rows.append({"version": v.version, "digest": v.digest, "created": v.created,
                     "metrics": canonical(art.manifest.get("metrics", {}), art.stage),
                     "headline": headline_of(art.manifest)["text"],
                     "manifest": art.manifest,
                     "run_id": art.manifest.get("flow_run_id")})
    for r in rows:
        manifest = r.pop("manifest")
        if not args.json:
            print(f"{args.name}@{r['version']:<4} {r['digest'][:12]}  {r['created']}  "
                  f"{_fmt_metrics(manifest)}")
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


def cmd_lineage(store: ArtifactStore, args) -> int:
    if args.diff:
        d = lineage.diff(store, args.ref, args.diff)
        print(json.dumps(d, indent=2) if args.json or args.format == "json"
              else lineage.render_diff(d, lineage.labels(store)))
        return 0
    g = lineage.used_by(store, args.ref) if args.used_by else lineage.build(store, args.ref)
    print(lineage.RENDERERS["json" if args.json else args.format](g))
    return 0


def cmd_show(store: ArtifactStore, args) -> int:
    print(json.dumps(store.get(args.ref).manifest, indent=2, sort_keys=True))
    return 0


def cmd_verify(store: ArtifactStore, args) -> int:
    digests = [store.resolve(r) for r in args.refs] if args.refs else store.directories()
    bad = 0
    for d in digests:
        try:
            store.verify(d)
            print(f"ok       {d[:12]}")
        except ArtifactError as e:
            bad += 1
            print(f"DAMAGED  {e}")
            if args.quarantine:
                print(f"         moved to {store.quarantine(d)}")
    names = [] if args.refs else store.check_names()
    for problem in names:
        print(f"DAMAGED  {problem}")
    print(f"{len(digests) - bad} ok, {bad} damaged" + (f", {len(names)} bad name record(s)"
                                                        if names else ""))
    return 1 if bad or names else 0


def cmd_gc(store: ArtifactStore, args) -> int:
    removed = store.gc(older_than_s=args.older_than)
    print(f"removed {len(removed)} abandoned staging folder(s)")
    leaked = leaked_shm(older_than_s=args.older_than)
    freed = sum(f.stat().st_size for f in leaked)
    for f in leaked:
        f.unlink(missing_ok=True)
    print(f"removed {len(leaked)} DeepSpeed shared-memory buffer(s) no process uses "
          f"({freed / 2**20:.0f} MiB of RAM)")
    return 0


def prefect_env() -> None:
    """Prefect's state (database, logs) lives in alignflow's state directory, not ~/.prefect."""
    os.environ.setdefault("PREFECT_HOME", str(default_home() / "prefect"))
    os.makedirs(os.environ["PREFECT_HOME"], exist_ok=True)  # Prefect makes one level only
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    # The first start migrates a fresh database: slower than Prefect's 20 s default on 2 cores.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")


def cmd_run(store: ArtifactStore, args) -> int:
    """Run the pipeline flow: embedded Prefect, or the server in PREFECT_API_URL if set."""
    prefect_env()
    from flows.params import PRESETS
    from flows.pipeline import alignment_pipeline, validate
    params = PRESETS[args.preset].model_copy(deep=True)
    params.store = store.root
    for item in args.set or []:
        stage, _, override = item.partition(":")
        stage_params = getattr(params, stage, None)
        if stage_params is None or not override:
            raise ConfigError(f"--set {item!r}: use STAGE:KEY=VALUE with a stage of this preset")
        stage_params.overrides.append(override)
    for stage in args.force or []:
        if getattr(params, stage, None) is None:
            raise ConfigError(f"--force {stage!r}: not a stage of this preset")
        getattr(params, stage).force = True
    if args.from_stage:
        params.from_stage = args.from_stage
    validate(params)  # before Prefect starts: bad input costs a second, not a server start
    if args.explain:
        from flows.launch import explain
        stages = [(st, p.config, p.overrides, p.force) for st in params.stages()
                  if (p := getattr(params, st)) is not None]
        print("\n".join(explain(stages, store)))
        return 0
    t0 = time.time()
    result = alignment_pipeline(params)
    print(summary(store, result, time.time() - t0))
    if args.preset == "smollm2":
        print(fewshot_line(REPO / "bench" / "results" / "fewshot_vs_finetune.json"))
    return 0


def fewshot_line(path: Path) -> str:
    """The seed experiment's last measured result, with where and when it was measured."""
    if not path.is_file():
        return "  fine-tuned vs few-shot: not measured yet (python bench/fewshot_vs_finetune.py)"
    r = json.loads(path.read_text())
    best_k, best = max(r["fewshot"].items(), key=lambda kv: kv[1]["accuracy"])
    ft = r["finetuned"]
    return (f"  fine-tuned vs few-shot ({path.name}, {r['created']}): LoRA-tuned "
            f"{ft['accuracy']:.3f} [{ft['ci_low']:.3f}, {ft['ci_high']:.3f}] against the base "
            f"with {best_k} shots {best['accuracy']:.3f} [{best['ci_low']:.3f}, "
            f"{best['ci_high']:.3f}], n={ft['n']}, on {r['task'].split(' (')[0]}")


def cmd_sample(store: ArtifactStore, args) -> int:
    """Side-by-side generations, in a child process: the CLI itself never imports torch."""
    import subprocess
    cmd = [sys.executable, "-m", "stages.sample", *args.models, "--store", store.root,
           "--temperature", str(args.temperature), "--top-k", str(args.top_k), "--top-p",
           str(args.top_p), "--max-new-tokens", str(args.max_new_tokens), "--seed",
           str(args.seed), *(["--json"] if args.json else [])]
    for prompt in args.prompt:
        cmd += ["--prompt", prompt]
    return subprocess.run(cmd).returncode


def cmd_import(store: ArtifactStore, args) -> int:
    """A pretrained model into the store, in a child process (the CLI never imports torch)."""
    import subprocess
    cmd = [sys.executable, "-m", "stages.imports", args.source, "--store", store.root,
           *(["--name", args.name] if args.name else []),
           *(["--revision", args.revision] if args.revision else []),
           *(["--force"] if args.force else [])]
    return subprocess.run(cmd, stdout=subprocess.DEVNULL if not args.verbose else None) \
        .returncode


def cmd_serve(store: ArtifactStore, args) -> int:
    """Serve every deployment from this process; runs start from the UI or the API."""
    prefect_env()
    # The runner looks for runs to start or cancel this often; cancellation must reach the
    # stage's process group within seconds, not Prefect's default 10 s.
    os.environ.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", "2")
    from flows.deploy import HEARTBEAT_S, ensure_automations
    # Runs beat while alive; the zombie automation crashes the ones whose process died.
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_S))
    if not os.environ.get("PREFECT_API_URL"):
        print("note: PREFECT_API_URL is not set: serving against a temporary embedded server "
              "that the UI cannot reach; start `alignflow server` and export "
              "PREFECT_API_URL=http://127.0.0.1:4200/api", file=sys.stderr)
    from prefect import serve

    from flows.deploy import deployments, load_schedules, load_triggers
    schedules = load_schedules(args.schedules) if args.schedules else []
    triggers = load_triggers(args.automations) if args.automations else []
    deps = deployments(schedules, store=store.root, triggers=triggers)
    ensure_automations()
    serve(*deps, limit=args.limit)
    return 0


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def cmd_server(store: ArtifactStore, args) -> int:
    """Start the Prefect UI and API, on loopback unless asked otherwise. Any web page the user
    opens can send requests to 127.0.0.1, so the API takes only requests that carry Prefect's
    CSRF token, answers cross-origin requests from its own UI's origin only, and is not put
    on a network without a login."""
    prefect_env()
    if args.host not in LOOPBACK and not os.environ.get("PREFECT_SERVER_API_AUTH_STRING"):
        raise ConfigError(f"--host {args.host} puts the API (which starts training jobs) on the "
                          f"network without a login: set PREFECT_SERVER_API_AUTH_STRING=user:pass "
                          f"(and PREFECT_API_AUTH_STRING for clients), or keep the default "
                          f"127.0.0.1")
    origin = f"http://{args.host}:{args.port}"
    os.environ.setdefault("PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED", "true")
    os.environ.setdefault("PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS", origin)
    # The UI asks this for its API address; left alone it is 4200 whatever --port says.
    os.environ.setdefault("PREFECT_UI_API_URL", f"{origin}/api")
    exe = os.path.join(os.path.dirname(sys.executable), "prefect")
    print(f"Prefect UI on http://{args.host}:{args.port} (state in {os.environ['PREFECT_HOME']}).\n"
          f"Runs report there when started with "
          f"PREFECT_API_URL=http://{args.host}:{args.port}/api", flush=True)
    os.execv(exe, [exe, "server", "start", "--host", args.host, "--port", str(args.port)])


def summary(store: ArtifactStore, result: dict[str, str], seconds: float) -> str:
    """One line per stage: each artifact's own headline (the stage wrote what it means)."""
    lines = ["", f"alignflow pipeline finished in {seconds / 60:.1f} min; store {store.root}", ""]
    for stage, digest in result.items():
        art = store.get(digest, verify=False)
        name = art.manifest.get("name") or stage
        lines.append(f"  {stage:<9} {name}  {art.short}  {headline_of(art.manifest)['text']}")
    last = next(reversed(result.values()))
    name = store.get(last, verify=False).manifest.get("name")
    lines += ["", "next:",
              f"  alignflow lineage {name}          # the chain back to the raw sources",
              "  alignflow models                  # every model and its versions",
              f"  files: {store.local_path(last) if store.local else store.root}",
              "  UI: alignflow server, then open http://127.0.0.1:4200 and run with "
              "PREFECT_API_URL=http://127.0.0.1:4200/api"]
    return "\n".join(lines)


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alignflow",
        description="Pretrain -> SFT -> RM -> PPO as Prefect flows, with versioned artifacts "
                    "and lineage.")
    p.add_argument("--store", default=None,
                   help=f"artifact store root, path or fsspec URL (default: {default_store_root()})")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("models", help="list model names, or one model's versions")
    s.add_argument("name", nargs="?")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("lineage", help="the chain from a model back to its raw data")
    s.add_argument("ref", help="name, name@latest, name@N or a digest prefix")
    s.add_argument("--format", choices=sorted(lineage.RENDERERS), default="text")
    s.add_argument("--json", action="store_true", help="same as --format json")
    s.add_argument("--diff", metavar="REF", help="compare with another model's lineage")
    s.add_argument("--used-by", action="store_true",
                   help="the other way: every artifact trained from REF, directly or not")
    s.set_defaults(func=cmd_lineage)

    s = sub.add_parser("import", help="register a pretrained model (HF directory, .gguf, import "
                       "recipe .yaml, or Hub org/model@rev) as a model artifact")
    s.add_argument("source")
    s.add_argument("--name", help="model name in the store (a recipe names its own)")
    s.add_argument("--revision", help="Hub revision (or org/model@rev)")
    s.add_argument("--force", action="store_true", help="import again even if unchanged")
    s.add_argument("--verbose", action="store_true", help="also print the handshake line")
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("show", help="print an artifact's manifest (verified)")
    s.add_argument("ref")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("verify", help="check artifacts against their manifests")
    s.add_argument("refs", nargs="*", help="default: every artifact and name in the store")
    s.add_argument("--quarantine", action="store_true",
                   help="move damaged artifacts to quarantine/ (the next run republishes them)")
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("run", help="run the pipeline flow (embedded Prefect, no server needed)")
    s.add_argument("--explain", action="store_true",
                   help="say per stage whether it would train or reuse, and why; run nothing")
    s.add_argument("--preset", choices=["demo", "tiny", "smollm2"], default="demo",
                   help="demo: the CPU demo on the demo corpus; tiny: seconds, for a smoke "
                        "test; smollm2: a real pretrained model imported, then sft, rm, ppo")
    s.add_argument("--set", action="append", metavar="STAGE:KEY=VALUE",
                   help="config override for one stage, e.g. pretrain:train.max_steps=50")
    s.add_argument("--force", action="append", metavar="STAGE",
                   help="retrain this stage even if its inputs are unchanged")
    s.add_argument("--from-stage", choices=STAGES,
                   help="start here; earlier stages' artifacts come from the configs' parents")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("server", help="start the Prefect UI (127.0.0.1 unless --host is given)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=4200)
    s.set_defaults(func=cmd_server)

    s = sub.add_parser("sample", help="generations of several models side by side")
    s.add_argument("models", nargs="+", help="model refs (e.g. demo-sft demo-ppo)")
    s.add_argument("--prompt", action="append", required=True, help="repeat for several")
    s.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    s.add_argument("--top-k", type=int, default=0, help="0: off")
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--max-new-tokens", type=positive, default=32)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_sample)

    s = sub.add_parser("serve", help="serve the pipeline and stage deployments (runs started "
                       "from the UI execute here)")
    s.add_argument("--schedules", metavar="YAML", help="schedules with parameters, e.g. "
                   "infra/schedules.yaml")
    s.add_argument("--automations", metavar="YAML", help="event triggers that chain stages, "
                   "e.g. infra/automations.yaml (a new RM starts PPO)")
    s.add_argument("--limit", type=int, default=1, help="flow runs at once (default 1: the "
                   "stages share this machine's accelerators)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("gc", help="remove staging left behind by killed writers, and DeepSpeed "
                                  "shared-memory buffers of killed jobs")
    s.add_argument("--older-than", type=float, default=3600, metavar="SECONDS")
    s.set_defaults(func=cmd_gc)
    return p


# Commands that only read a store: on a path that is no store they say so instead of
# reporting an empty, healthy one.
READS_STORE = ("models", "lineage", "show", "verify", "gc", "sample")


def open_store(args) -> ArtifactStore:
    try:
        store = ArtifactStore(args.store)
    except (ValueError, ImportError) as e:   # fsspec: unknown protocol, missing driver
        raise ArtifactError(f"--store {args.store}: {e}") from None
    if store.local and args.command in READS_STORE:
        root = Path(store.base)
        if root.exists() and not root.is_dir():
            raise ArtifactError(f"store {store.root} is a file, not a store directory")
        if not root.exists():
            raise ArtifactError(f"no store at {store.root} (nothing was trained there yet; "
                                f"--store or ALIGNFLOW_STORE names another)")
    return store


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        store = open_store(args)
        return args.func(store, args)
    except (ArtifactError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
