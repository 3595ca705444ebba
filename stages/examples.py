"""Example sets for sft, rm and ppo: prompt/completion, prompt/chosen/rejected, or prompts.

A set is built from its YAML (datasets_cfg/) by mixing sources by weight, checked record by
record, split into train and held-out eval (disjoint prompts), and stored as a `dataset` artifact
(train.jsonl, eval.jsonl, stats.json), reused while its inputs are unchanged.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path


from stages import sources, tasks
from stages.artifacts import ArtifactStore, build_once, default_home, input_key, json_digest, sha256_file
from stages import configfile as C
from stages.configfile import DataError, load_config, number_value, text_value
from stages.datacfg import ExampleSetConfig, ExampleSource
from stages.data import source_files


def load_example_set(path: str | Path) -> ExampleSetConfig:
    return load_config(ExampleSetConfig, path, what="dataset config")


# --- reading ------------------------------------------------------------------------------

def _rows(src: ExampleSource, fetched: dict) -> list[tuple[str, dict]]:
    """(where, row) of a source; `where` names file and line for errors. A package source
    records what it fetched (version, sha256) in `fetched`."""
    if src.type == "package":
        out, info = sources.rows(src, default_home() / "downloads")
        fetched.update(info, license=src.license)
        return out
    if src.type == "hub":
        import datasets  # the network is needed only here
        ds = datasets.load_dataset(src.dataset, src.subset, split=src.split)
        return [(f"{src.dataset}[{i}]", dict(r)) for i, r in enumerate(ds)]
    out = []
    for f in source_files(src):
        if f.suffix == ".jsonl":
            out += C.read_jsonl(f)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq
            try:
                out += [(f"{f}[{i}]", r) for i, r in enumerate(pq.read_table(f).to_pylist())]
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{f}: not a readable parquet file ({e})") from None
    return out


def _record(where: str, row: dict, src: ExampleSource, kind: str) -> dict:
    mismatched = kind == "preference" and src.negatives == "mismatched"
    fields = {"sft": [src.prompt_field, src.completion_field],
              "preference": [src.prompt_field, *([src.completion_field] if mismatched else
                                                 [src.chosen_field, src.rejected_field])],
              "prompts": [src.prompt_field]}[kind]
    if src.margin_field and kind == "preference":
        fields.append(src.margin_field)
    missing = [f for f in fields if f not in row]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing} (source {src.name}); fields: "
                        f"{', '.join(row)}")
    text = lambda key: text_value(row, key, where) or ""  # noqa: E731
    rec = {"source": src.name, "prompt": text(src.prompt_field)}
    if kind == "sft":
        rec["completion"] = text(src.completion_field)
    elif mismatched:
        rec["chosen"] = text(src.completion_field)
    elif kind == "preference":
        rec["chosen"], rec["rejected"] = text(src.chosen_field), text(src.rejected_field)
        if src.margin_field:
            rec["margin"] = number_value(row, src.margin_field, where)
    if "group" in row:
        rec["group"] = str(row["group"])   # any value that names a group will do
    return rec


def _kept(rec: dict, src: ExampleSource) -> bool:
    """The length and script filters of a source (most evals answers are a word or two)."""
    answer = rec.get("completion", rec.get("chosen"))
    text = rec["prompt"] + (answer or "") + rec.get("rejected", "")
    # A prompt set has no answers: min_chars applies to sets that do.
    return (answer is None or len(answer.strip()) >= src.min_chars) and \
        (src.max_chars is None or len(rec["prompt"]) + len(answer or "") <= src.max_chars) and \
        (not src.ascii_only or text.isascii())


def records(src: ExampleSource, kind: str, seed: int) -> tuple[list[dict], dict]:
    """Checked records of a files/hub/package source in a seeded order, and what was read:
    rows, how many the filters dropped, the package. Mismatched negatives pair each answer
    with the next prompt's answer."""
    recs, info = [], {}
    for where, row in _rows(src, info):
        recs.append(_record(where, row, src, kind))
        check_record(recs[-1], where)
    kept = [r for r in recs if _kept(r, src)]
    random.Random(f"{seed}:{src.name}").shuffle(kept)
    if kind == "preference" and src.negatives == "mismatched":
        answers = [r["chosen"] for r in kept]
        for i, r in enumerate(kept):
            r["rejected"] = answers[(i + 1) % len(answers)]
        kept = [r for r in kept if r["rejected"].strip() != r["chosen"].strip()]
    return kept, {"rows": len(recs), "dropped": len(recs) - len(kept), **info}


def check_record(rec: dict, where: str) -> None:
    if not rec["prompt"].strip():
        raise DataError(f"{where}: empty prompt")
    if "completion" in rec and not rec["completion"].strip():
        raise DataError(f"{where}: empty completion")
    if "rejected" in rec and rec["chosen"].strip() == rec["rejected"].strip():
        raise DataError(f"{where}: chosen is identical to rejected ({rec['chosen'][:60]!r})")


