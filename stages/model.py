"""LLaMA model shapes and FLOP accounting. transformers is imported only where a model is built."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int       # ~8/3 x hidden, rounded, as LLaMA's SwiGLU
    max_positions: int
    tie_embeddings: bool    # small models spend too much of their budget on a second matrix


PRESETS: dict[str, Shape] = {
    # tiny: the stage tests; a forward pass in milliseconds.
    "tiny": Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=176, max_positions=128,
                  tie_embeddings=True),
    # demo: the CPU demo; learns real structure from a few million tokens in minutes on 2 cores.
    "demo": Shape(hidden=192, layers=4, heads=6, kv_heads=2, intermediate=512,
                  max_positions=256, tie_embeddings=True),
    # GPU shapes; 125m/350m follow GPT-3's table, 1b TinyLlama's, 7b LLaMA-1's.
    "125m": Shape(768, 12, 12, 12, 2048, 1024, True),
    "350m": Shape(1024, 24, 16, 16, 2816, 1024, True),
    "1b": Shape(2048, 22, 32, 4, 5632, 2048, False),
    "7b": Shape(4096, 32, 32, 32, 11008, 4096, False),
}

# Dense bf16 peak per device (no sparsity), for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A10G": 125e12,
                   "L4": 121e12, "4090": 165e12}


def llama_config(preset: str, vocab_size: int, tokenizer=None, max_positions: int | None = None):
    from transformers import LlamaConfig
    s = PRESETS[preset]
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=s.hidden, num_hidden_layers=s.layers,
        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
        intermediate_size=s.intermediate, max_position_embeddings=max_positions or s.max_positions,
        tie_word_embeddings=s.tie_embeddings, rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
        eos_token_id=getattr(tokenizer, "eos_token_id", None),
        pad_token_id=getattr(tokenizer, "pad_token_id", None))


def matmul_params(model) -> int:
    """Parameters that take part in a matmul per token: all but an untied input embedding
    (a lookup costs nothing; a tied embedding is also the LM head, which is a matmul)."""
    n = sum(p.numel() for p in model.parameters())
    if not model.config.tie_word_embeddings:
        n -= model.get_input_embeddings().weight.numel()
    return n


def flops_per_token(n_params: int, layers: int, hidden: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12*L*H*T for attention (PaLM, App. B)."""
    return 6 * n_params + 12 * layers * hidden * seq_len


def device_peak_flops(device_name: str) -> float | None:
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return flops
    return None


def torch_no_grad(fn):
    """torch.no_grad() without importing torch where this module is only read for shapes."""
    @functools.wraps(fn)
    def wrapped(*args, **kw):
        import torch
        with torch.no_grad():
            return fn(*args, **kw)
    return wrapped


# --- parents and evaluation by generation --------------------------------------------------

def parent_model(store, ref: str, role: str, causal: bool = True, stages: tuple = ()):
    """A verified model artifact of the right kind, or a ConfigError naming what is wrong."""
    import json
    from stages.configfile import ConfigError
    art = store.get(ref)
    if art.kind != "model":
        raise ConfigError(f"{role} '{ref}' is a {art.kind} artifact; a model is needed")
    if stages and art.stage not in stages:
        raise ConfigError(f"{role} '{ref}' comes from stage {art.stage}; needs one of "
                          f"{', '.join(stages)}")
    arch = json.loads((art.local_path() / "config.json").read_text()).get("architectures", [""])[0]
    want = "ForCausalLM" if causal else "ForSequenceClassification"
    if not arch.endswith(want):
        raise ConfigError(f"{role} '{ref}' is a {arch}; needs a ...{want}")
    return art


def load_tokenizer(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def chat_prompt(tok, prompt: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)


def completion_loss(model, tok, recs: list[dict], batch: int = 16) -> float | None:
    """Mean loss per answer token of held-out prompt/completion pairs, prompt tokens masked.

    One function for the parent and the result, so the two numbers compare (the trainer's own
    eval loss exists only for the result)."""
    import torch
    import torch.nn.functional as F
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(recs), batch):
            rows = []
            for r in recs[i:i + batch]:
                prompt = tok(chat_prompt(tok, r["prompt"]), add_special_tokens=False)["input_ids"]
                full = tok.apply_chat_template(
                    [{"role": "user", "content": r["prompt"]},
                     {"role": "assistant", "content": r["completion"]}],
                    tokenize=True, return_dict=True)["input_ids"]
                rows.append((full, len(prompt)))
            width = max(len(f) for f, _ in rows)
            ids = torch.full((len(rows), width), tok.pad_token_id)
            labels = torch.full((len(rows), width), -100)
            for j, (full, n_prompt) in enumerate(rows):
                ids[j, :len(full)] = torch.tensor(full)
                labels[j, n_prompt:len(full)] = torch.tensor(full[n_prompt:])
            logits = model(input_ids=ids, attention_mask=(labels != -100) | (
                torch.arange(width) < torch.tensor([len(f) for f, _ in rows])[:, None])).logits
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                     ignore_index=-100, reduction="sum").item()
            count += int((labels[:, 1:] != -100).sum())
    return total / count if count else None


