"""Stage pretrain: a LLaMA-style model from scratch on a weighted multi-source mixture.

    deepspeed --num_gpus 2 --module stages.pretrain --config configs/tiny/pretrain.yaml [k=v ...]

setup:    validate config and mixture before anything expensive.
data:     rank 0 trains or reuses the tokenizer and packs the dataset (both artifacts, reused
          when their inputs are unchanged); the whole stage is reused when its inputs are.
models:   the LLaMA model from a preset (or init_from) in a DeepSpeed engine.
resume:   weights, optimizer, scheduler, step and RNG of the last complete checkpoint.
train:    next-token loss over packed BxT rows, warmup + cosine, clipping, per-domain eval,
          checkpoints every N steps, stop on NaN.
evaluate: held-out loss against the unigram model's.
export:   HF safetensors + tokenizer into the artifact store, parents: dataset and tokenizer.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from stages import data as D
from stages import engine as E
from stages import metrics as M
from stages import stage as S
from stages import tokens as T
from stages.artifacts import ArtifactStore, build_once, input_key, json_digest, sha256_file
from stages.config import PretrainConfig
from stages.configfile import ConfigError
from stages.model import PRESETS, device_peak_flops, flops_per_token, llama_config, matmul_params


# --- setup --------------------------------------------------------------------------------

def preflight(cfg: PretrainConfig, store: ArtifactStore):
    """Every check that can fail before the first expensive step."""
    mixture = D.load_mixture(cfg.data.mixture)
    for src in mixture.sources:
        if src.type == "files":
            D.source_files(src)
        elif src.type == "artifact":
            store.get(src.artifact, verify=False)
    vocab = cfg.data.vocab_size
    if cfg.model.init_from:
        from transformers import AutoConfig
        model_cfg = AutoConfig.from_pretrained(model_dir(cfg.model.init_from, store))
        positions, vocab = model_cfg.max_position_embeddings, model_cfg.vocab_size
    else:
        positions = cfg.model.max_position_embeddings or PRESETS[cfg.model.preset].max_positions
    if vocab:
        try:
            T.token_dtype(vocab, cfg.data.token_dtype)
        except D.DataError as e:
            raise ConfigError(str(e)) from None
    if cfg.data.seq_len > positions:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} is above the model's "
                          f"{positions} positions")
    if cfg.data.vocab_size is not None:
        if cfg.data.vocab_size < D.BYTE_ALPHABET + len(D.SPECIAL_TOKENS):
            raise ConfigError(f"data.vocab_size={cfg.data.vocab_size} is smaller than the "
                              f"{D.BYTE_ALPHABET} byte tokens + {len(D.SPECIAL_TOKENS)} specials")
    return mixture


def model_dir(ref: str, store: ArtifactStore) -> Path:
    """The HF directory of a store reference (a bare path is refused: import it first)."""
    return store.get(ref).local_path()


def source_fingerprint(src, store) -> dict:
    if src.type == "files":
        files = D.source_files(src)
        return {"type": "files", "sha256": json_digest([(f.name, sha256_file(f)) for f in files]),
                "files": len(files)}
    if src.type == "artifact":
        return {"type": "artifact", "digest": store.resolve(src.artifact)}
    return {"type": "hub", "dataset": src.dataset, "subset": src.subset, "split": src.split}


def get_tokenizer(cfg: PretrainConfig, mixture, fps: list[dict], store: ArtifactStore):
    """(tokenizer, tokenizer artifact digest or None): reuse, or train a BPE on the mixture."""
    from transformers import AutoTokenizer
    ref = cfg.data.tokenizer or cfg.model.init_from
    if ref:
        return AutoTokenizer.from_pretrained(model_dir(ref, store)), store.resolve(ref)
    spec = {"mixture": mixture.model_dump(mode="json"), "sources": fps,
            "vocab_size": cfg.data.vocab_size, "chars": cfg.data.tokenizer_train_chars,
            "seed": cfg.run.seed}
    parents = corpus_parents(mixture, store)
    key = input_key("tokenizer", spec, parents)

    def train(out: Path):
        t0 = time.time()
        tok = D.train_tokenizer(tokenizer_texts(cfg, mixture, store), cfg.data.vocab_size)
        tok.save_pretrained(out)
        return store.put(out, kind="tokenizer", stage="pretrain",
                         name=f"{cfg.run.name}-tokenizer", parents=parents, config=spec,
                         input_key=key, move=True, metrics={"data/vocab_size": len(tok)},
                         timings={"train_s": time.time() - t0},
                         extra={"sources": source_entries(mixture, fps)})
    art = build_once(store, "tokenizer", key, train)
    return AutoTokenizer.from_pretrained(art.local_path()), art.digest


def tokenizer_texts(cfg: PretrainConfig, mixture, store):
    """Text for BPE training, drawn from each source in proportion to its weight."""
    total = sum(s.weight for s in mixture.sources)
    for src in mixture.sources:
        budget = cfg.data.tokenizer_train_chars * src.weight / total
        for doc in D.source_documents(src, cfg.run.seed, store):
            yield doc[: int(budget)]
            budget -= len(doc)
            if budget <= 0:
                break


def corpus_parents(mixture, store) -> list[dict]:
    digests = sorted({store.resolve(s.artifact) for s in mixture.sources if s.type == "artifact"})
    return [{"role": "corpus", "digest": d} for d in digests]


def source_entries(mixture, fps: list[dict]) -> list[dict]:
    """Raw inputs outside the store, shown as the leaves of a lineage tree."""
    out = []
    for src, fp in zip(mixture.sources, fps):
        if src.type != "artifact":
            out.append({"name": src.dataset or ",".join(src.paths), "domain": src.domain, **fp})
    return out


def get_dataset(cfg: PretrainConfig, mixture, fps, tok, tok_digest, store) -> str:
    """Digest of the packed dataset artifact, built unless these inputs were packed before."""
    spec = {"mixture": mixture.model_dump(mode="json"), "sources": fps,
            "seq_len": cfg.data.seq_len, "total_tokens": cfg.data.total_tokens,
            "val_tokens_per_domain": cfg.data.val_tokens_per_domain, "seed": cfg.run.seed,
            "shard_tokens": cfg.data.shard_tokens, "token_dtype": cfg.data.token_dtype,
            "tokenizer": tok_digest or tok.name_or_path}
    parents = corpus_parents(mixture, store)
    if tok_digest:
        parents.append({"role": "tokenizer", "digest": tok_digest})
    key = input_key("dataset", spec, parents)

    def build(out: Path):
        t0 = time.time()
        stats = build_dataset(cfg, mixture, tok, store, out, tok_digest)
        return store.put(out, kind="dataset", stage="pretrain", name=f"{cfg.run.name}-data",
                         parents=parents, config=spec, input_key=key, move=True,
                         metrics={"data/rows": stats["rows"], "data/tokens": stats["tokens"],
                                  "data/unigram_loss": stats["unigram_val_loss"]},
                         timings={"build_s": time.time() - t0, **stats.pop("timings")},
                         extra={"mixture_stats": stats, "sources": source_entries(mixture, fps)})
    return build_once(store, "dataset", key, build).digest


UNIT_BYTES = 4 << 20   # a tokenizer task's share of a large JSON-lines file


def tokenize_sources(cfg: PretrainConfig, mixture, tok, store, work: Path, targets) \
        -> list[tuple[T.SourceTokens, bool]]:
    """Every source as token files: local ones by datatrove's executor over work units, hub
    streams on this process up to the tokens they must give. (tokens, exhausted) per source."""
    if not hasattr(tok, "backend_tokenizer"):
        raise D.DataError(f"tokenizer {tok.name_or_path}: a fast (Rust) tokenizer is needed "
                          f"to tokenize in parallel")
    tok.backend_tokenizer.save(str(work / "tokenizer.json"))
    units = []
    for i, src in enumerate(mixture.sources):
        if src.type != "hub":
            units += T.file_units(i, D.source_files(src, store), src.text_field, src.domain,
                                  UNIT_BYTES)
    files = T.tokenize_units(units, work / "tokenizer.json", tok.eos_token, work,
                             cfg.data.workers or os.cpu_count() or 1, cfg.data.executor) \
        if units else []
    out = []
    for i, src in enumerate(mixture.sources):
        if src.type == "hub":
            path = work / f"stream-{i}.ds"
            val, target = targets[i]
            ended = T.write_stream(D.source_documents(src, cfg.run.seed, store), tok, path,
                                   val, target)
            out.append((T.SourceTokens([T.TokenFile(path)]), ended))
            continue
        out.append((T.SourceTokens([f for u, f in zip(units, files) if u.source == i]), True))
    return out


def build_dataset(cfg: PretrainConfig, mixture, tok, store, out: Path,
                  tokenizer_id: str | None = None) -> dict:
    """Tokenize (in parallel), sample by weight on document lengths, pack into shards."""
    D.check_tokenizer(tok, "pretrain tokenizer")
    dtype = T.token_dtype(len(tok), cfg.data.token_dtype)
    total_w = sum(s.weight for s in mixture.sources)
    dom_w = mixture.domain_weights()
    targets = []
    for src in mixture.sources:
        share = src.weight / total_w
        targets.append((round(cfg.data.val_tokens_per_domain * share / dom_w[src.domain]),
                        round(share * cfg.data.total_tokens)))
    work = Path(tempfile.mkdtemp(prefix=f"{out.name}.tokenize-", dir=out.parent))
    sources = []
    try:
        t0 = time.time()
        sources = tokenize_sources(cfg, mixture, tok, store, work, targets)
        t1 = time.time()
        plans = []
        for src, (toks, ended), (val_tokens, target) in zip(mixture.sources, sources, targets):
            order = np.arange(len(toks.lens)) if src.type == "hub" else \
                D.source_order(len(toks.lens), cfg.run.seed, src)
            plans.append(D.sample_plan(src, toks.lens, order, target, val_tokens, cfg.run.seed,
                                       exhausted=ended))
        stats = pack_dataset(cfg, mixture, tok, sources, plans, dtype, out)
        stats["tokenized_tokens"] = int(sum(t.lens.sum() for t, _ in sources))
        stats["timings"] = {"tokenize_s": round(t1 - t0, 3), "pack_s": round(time.time() - t1, 3),
                            "workers": cfg.data.workers or os.cpu_count() or 1}
    finally:
        for toks, _ in sources:
            toks.close()
        shutil.rmtree(work, ignore_errors=True)
    index = {"format": T.FORMAT, "dtype": dtype.name, "seq_len": cfg.data.seq_len,
             "rows": stats["rows"], "tokens": stats["tokens"], "vocab_size": len(tok),
             "max_token_id": stats.pop("max_token_id"),
             "tokenizer": tokenizer_id or tok.name_or_path,
             "shards": stats.pop("shards"), "val": stats.pop("val")}
    (out / T.INDEX).write_text(json.dumps(index, indent=1))
    stats["shards"] = [{"file": s["file"], "rows": s["rows"], "sha256": s["sha256"]}
                       for s in index["shards"]]
    timings = stats.pop("timings")
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    return {**stats, "timings": timings}


def pack_dataset(cfg: PretrainConfig, mixture, tok, sources, plans, dtype, out: Path) -> dict:
    """Training pieces of every source shuffled together into shards; validation per domain."""
    dom_w = mixture.domain_weights()
    writer = T.ShardWriter(out, cfg.data.seq_len, max(1, cfg.data.shard_tokens // cfg.data.seq_len),
                           dtype, len(tok))
    src_of = np.concatenate([np.full(len(p.train_docs), i, np.int32) for i, p in enumerate(plans)])
    at = np.concatenate([np.arange(len(p.train_docs)) for p in plans])
    for j in D.pack_order(len(src_of), cfg.run.seed):
        i, k = int(src_of[j]), int(at[j])
        writer.add(sources[i][0].read(int(plans[i].train_docs[k]), int(plans[i].train_lens[k])),
                   plans[i].domain)
    shards = writer.close()
    rows = sum(s["rows"] for s in shards)
    if rows == 0:
        raise D.DataError(f"only {cfg.data.total_tokens} tokens: not one row of seq_len "
                          f"{cfg.data.seq_len}")
    tokens = rows * cfg.data.seq_len
    per_domain: dict[str, int] = {}
    for s in shards:
        for d, n in s["tokens_per_domain"].items():
            per_domain[d] = per_domain.get(d, 0) + n
    realized = {d: per_domain.get(d, 0) / tokens for d in dom_w}
    for d, w in dom_w.items():
        if abs(realized[d] - w) > 0.02:
            raise D.DataError(f"domain {d}: realized {realized[d]:.3f} of tokens against weight "
                              f"{w:.3f}; more than 2 points off (total_tokens too small for "
                              f"seq_len?)")
    val, val_ids = {}, []
    (out / "val").mkdir(exist_ok=True)
    for domain in sorted(dom_w):
        docs = [sources[i][0].read(int(doc), int(sources[i][0].lens[doc]))
                for i, p in enumerate(plans) if p.domain == domain for doc in p.val]
        order = D.pack_order(len(docs), cfg.run.seed)
        stream = np.concatenate([docs[j] for j in order]) if docs else np.zeros(0, dtype)
        n = len(stream) // cfg.data.seq_len
        if n == 0:
            raise D.DataError(f"domain {domain}: {len(stream)} held-out tokens, not one row of "
                              f"seq_len {cfg.data.seq_len} (raise data.val_tokens_per_domain)")
        vrows = stream[: n * cfg.data.seq_len].reshape(n, cfg.data.seq_len)
        rel = f"val/{domain}.npy"
        np.save(out / rel, vrows)
        val[domain] = {"file": rel, "rows": n, "sha256": sha256_file(out / rel)}
        val_ids.append(vrows.reshape(-1))
    probs = (writer.counts.astype(np.float64) + 1.0) / (writer.counts.sum() + len(writer.counts))
    val_all = np.concatenate(val_ids)
    return {"rows": rows, "seq_len": cfg.data.seq_len, "tokens": tokens, "dtype": dtype.name,
            "tokens_per_domain": per_domain, "weights": dom_w, "realized": realized,
            "sources": {f"{src.domain}:{D._source_name(src)}":
                        {"documents": p.documents, "epochs": p.epochs,
                         "tokens": int(p.train_lens.sum())}
                        for src, p in zip(mixture.sources, plans)},
            "val_rows": {d: v["rows"] for d, v in val.items()},
            # the loss of a model that knows only token frequencies: what pretraining must beat
            "unigram_val_loss": float(-np.log(probs[val_all]).mean()),
            "max_token_id": max(writer.max_id, int(val_all.max())), "shards": shards, "val": val}


def prepare_data(cfg: PretrainConfig, mixture) -> dict:
    """Tokenizer and dataset digests, each built unless its inputs were built before."""
    store = ArtifactStore(cfg.run.store)
    fps = [source_fingerprint(s, store) for s in mixture.sources]
    tok, tok_digest = get_tokenizer(cfg, mixture, fps, store)
    return {"tokenizer": tok_digest,
            "dataset": get_dataset(cfg, mixture, fps, tok, tok_digest, store)}


# --- train --------------------------------------------------------------------------------

def batch_rows(step: int, micro: int, accum: int, mb: int, d: E.Dist, n_rows: int,
               seed: int) -> np.ndarray:
    """Row indices for one micro-batch: a pure function of the step, so resume is exact.
    Each epoch is a fresh permutation of the rows."""
    per_step = mb * d.world * accum
    first = step * per_step + micro * mb * d.world + d.rank * mb
    idx = np.arange(first, first + mb)
    epochs, pos = idx // n_rows, idx % n_rows
    out = np.empty(mb, dtype=np.int64)
    for e in np.unique(epochs):
        perm = np.random.default_rng([seed, int(e)]).permutation(n_rows)
        out[epochs == e] = perm[pos[epochs == e]]
    return out


@torch.no_grad()
def evaluate(engine, val: dict[str, np.ndarray], cfg: PretrainConfig, d: E.Dist) -> dict:
    engine.eval()
    out, total_loss, total_n = {}, 0.0, 0
    mb = cfg.train.micro_batch_size
    for domain, rows in val.items():
        mine = rows[d.rank::d.world][: cfg.train.eval_batches * mb]
        acc = torch.zeros(2, dtype=torch.float64)
        for i in range(0, len(mine), mb):
            x = torch.as_tensor(mine[i:i + mb], dtype=torch.long, device=d.device)
            loss = engine(input_ids=x, labels=x).loss
            acc += torch.tensor([loss.item() * len(x), len(x)], dtype=torch.float64)
        dist.all_reduce(acc)
        if acc[1] > 0:
            out[f"eval/loss/{domain}"] = (acc[0] / acc[1]).item()
            total_loss, total_n = total_loss + acc[0].item(), total_n + acc[1].item()
    out["eval/loss"] = total_loss / max(total_n, 1)
    out["eval/ppl"] = math.exp(min(out["eval/loss"], 50))
    engine.train()
    return out


def main(argv: list[str] | None = None) -> None:
    # --- setup: config, the checks that fail in a second, the ranks --------------------------
    run, mixture = S.setup(PretrainConfig, "pretrain", argv, preflight)
    cfg, store, d = run.cfg, run.store, run.d

    # --- data: rank 0 trains (or reuses) the tokenizer and packs the dataset -----------------
    def prepare():
        # In a child process: training steps ran ~10% slower in a process that had just built
        # the dataset (bench/pretrain_throughput.py, 1.008 s vs 0.810 s a step), and the
        # build's memory goes back whole when the child ends.
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
            return ex.submit(prepare_data, cfg, mixture).result()
    prepared = E.on_rank0(prepare, d)
    ds_art = store.get(prepared["dataset"])
    parents = {"dataset": ds_art.digest}
    if cfg.model.init_from:
        parents["init"] = store.resolve(cfg.model.init_from)   # its tokenizer comes with it
    elif prepared["tokenizer"]:
        parents["tokenizer"] = prepared["tokenizer"]
    if S.reused(run, **parents):
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(
        store.get(prepared["tokenizer"]).local_path() if prepared["tokenizer"]
        else model_dir(cfg.data.tokenizer or cfg.model.init_from, store))
    # shards memory-mapped: a rank reads the rows it trains on, not the dataset
    index, train_rows, val_rows = T.open_dataset(ds_art.local_path())
    run.mark("data")

    # --- models: the LLaMA model and its DeepSpeed engine -------------------------------------
    torch.manual_seed(cfg.run.seed)  # same init on every rank
    if cfg.model.init_from:
        model = AutoModelForCausalLM.from_pretrained(model_dir(cfg.model.init_from, store),
                                                     dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(llama_config(
            cfg.model.preset, len(tokenizer), tokenizer, cfg.model.max_position_embeddings))
    T.check_fits(index, prepared["tokenizer"], model.get_input_embeddings().num_embeddings,
                 f"dataset {ds_art.short}")
    n_flop_params = matmul_params(model)
    fpt = flops_per_token(n_flop_params, model.config.num_hidden_layers,
                          model.config.hidden_size, cfg.data.seq_len)
    import deepspeed
    ds_cfg = E.deepspeed_config(cfg.deepspeed, cfg.train, cfg.optim, d.world)
    optimizer = E.adamw(model, cfg.optim, ds_cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, E.lr_lambda(cfg.optim,
                                                                         cfg.train.max_steps))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=ds_cfg)
    E.lone_rank(engine, d.world)
    accum = ds_cfg["gradient_accumulation_steps"]

    # --- resume: weights, optimizer, scheduler, step and RNG of the last complete checkpoint --
    ckpt = run.work / "checkpoints"
    metrics = E.Metrics(d, run.work)
    client = E.load_checkpoint({"model": engine}, ckpt, d) if cfg.checkpoint.resume else None
    start = client["step"] if client else 0
    if client:
        E.log(d, f"resumed from {ckpt} at step {start}")
    E.log(d, f"pretrain {run.name}: {n_flop_params / 1e6:.2f}M params, {len(train_rows)} "
             f"rows x {cfg.data.seq_len}, {d.world} rank(s), accum {accum}, "
             f"precision {E.precision(cfg.deepspeed)}, ZeRO {engine.zero_optimization_stage()}")
    run.mark("models")

    # --- train --------------------------------------------------------------------------------
    peak = device_peak_flops(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
    from tqdm import tqdm
    bar = tqdm(total=cfg.train.max_steps, initial=start, disable=not d.main, desc="pretrain",
               unit="step", mininterval=1 if sys.stderr.isatty() else 10, file=sys.stderr)
    last_eval: dict = {}
    for step in range(start, cfg.train.max_steps):
        t0 = time.time()
        step_loss = 0.0
        for micro in range(accum):
            idx = batch_rows(step, micro, accum, cfg.train.micro_batch_size, d, len(train_rows),
                             cfg.run.seed)
            x = torch.as_tensor(train_rows[idx], dtype=torch.long, device=d.device)
            loss = engine(input_ids=x, labels=x).loss
            mean = loss.detach().float().clone()
            dist.all_reduce(mean)
            mean = mean.item() / d.world
            if not math.isfinite(mean):
                latest = (ckpt / E.COMPLETE).read_text().strip() \
                    if (ckpt / E.COMPLETE).exists() else "none"
                raise FloatingPointError(
                    f"non-finite loss ({mean}) at step {step}: stopping without an update. "
                    f"Last good checkpoint: {latest} in {ckpt} (kept). Lower optim.lr or raise "
                    f"optim.warmup_steps, then rerun to resume from it.")
            engine.backward(loss)
            engine.step()
            step_loss += mean / accum
        dt = time.time() - t0
        done = step + 1
        row = {"train/loss": step_loss, "train/lr": scheduler.get_last_lr()[0],
               "perf/step_s": dt, "perf/tokens_per_s": tokens_per_step / dt,
               "perf/flops_per_s": fpt * tokens_per_step / dt}
        grad_norm = engine.get_global_grad_norm()   # None under ZeRO-0: DeepSpeed drops it
        if grad_norm is not None:
            row["train/grad_norm"] = float(grad_norm)
        if peak:
            row["perf/mfu"] = row["perf/flops_per_s"] / (peak * d.world)
        if done % cfg.train.eval_every == 0 or done == cfg.train.max_steps:
            last_eval = evaluate(engine, val_rows, cfg, d)
            row.update(last_eval)
            E.log(d, f"step {done}: eval/loss {last_eval['eval/loss']:.4f} "
                     f"ppl {last_eval['eval/ppl']:.1f}")
        if done % cfg.run.log_every == 0 or done == cfg.train.max_steps:
            metrics.log(done, **row)
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{row['perf/tokens_per_s']:.0f}")
        bar.update(1)
        if done % cfg.checkpoint.every_steps == 0 and done < cfg.train.max_steps:
            E.save_checkpoint({"model": engine}, ckpt, done, cfg.checkpoint.keep_last, d)
    bar.close()
    run.mark("train")

    # --- evaluate: the last held-out loss against the unigram model's -----------------------
    stats = ds_art.manifest.get("mixture_stats", {})
    unigram = stats.get("unigram_val_loss")
    final = {**last_eval, "baseline/eval/loss": unigram, "model/params": n_flop_params,
             "data/train_tokens": tokens_per_step * cfg.train.max_steps}
    loss = final["eval/loss"]
    verdict = M.verdict(loss, unigram, "lower")
    headline = M.headline("eval/loss", loss, baseline=unigram, verdict=verdict, text=(
        f"held-out loss {loss:.3f} (ppl {final['eval/ppl']:.1f}) {verdict} the unigram "
        f"baseline {unigram:.3f}"))

    # --- export -------------------------------------------------------------------------------
    export = run.work / "export"
    E.save_hf(engine, tokenizer, export, d)
    if d.main:
        S.export(run, export, metrics=final, headline=headline, train_log=metrics.rows(),
                 datasets={"train": {"digest": ds_art.digest,
                                     "tokens_per_domain": stats.get("tokens_per_domain"),
                                     "realized": stats.get("realized")}})
    metrics.close()
    E.shutdown(d)


if __name__ == "__main__":
    E.run(main)