def _task_record(ex: dict, kind: str) -> dict:
    rec = {"source": "tasks", "task": ex["task"], "prompt": ex["prompt"], "answer": ex["answer"]}
    if kind == "sft":
        rec["completion"] = ex["answer"]
    elif kind == "preference":
        rec["chosen"], rec["rejected"] = ex["answer"], ex["wrong"]
    return rec


def source_examples(src: ExampleSource, kind: str, n_train: int, n_eval: int,
                    seed: int) -> tuple[list[dict], list[dict], dict]:
    """(train, eval, what was read) of one source; eval prompts never appear in train."""
    if src.type == "tasks":
        try:
            held = tasks.generate(src.families, n_eval, seed=seed * 2 + 1, held=True,
                                  unique=True)
            train = tasks.generate(src.families, n_train, seed=seed * 2)
        except ValueError as e:
            raise DataError(f"source {src.name}: {e}; ask for fewer eval_examples") from None
        return [_task_record(e, kind) for e in train], [_task_record(e, kind) for e in held], {}
    recs, info = records(src, kind, seed)
    # Held out by prompt (or by paragraph, for pairs that share one instruction).
    group = lambda r: r.get("group", r["prompt"])  # noqa: E731
    eval_recs, eval_groups = [], set()
    for r in recs:
        if len(eval_recs) == n_eval:
            break
        eval_recs.append(r)
        eval_groups.add(group(r))
    train = [r for r in recs if group(r) not in eval_groups][:n_train]
    if len(train) < n_train or len(eval_recs) < n_eval:
        raise DataError(f"source {src.name}: has {len(recs)} examples ({info['dropped']} more dropped "
                        f"by its filters); needs {n_train} for training and {n_eval} held out "
                        f"(with disjoint prompts)")
    return train, eval_recs, info


# --- building -----------------------------------------------------------------------------

def build(cfg: ExampleSetConfig, out: Path) -> dict:
    total_w = sum(s.weight for s in cfg.sources)
    train, held, per_source = [], [], {}
    for src in cfg.sources:
        share = src.weight / total_w
        n_train, n_eval = round(share * cfg.train_examples), max(1, round(share * cfg.eval_examples))
        t, e, info = source_examples(src, cfg.kind, n_train, n_eval, cfg.seed)
        train += t
        held += e
        per_source[src.name] = {"train": len(t), "eval": len(e), **info}
    rng = random.Random(f"{cfg.seed}:mix")
    rng.shuffle(train)
    out.mkdir(parents=True, exist_ok=True)
    for name, recs in (("train", train), ("eval", held)):
        with open(out / f"{name}.jsonl", "w") as f:
            for r in recs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    stats = {"kind": cfg.kind, "train": len(train), "eval": len(held), "sources": per_source}
    (out / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True))
    return stats


def _fingerprint(src: ExampleSource) -> dict:
    if src.type == "files":
        return {"sha256": json_digest([(f.name, sha256_file(f)) for f in source_files(src)])}
    return {}


def get_example_set(path: str | Path, store: ArtifactStore, log=print):
    """The dataset artifact of this YAML, built unless these inputs were built before."""
    cfg = load_example_set(path)
    spec = {"set": cfg.model_dump(mode="json"),
            "fingerprints": [_fingerprint(s) for s in cfg.sources]}
    key = input_key(f"examples-{cfg.kind}", spec, [])
    return build_once(store, "examples", key,
                      lambda out: _build_artifact(path, cfg, spec, key, out, store, log))


def _build_artifact(path, cfg: ExampleSetConfig, spec: dict, key: str, out: Path,
                    store: ArtifactStore, log):
    t0 = time.time()
    try:
        stats = build(cfg, out)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None     # name the YAML the bad source is in
    sources = [{"name": s.name, "domain": s.type, **({"paths": s.paths} if s.paths else {}),
                **({"dataset": s.dataset} if s.dataset else {}),
                **({"families": s.families} if s.families else {}), **_fingerprint(s),
                **{k: v for k, v in stats["sources"][s.name].items()
                   if k in ("via", "spec", "version", "sha256", "license")}}
               for s in cfg.sources]
    art = store.put(out, kind="dataset", stage="data", name=cfg.name, config=spec,
                    input_key=key, move=True, metrics={"data/rows": stats["train"],
                                                       "data/eval_rows": stats["eval"]},
                    timings={"build_s": round(time.time() - t0, 2)},
                    extra={"sources": sources, "example_stats": stats})
    log(f"[examples] {cfg.name}: {stats['train']} train / {stats['eval']} eval -> {art.short}")
    return art


def read_jsonl(path: Path) -> list[dict]:
    """The rows of an example-set file this module wrote."""
    return [row for _, row in C.read_jsonl(path)]