def chat_length(tok, messages: list[dict]) -> int:
    """Tokens of a conversation under the chat template (transformers 5 returns a dict)."""
    return len(tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def decode_responses(tok, ids) -> tuple[list[str], list[bool]]:
    """(text, ended) of each generated row: the tokens before the first EOS, special tokens
    dropped. The one cut that SFT, RM sampling and PPO all use, so their answers compare."""
    texts, ended = [], []
    for row in ids.tolist():
        cut = row.index(tok.eos_token_id) if tok.eos_token_id in row else len(row)
        texts.append(tok.decode(row[:cut], skip_special_tokens=True))
        ended.append(cut < len(row))
    return texts, ended


def sample_answers(model, tok, prompts: list[str], k: int, temperature: float,
                   max_new_tokens: int, batch: int = 64) -> list[list[str]]:
    """k sampled answers per prompt, cut at the EOS, as PPO's rollouts would produce them."""
    import torch
    model.eval()
    tok.padding_side = "left"
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            chunk = prompts[i:i + batch]
            enc = tok([chat_prompt(tok, p) for p in chunk], return_tensors="pt", padding=True,
                      add_special_tokens=False)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True,
                                 temperature=temperature, top_k=None, num_return_sequences=k,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            texts, _ = decode_responses(tok, gen[:, enc["input_ids"].shape[1]:])
            out += [texts[j * k:(j + 1) * k] for j in range(len(chunk))]
    return out


def gold_accuracy(model, tok, recs: list[dict], max_new_tokens: int, batch: int = 32) -> dict:
    """Greedy answers to task prompts, scored by tasks.gold_metrics: gold/accuracy,
    gold/accuracy/<family>, gold/n, gold/eos_rate, and the first samples."""
    import torch
    from stages.tasks import gold_metrics
    model.eval()
    tok.padding_side = "left"   # generation continues from the right edge of every row
    texts, ended = [], []
    with torch.no_grad():
        for i in range(0, len(recs), batch):
            chunk = recs[i:i + batch]
            enc = tok([chat_prompt(tok, r["prompt"]) for r in chunk], return_tensors="pt",
                      padding=True, add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            t, e = decode_responses(tok, out[:, enc["input_ids"].shape[1]:])
            texts += t
            ended += e
    samples = [{"prompt": r["prompt"], "answer": r["answer"], "response": t,
                "correct": ok} for r, t, ok in zip(recs[:12], texts, gold_checks(recs, texts))]
    return {**gold_metrics(recs, texts), "gold/eos_rate": sum(ended) / max(len(recs), 1),
            "samples": samples}


def gold_checks(recs: list[dict], texts: list[str]) -> list[bool]:
    from stages.tasks import check
    return [check(r["answer"], t) for r, t in zip(recs, texts)]


FEWEST = 1e12       # an overhead no padding outweighs: length_groups makes the fewest forwards


def length_groups(lengths: list[tuple[int, ...]], max_rows: int,
                  overhead: float) -> list[list[int]]:
    """Rows split into forwards of at most max_rows rows, each forward padded only to its own
    rows' longest parts (a row's parts: e.g. its left-padded prompt and right-padded response,
    each padded separately). Rows are sorted by length, and the split is the one that computes
    the fewest tokens, padding included, counting each forward as `overhead` tokens more
    (dynamic programming over the sorted rows). Padding is what batched RL forwards mostly
    compute when responses end at different lengths; verl and OpenRLHF remove it by packing
    rows under a varlen attention kernel, which plain HF models on a CPU lack."""
    order = sorted(range(len(lengths)), key=lambda i: -sum(lengths[i]))
    best, cut = [0.0] + [math.inf] * len(order), [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        widest = [0] * len(lengths[0]) if lengths else []
        for i in range(j - 1, max(j - max_rows, 0) - 1, -1):     # the group order[i:j]
            widest = [max(a, b) for a, b in zip(widest, lengths[order[i]])]
            cost = best[i] + (j - i) * sum(widest) + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(order)
    while j > 0:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


# A forward shares a prefix only where that saves at least this many tokens: the prefix's own
# forward costs a forward's fixed overhead (~48 tokens' worth for SmolLM2-135M on 2 CPU cores,
# measured in session 12) plus its tokens.
PREFIX_MIN_SAVED = 64
MEMO_PREFIXES = 4


def worth_sharing(C: int, rows: int) -> bool:
    """Whether encoding a C-token prefix once for `rows` rows saves enough to pay its forward."""
    return C > 0 and C * (rows - 1) >= PREFIX_MIN_SAVED


def shared_prefix(rows: list[list[int]]) -> int:
    """How many leading tokens every row has in common (a chat template's system turn: 24 of
    SmolLM2's 38-41 prompt tokens), leaving each row at least one token of its own (the one
    whose output is read)."""
    if not rows:
        return 0
    n = min(len(r) for r in rows) - 1
    c = 0
    while c < n and all(r[c] == rows[0][c] for r in rows):
        c += 1
    return c


def prefix_cache(model, ids, n: int, memo: dict | None, **kw):
    """Keys and values of the prefix `ids` (1-D), computed once and repeated for n rows (each
    row then runs only what follows it). memo: a frozen model's prefixes, kept by the caller
    for as long as the weights stay; a trained model computes its prefix in every forward, so
    the gradient flows through it to every row. kw: e.g. logits_to_keep=1 for a causal LM."""
    import copy
    import torch
    key = tuple(ids.tolist())
    if memo is not None and key in memo:
        memo[key] = memo.pop(key)           # the most recently used goes last
        cache = copy.deepcopy(memo[key])
    else:
        cache = model(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None],
                      position_ids=torch.arange(len(ids), device=ids.device)[None],
                      use_cache=True, **kw).past_key_values
        if memo is not None:
            memo[key] = copy.deepcopy(cache)
    # A few prefixes at most (a system prompt of 2k tokens is ~0.5 GB of keys and values on a
    # 7B model); the least recently used go first.
    while memo is not None and len(memo) > MEMO_PREFIXES:
        memo.pop(next(iter(memo)))
    cache.batch_repeat_interleave(n)
    return cache


@torch_no_grad
def rm_scores(model, tok, prompts: list[str], responses: list[str], batch: int = 32,
              device=None, overhead: float = FEWEST, memo: dict | None = None,
              share: bool = True):
    """The reward model's score of each (prompt, response), formatted exactly as the RM was
    trained on; `model` may be a DeepSpeed engine. The RM stage and PPO both score with it, in
    forwards of rows sorted by length (length_groups; the default overhead: the fewest). The
    prefix all conversations share (a system turn) runs once a forward (prefix_cache; memo:
    the caller's store of them for a model that stays frozen), unless share is False (ranks
    that must run the same forwards)."""
    import torch
    tok.padding_side = "right"
    device = device or next(model.parameters()).device
    convs = [tok.apply_chat_template([{"role": "user", "content": p},
                                      {"role": "assistant", "content": r}], tokenize=False)
             for p, r in zip(prompts, responses)]
    ids = tok(convs, add_special_tokens=False)["input_ids"]
    C = shared_prefix(ids) if share else 0
    scores = torch.zeros(len(ids), device=device)
    for g in length_groups([(len(x) - C,) for x in ids], batch, overhead):
        c = C if worth_sharing(C, len(g)) else 0
        enc = tok.pad({"input_ids": [ids[i][c:] for i in g]}, return_tensors="pt").to(device)
        if c:
            n, width = enc["input_ids"].shape
            enc["past_key_values"] = prefix_cache(
                model, torch.tensor(ids[g[0]][:c], device=device), n, memo)
            enc["attention_mask"] = torch.cat(
                [enc["attention_mask"].new_ones(n, c), enc["attention_mask"]], 1)
            enc["position_ids"] = (c + torch.arange(width, device=device)).expand(n, width)
        scores[g] = model(**enc).logits[:, 0].float()
    return scores


def model_summary(path) -> dict:
    """What a saved HF model directory is — architecture, parameters (from the safetensors
    headers, no weights read), dtype, tokenizer, chat template — for its manifest, so lineage
    shows what was trained rather than the settings that were asked for."""
    import json
    import struct
    from pathlib import Path
    root = Path(path)
    cfg = json.loads((root / "config.json").read_text())
    params, dtypes = 0, set()
    for f in sorted(root.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, t in header.items():
            if name != "__metadata__":
                params += math.prod(t["shape"])
                dtypes.add(t["dtype"].lower())
    tok_cfg = root / "tokenizer_config.json"
    tok = json.loads(tok_cfg.read_text()) if tok_cfg.is_file() else {}

    def token(key):   # a plain string, or {"content": ...} in older files
        v = tok.get(key)
        return v.get("content") if isinstance(v, dict) else v
    return {"architecture": (cfg.get("architectures") or ["?"])[0],
            "model_type": cfg.get("model_type"), "parameters": params,
            "dtype": ",".join(sorted(dtypes)) or None,
            "hidden_size": cfg.get("hidden_size"), "layers": cfg.get("num_hidden_layers"),
            "max_position_embeddings": cfg.get("max_position_embeddings"),
            "vocab_size": cfg.get("vocab_size"),
            "tokenizer": {"class": tok.get("tokenizer_class"), "eos": token("eos_token"),
                          "bos": token("bos_token"), "pad": token("pad_token")},
            "chat_template": (root / "chat_template.jinja").is_file() or "chat_template" in tok}
