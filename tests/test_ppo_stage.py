"""Stage ppo through the real deepspeed launcher on this CPU: tiny SFT actor, tiny RM."""
import json
import os
import subprocess
import sys

import pytest
import torch

from flows.launch import build_command
from stages.config import PPOConfig
from stages.configfile import load_config
from stages.ppo import headline, reward_hacking
from tests.conftest import REPO, kill_after_checkpoint, launch_stage

STEPS = ["train.max_steps=4", "checkpoint.every_steps=2", "train.eval_every=100"]


def rows(path):
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_ppo_runs_and_exports_the_actor_with_both_parents(chain):
    root, store, _, _ = chain
    digest, log = launch_stage(root, "ppo")
    art = store.get(digest)
    roles = {p["role"]: p["digest"] for p in art.parents}
    assert roles["actor"] == store.resolve("tiny-sft") and roles["reward"] == store.resolve("tiny-rm")
    assert store.get(roles["prompts"]).manifest["name"] == "tiny-prompts"
    m = art.manifest["metrics"]
    for k in ("rl/reward", "baseline/rl/reward", "gold/accuracy", "baseline/gold/accuracy",
              "rl/kl", "rl/reward_hacking", "rl/beta", "rl/sampled_reward",
              "baseline/rl/sampled_reward", "gold/sampled_accuracy",
              "baseline/gold/sampled_accuracy"):
        assert k in m, k
    assert 0 <= m["gold/sampled_accuracy"] <= 1
    assert m["gold/n"] == 16 and m["gold/sampled_n"] == 16 * 4     # eval prompts x samples
    assert m["rl/kl"] >= 0                    # exact KL on greedy evaluation
    # per family, as SFT reports it (tasks.gold_metrics), the baseline measured alike
    fams = {k.split("/")[-1] for k in m if k.startswith("gold/accuracy/")}
    assert fams and all(f"baseline/gold/accuracy/{f}" in m for f in fams)
    h = art.manifest["headline"]
    assert h["metric"] == "gold/sampled_accuracy" and h["value"] == m["gold/sampled_accuracy"]
    assert "greedy: RM reward" in h["text"] and "(target 6.0)" in h["text"]
    log_rows = [json.loads(l) for l in (art.local_path() / "train_log.jsonl").read_text()
                .splitlines()]
    assert [r["step"] for r in log_rows] == [1, 2, 3]
    first = log_rows[0]
    for k in ("rollout/reward", "rollout/gold_accuracy", "rollout/kl", "policy/entropy",
              "policy/clipfrac", "policy/approx_kl", "loss/value", "critic/explained_variance",
              "rollout/response_length"):
        assert k in first, k
    # How fast is not what was trained: timings live in the manifest, outside the digest.
    assert not [k for r in log_rows for k in r if k == "time" or k.startswith("perf/")]
    perf = art.manifest["perf_log"]
    assert [r["step"] for r in perf] == [1, 2, 3]
    for k in ("perf/gen_tokens_per_s", "perf/train_tokens_per_s", "perf/generation_share"):
        assert k in perf[0], k
    # generate() is part of the rollout, which also scores: the shares say which is which.
    assert 0 < perf[0]["perf/generation_share"] < perf[0]["perf/rollout_share"] < 1
    assert perf[0]["perf/shared_prefix_tokens"] > 0    # the chat template's opening, at least
    assert abs(first["rollout/kl"]) < 1e-5   # the actor starts as the reference
    assert "SFT on held-out prompts" in log and "greedy: RM reward" in log   # the headline
    out = subprocess.run([sys.executable, "-c",
                          "import sys; from transformers import AutoModelForCausalLM as A; "
                          "print(type(A.from_pretrained(sys.argv[1])).__name__)",
                          str(art.local_path())], capture_output=True, text=True, timeout=300)
    assert "LlamaForCausalLM" in out.stdout, out.stderr[-2000:]


def test_reward_hacking_is_told_apart_for_greedy_and_sampled_responses():
    sft = {"rl/reward": 1.0, "gold/accuracy": 0.8, "rl/sampled_reward": 0.5,
           "gold/sampled_accuracy": 0.4}
    n = {"gold/n": 150, "gold/sampled_n": 600}

    def final(after):   # the stage's final metrics: figures, baseline/..., counts
        return {**after, **{f"baseline/{k}": v for k, v in sft.items()}, **n}
    honest = {"rl/reward": 1.2, "gold/accuracy": 0.85, "rl/sampled_reward": 0.9,
              "gold/sampled_accuracy": 0.6}
    assert reward_hacking(final(honest)) == []
    sampled_only = {**honest, "gold/sampled_accuracy": 0.3}
    [(mode, gain, gold)] = reward_hacking(final(sampled_only))
    assert mode == "sampled" and gain == pytest.approx(0.4) and gold == pytest.approx(-0.1)
    both = {"rl/reward": 1.5, "gold/accuracy": 0.6, "rl/sampled_reward": 0.6,
            "gold/sampled_accuracy": 0.2}
    assert [h[0] for h in reward_hacking(final(both))] == ["greedy", "sampled"]
    # Two of 150 prompts lost is within the noise (2 SE = 0.09 here): no verdict.
    assert reward_hacking(final({**honest, "gold/accuracy": 0.787})) == []
    # The paired test, where the stage measured per prompt, decides instead: the same 1.3-point
    # loss is beyond the noise when every prompt moved the same way.
    paired = {**honest, "gold/accuracy": 0.787, "gold/delta": -0.013, "gold/delta_se": 0.002}
    assert [h[0] for h in reward_hacking(final(paired))] == ["greedy"]
    # Reward down and gold down is a worse policy, not hacking; no sampled figures, no verdict.
    assert reward_hacking({"rl/reward": 0.9, "gold/accuracy": 0.5, "gold/n": 150,
                           "baseline/rl/reward": 1.0, "baseline/gold/accuracy": 0.8}) == []


def test_headline_calls_changes_within_noise_so():
    cfg = load_config(PPOConfig, REPO / "configs" / "tiny" / "ppo.yaml",
                      ["rollout.temperature=0.7", "kl.target=2.0"])
    m = {"rl/sampled_reward": 2.153, "baseline/rl/sampled_reward": 0.508,
         "gold/sampled_accuracy": 0.728, "baseline/gold/sampled_accuracy": 0.498,
         "gold/sampled_n": 600, "rl/reward": 2.803, "baseline/rl/reward": 2.494,
         "gold/accuracy": 0.833, "baseline/gold/accuracy": 0.847, "gold/n": 150,
         "rl/kl": 0.666, "rl/reward_hacking": False}
    h = headline(m, cfg)
    line = h["text"]
    assert "sampled at T 0.7: RM reward 0.508 -> 2.153, gold accuracy 0.498 -> 0.728 (raised)" \
        in line
    assert "greedy: RM reward 2.494 -> 2.803, gold accuracy 0.847 -> 0.833 (within noise)" in line
    assert "KL 0.666 (target 2.0)" in line and "HACKING" not in line
    assert h["metric"] == "gold/sampled_accuracy" and h["baseline"] == 0.498
    worse = headline({**m, "gold/sampled_accuracy": 0.40, "rl/reward_hacking": True}, cfg)
    assert "0.498 -> 0.400 (LOWER)" in worse["text"] and worse["text"].endswith("REWARD HACKING")


def test_killed_ppo_resumes_to_the_same_rollouts(chain):
    root, store, _, _ = chain
    launch_stage(root, "ppo", *STEPS, f"run.work_dir={root / 'straight'}", "run.force=true")
    straight = rows(next((root / "straight").glob("*/metrics.jsonl")))
    cmd = build_command("ppo", REPO / "configs" / "tiny" / "ppo.yaml",
                        [f"run.store={root / 'store'}", f"run.work_dir={root / 'killed'}",
                         *STEPS, "run.force=true"])
    kill_after_checkpoint(cmd, root / "killed", root / "home")
    _, log = launch_stage(root, "ppo", *STEPS, f"run.work_dir={root / 'killed'}",
                          "run.force=true")
    assert "resumed from" in log and "at step 2" in log   # the step all engines completed
    resumed = rows(next((root / "killed").glob("*/metrics.jsonl")))
    for step in (3, 4):
        for k in ("rollout/reward", "rollout/kl", "loss/policy", "loss/value", "rl/beta"):
            assert resumed[step][k] == pytest.approx(straight[step][k], rel=1e-4, abs=1e-6), \
                (step, k)


@pytest.mark.parametrize("override, message", [
    ("reward=tiny-sft", "comes from stage sft; needs one of rm"),
    ("actor=tiny-rm", "comes from stage rm; needs one of sft, ppo"),
    ("data.prompts=datasets_cfg/tiny_sft.yaml", "kind is 'sft', stage ppo needs 'prompts'"),
    ("data.max_prompt_length=125", "leaves no room for rollout.max_new_tokens=8"),
    ("data.max_prompt_length=12", "prompts are longer than data.max_prompt_length=12"),
    ("ppo.minibatch_size=3", "does not divide the 16 rollouts per rank"),
    ("ppo.reward_source=checker data.prompts={tmp}/open.yaml",
     "ppo.reward_source=checker needs an answer for every prompt; 4 of 4 have none"),
])
def test_bad_input_fails_before_any_engine(chain, override, message, tmp_path):
    root = chain[0]
    env = {**os.environ, "ALIGNFLOW_HOME": str(root / "home")}
    # Open-ended prompts (no answer to check), for the checker reward's refusal.
    (tmp_path / "open.jsonl").write_text("".join(
        json.dumps({"prompt": p}) + "\n" for p in ("Tell me a story.", "Why is the sky blue?",
                                                   "Name a color.", "Say hi.")))
    (tmp_path / "open.yaml").write_text(
        "name: open-prompts\nkind: prompts\ntrain_examples: 1\neval_examples: 3\nseed: 1\n"
        f"sources:\n  - {{name: open, type: files, paths: [{tmp_path / 'open.jsonl'}]}}\n")
    out = subprocess.run([sys.executable, "-m", "stages.ppo", "--config",
                          str(REPO / "configs" / "tiny" / "ppo.yaml"),
                          f"run.store={root / 'store'}", "deepspeed.num_gpus=1",   # plain python: 1 rank
                          *override.format(tmp=tmp_path).split()], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
    assert "rollouts per rank per step" not in out.stderr   # no engine was built


def tiny_reward_model(seed=0):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=32, max_position_embeddings=16,
                      num_labels=1, pad_token_id=0)
    return LlamaForSequenceClassification(cfg).eval()


def test_critic_starts_in_the_units_of_its_targets():
    # The returns are (score - mean) / std: the critic's first values must be too.
    from stages.ppo import Critic
    rm = tiny_reward_model()
    ids = torch.tensor([[3, 5, 7, 9], [4, 6, 8, 10]])
    attn = torch.ones_like(ids)
    pos = torch.arange(4).expand(2, 4)
    with torch.no_grad():
        score = rm(input_ids=ids, attention_mask=attn).logits[:, 0]
        values = Critic(rm, mean=1.5, std=3.2)(ids, attn, pos).logits
    assert values[:, -1].tolist() == pytest.approx(((score - 1.5) / 3.2).tolist(), abs=1e-5)
    assert not torch.allclose(values[:, -1], score)    # the raw head would be off by the spread


def test_the_kl_anchor_of_a_chained_ppo_run_is_the_sft_model(pipeline_store, tmp_path):
    from stages.ppo import reference_of
    from tests.conftest import put
    store, a = pipeline_store
    assert reference_of(store, a["sft"]).digest == a["sft"].digest
    assert reference_of(store, a["ppo"]).digest == a["sft"].digest       # actor parent: sft
    again = put(store, tmp_path, {"model.safetensors": b"w5"}, kind="model", stage="ppo",
                name="demo-ppo", parents=[{"role": "actor", "digest": a["ppo"].digest},
                                          {"role": "reward", "digest": a["rm"].digest}])
    assert reference_of(store, again).digest == a["sft"].digest         # not the first PPO model


def test_ppo_learning_rate_follows_optim_over_ppo_steps():
    from stages.ppo import ppo_lr_lambda
    cfg = load_config(PPOConfig, REPO / "configs" / "tiny" / "ppo.yaml",
                      ["optim.warmup_steps=1", "optim.min_lr_ratio=0.1", "train.max_steps=3"])
    f = ppo_lr_lambda(cfg, world=2)          # 2 epochs x (8 rollouts / minibatch 4) = 4 updates
    assert [f(u) for u in range(4)] == [0.5] * 4                       # PPO step 0: warmup
    assert f(4) == pytest.approx(1.0) and f(8) == pytest.approx(0.55)  # cosine halfway
    assert f(12) == pytest.approx(0.1)                                 # the floor at the end


def test_dropout_is_off_in_every_engine():
    from stages.engine import no_dropout
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.1))
    model.config = type("C", (), {})()
    model.config.attention_dropout, model.config.hidden_size = 0.1, 4
    no_dropout(model)
    assert model[1].p == 0.0 and model.config.attention_dropout == 0.0
    assert model.config.hidden_size == 4


@pytest.mark.parametrize("method, extra", [
    ("grpo", ["kl.placement=loss", "ppo.loss_agg=constant"]),
    ("rloo", ["ppo.scale_rewards=false"])])
def test_critic_free_advantages_run_in_the_same_stage(chain, method, extra):
    root, store, _, _ = chain
    digest, log = launch_stage(root, "ppo", f"ppo.advantage={method}", "ppo.group_size=4",
                               f"run.name=tiny-{method}", f"run.work_dir={root / method}", *extra)
    art = store.get(digest)
    assert art.stage == "ppo" and art.manifest["config"]["ppo"]["advantage"] == method
    assert {"rl/reward", "gold/accuracy", "baseline/gold/accuracy"} <= set(art.manifest["metrics"])
    rows = [json.loads(l) for l in (art.local_path() / "train_log.jsonl").read_text()
            .splitlines()]
    assert "loss/policy" in rows[0] and "loss/value" not in rows[0]        # no critic trained
    assert ("loss/kl" in rows[0]) == ("kl.placement=loss" in extra)
    assert f"{method} advantages, engines: actor, reference, reward;" in log   # no critic


class _Engine:
    """What rollout() needs of a DeepSpeed engine: .module, and calls passed to it."""
    def __init__(self, model):
        self.module = model

    def __call__(self, *args, **kw):
        return self.module(*args, **kw)


class _EndsEarly:
    """An actor whose row i ends its response after i % 4 + 1 tokens, so rows differ in
    length (the tiny model rarely ends on its own): generate() gains a logits processor; the
    logits it returns, and every forward, are the model's own."""
    def __init__(self, model):
        self.model = model

    def __call__(self, *args, **kw):
        return self.model(*args, **kw)

    def generate(self, **kw):
        P, eos = kw["input_ids"].shape[1], kw["eos_token_id"]

        def end(ids, scores):
            rows = torch.arange(len(ids)) % 4 == ids.shape[1] - P
            scores[rows] = float("-inf")
            scores[rows, eos] = 0.0
            return scores
        return self.model.generate(**{**kw, "logits_processor": [
            *kw.get("logits_processor", []), end]})


def test_rollout_logprobs_are_the_actors_and_micro_batches_change_nothing(chain):
    # The log-probs kept at rollout come from generate()'s own logits (no second forward); they
    # must be what a forward of the sampled sequences gives, or the first PPO ratio is not 1.
    # Scoring in micro-batches must give what one batch gives.
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    import stages.losses as L
    from stages.engine import Dist
    from stages.model import load_tokenizer
    from dataclasses import replace
    from stages.ppo import Critic, Models, rollout
    _, store, _, _ = chain
    sft, rm = (store.get(store.resolve(f"tiny-{s}@latest")) for s in ("sft", "rm"))
    actor = AutoModelForCausalLM.from_pretrained(sft.local_path()).eval()
    reward = AutoModelForSequenceClassification.from_pretrained(rm.local_path()).eval()
    m = Models(_Engine(_EndsEarly(actor)), _Engine(Critic(reward)), _Engine(actor),
               _Engine(reward), load_tokenizer(sft.local_path()),
               {"reward_mean": 0.0, "reward_std": 1.0}, L.KLController(0.05, False, 2.0, 10000))
    prompts = [{"prompt": f"Sort in ascending order: {a} {b} {c}"}
               for a, b, c in ((3, 1, 2), (9, 4, 7), (5, 0, 8), (6, 2, 1), (7, 3, 9), (1, 8, 0))]
    d = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    out = {}
    # One forward; three; and forwards by response length (no overhead: a group per length).
    for mb, overhead in ((8, 10**9), (2, 10**9), (8, 0)):
        cfg = load_config(PPOConfig, REPO / "configs" / "tiny" / "ppo.yaml",
                          [f"train.micro_batch_size={mb}", "ppo.whiten_advantages=false",
                           "deepspeed.num_gpus=1"])
        torch.manual_seed(0)
        out[mb, overhead] = rollout(replace(m, overhead=overhead), prompts, cfg, d)
    b = out[8, 10**9]
    with torch.no_grad():
        logits = actor(input_ids=b.seq, attention_mask=b.attn, position_ids=b.pos).logits
    fresh = L.token_logprobs(logits[:, b.P - 1:-1], b.resp, cfg.rollout.temperature)
    assert b.mask.sum() > len(prompts)                       # responses of more than one token
    assert torch.allclose(b.logp * b.mask, fresh * b.mask, atol=1e-4)
    assert torch.allclose(b.ref_logp, b.logp, atol=1e-4)      # reference = actor here
    assert b.mask.sum(1).unique().numel() > 1                 # responses of several lengths
    for k in ("logp", "ref_logp", "values", "exact_kl", "raw", "adv"):
        for other in (out[2, 10**9], out[8, 0]):
            assert torch.allclose(getattr(other, k), getattr(b, k), atol=1e-5), k
    # min_new_tokens: no EOS before it, so every row runs that long. The tiny model rarely ends
    # on its own: from its fourth token on, it is made to.
    calls = []
    eos = m.tok.eos_token_id

    def fourth_on(mod, args, out):    # counts generate()'s steps, not a shared prefix's pass
        if len(out) == len(prompts):
            calls.append(1)
            out[..., eos] += 100.0 * (len(calls) > 3)
    actor.lm_head.register_forward_hook(fourth_on)
    m = replace(m, actor=_Engine(actor))
    runs = {}
    for least in (0, 12):
        cfg = load_config(PPOConfig, REPO / "configs" / "tiny" / "ppo.yaml",
                          [f"rollout.min_new_tokens={least}", "rollout.max_new_tokens=12",
                           "ppo.whiten_advantages=false", "deepspeed.num_gpus=1"])
        torch.manual_seed(0)
        calls.clear()
        runs[least] = rollout(m, prompts, cfg, d, learn=False)
    b, full = runs[0], runs[12]
    assert b.resp.shape[1] == 4 and b.mask.sum(1).le(4).all() and b.ended.all()
    assert full.resp.shape[1] == 12 and full.mask.eq(1).all(), full.texts
    assert not full.resp.eq(eos).any() and not full.ended.any()
    # The log-probs are the full distribution's (EOS included), not the constrained one's.
    assert full.logp[:, 3:].lt(-50).all() and full.logp[:, :3].gt(-50).all()


class _Trained(_Engine):
    """A DeepSpeed engine's backward() and step(), by plain SGD."""
    def __init__(self, model):
        super().__init__(model)
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.opt.step()
        self.opt.zero_grad()


def test_ppo_epochs_in_length_groups_take_the_step_one_padded_forward_takes(chain):
    # A minibatch may run in several forwards of rows of similar length, their losses summed
    # into one backward: the update must be the one a single padded forward gives.
    import copy
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    import stages.losses as L
    from stages.engine import Dist
    from stages.model import load_tokenizer
    from stages.ppo import Critic, Models, groups, ppo_epochs, rollout
    _, store, _, _ = chain
    sft, rm = (store.get(store.resolve(f"tiny-{s}@latest")) for s in ("sft", "rm"))
    actor = AutoModelForCausalLM.from_pretrained(sft.local_path()).eval()
    reward = AutoModelForSequenceClassification.from_pretrained(rm.local_path()).eval()
    tok = load_tokenizer(sft.local_path())
    cfg = load_config(PPOConfig, REPO / "configs" / "tiny" / "ppo.yaml",
                      ["ppo.minibatch_size=4", "ppo.epochs=2", "deepspeed.num_gpus=1",
                       "kl.placement=loss", "ppo.whiten_advantages=false"])
    m = Models(_Engine(_EndsEarly(actor)), _Engine(Critic(reward)), _Engine(actor),
               _Engine(reward), tok, {"reward_mean": 0.0, "reward_std": 1.0},
               L.KLController(0.05, False, 2.0, 10000))
    prompts = [{"prompt": f"Sort in ascending order: {a} {b} {c}"}
               for a, b, c in ((3, 1, 2), (9, 4, 7), (5, 0, 8), (6, 2, 1), (7, 3, 9), (1, 8, 0),
                               (4, 4, 1), (2, 9, 5))]
    d = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    torch.manual_seed(0)
    b = rollout(m, prompts, cfg, d)
    assert len(groups(b.seq, b.attn, b.pos, b.P, b.mask, 4, 0)) > 2     # lengths differ
    stats, params = {}, {}
    for overhead in (10**9, 0):
        a, c = copy.deepcopy(actor).train(), copy.deepcopy(Critic(reward)).train()
        m = Models(_Trained(a), _Trained(c), _Engine(actor), _Engine(reward), tok,
                   {"reward_mean": 0.0, "reward_std": 1.0},
                   L.KLController(0.05, False, 2.0, 10000), overhead=overhead)
        stats[overhead] = ppo_epochs(m, b, cfg, np.random.default_rng(0))
        params[overhead] = [p.detach() for p in (*a.parameters(), *c.parameters())]
    assert stats[0].keys() == stats[10**9].keys()
    for k, v in stats[0].items():
        # critic/clipfrac counts ties: old + (v - old) rounds to either side of v, so it moves
        # with the last bit of a value; the loss and its gradient do not.
        if k != "critic/clipfrac":
            assert v == pytest.approx(stats[10**9][k], rel=1e-4, abs=1e-6), k
    moved = [(p - q).abs().max().item() for p, q in zip(params[0], params[10**9])]
    assert max(moved) < 1e-6
    assert any(not torch.equal(p, q) for p, q in zip(params[0], actor.parameters()))


def test_rm_agreement_counts_right_wrong_pairs_within_a_prompt():
    from stages.ppo import rm_agreement
    oks = [True, False, True,               # two right, one wrong: 2 pairs
           True, True, True,                # all right: no pair
           None, None, None]                # no answer: not counted
    scores = [2.0, 1.0, 0.5,  0, 0, 0,  9, 9, 9]
    assert rm_agreement(oks, scores, 3) == (1, 2)   # 2.0 > 1.0, but 0.5 < 1.0


def test_a_lone_rank_without_zero_skips_the_gradient_all_reduce():
    from stages.engine import lone_rank

    class Eng:
        enable_backward_allreduce = True

        def __init__(self, stage):
            self.stage = stage

        def zero_optimization_stage(self):
            return self.stage
    assert lone_rank(Eng(0), 1).enable_backward_allreduce is False
    assert lone_rank(Eng(0), 2).enable_backward_allreduce is True     # other ranks' gradients
    assert lone_rank(Eng(2), 1).enable_backward_allreduce is True     # ZeRO partitions there


def test_adamw_takes_the_fused_kernel_on_the_cpu_and_matches_the_reference_update():
    from stages.config import OptimConfig
    from stages.engine import adamw
    torch.manual_seed(0)
    models = [torch.nn.Linear(4, 3) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    fused = adamw(models[0], cfg)
    assert fused.defaults["fused"] is True
    groups = [{"params": [models[1].weight], "weight_decay": 0.1},
              {"params": [models[1].bias], "weight_decay": 0.0}]
    plain = torch.optim.AdamW(groups, lr=1e-2, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    x = torch.randn(5, 4)
    for model, opt in zip(models, (fused, plain)):
        for _ in range(3):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b)


def test_inverse_cdf_sampling_draws_from_the_tempered_softmax_and_never_a_masked_token():
    from stages.ppo import InverseCDFSampling
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, float("-inf"), -1.0]]).repeat(20000, 1)
    scores = InverseCDFSampling(0.7)(None, logits)
    token = scores.argmax(-1)
    assert torch.isinf(scores).sum(1).eq(4).all()          # exactly one finite score per row
    freq = torch.bincount(token, minlength=5).double() / len(token)
    want = torch.softmax(logits[0].double() / 0.7, -1)
    assert freq[3] == 0
    # 20000 draws: the binomial SE of each frequency is at most 0.0036; 5 SEs.
    assert (freq - want).abs().max() < 0.018, (freq, want)


def test_a_frozen_lm_head_reads_a_contiguous_input_and_gives_the_same_logits():
    from stages.engine import contiguous_lm_head

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(4, 6, bias=False)
    torch.manual_seed(0)
    lm = LM().requires_grad_(False)
    h = torch.randn(2, 5, 4)[:, -3:]              # what logits_to_keep hands the head
    want = lm.lm_head(h)
    contiguous_lm_head(lm)
    seen = []
    lm.lm_head.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous()))
    torch.testing.assert_close(lm.lm_head(h), want)
    assert not h.is_contiguous() and seen == [True]


def test_forwards_are_the_fewest_unless_configured_and_always_under_zero3_on_several_ranks():
    from stages.engine import Dist
    from stages.ppo import FEWEST, forward_cost

    class Engine:
        def zero_optimization_stage(self):
            return self.stage

    class M:
        actor = Engine()
        critic = ref = reward = None
    cpu = torch.device("cpu")
    one, two = (Dist(rank=0, world=w, local_rank=0, device=cpu) for w in (1, 2))
    default = load_config(PPOConfig, REPO / "configs" / "tiny" / "ppo.yaml", [])
    seven = load_config(PPOConfig, REPO / "configs" / "tiny" / "ppo.yaml",
                        ["ppo.forward_overhead_tokens=7"])
    for stage in (0, 3):
        M.actor.stage = stage
        assert forward_cost(M, default, one)[0] == FEWEST
        assert forward_cost(M, seven, one)[0] == 7
        assert forward_cost(M, default, two)[0] == FEWEST
    assert forward_cost(M, seven, two)[0] == FEWEST      # ZeRO-3: the same forwards everywhere
    M.actor.stage = 2
    assert forward_cost(M, seven, two) == (7, "configured")


def test_shared_prompts_and_prefixes_give_each_row_the_logits_and_gradients_of_its_own_copy(
        chain, monkeypatch):
    # A grpo/rloo group's prompt is encoded once and its keys and values repeated for its k
    # responses; the prefix every prompt starts with (a chat template's system turn) is encoded
    # once a forward, and once for generate(). The responses, log-probs, values, RM scores and
    # the gradients through the shared parts must be those of separate copies.
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    import stages.losses as L
    import stages.model
    from dataclasses import replace
    from stages.engine import Dist
    from stages.model import load_tokenizer
    from stages.ppo import Critic, Models, groups, response_logits, rollout
    monkeypatch.setattr(stages.model, "PREFIX_MIN_SAVED", 0)    # share even a short prefix
    _, store, _, _ = chain
    sft, rm = (store.get(store.resolve(f"tiny-{s}@latest")) for s in ("sft", "rm"))
    actor = AutoModelForCausalLM.from_pretrained(sft.local_path()).eval()
    reward = AutoModelForSequenceClassification.from_pretrained(rm.local_path()).eval()
    critic = Critic(reward, mean=0.3, std=2.0)
    m = Models(_Engine(_EndsEarly(actor)), _Engine(critic), _Engine(actor), _Engine(reward),
               load_tokenizer(sft.local_path()), {"reward_mean": 0.0, "reward_std": 1.0},
               L.KLController(0.05, False, 2.0, 10000))
    cfg = load_config(PPOConfig, REPO / "configs" / "tiny" / "ppo.yaml",
                      ["deepspeed.num_gpus=1", "ppo.group_size=3", "ppo.whiten_advantages=false",
                       "train.micro_batch_size=12", "train.global_batch_size=12"])
    prompts = [{"prompt": p} for p in ("Sort in ascending order: 3 1 2",
                                       "Sort in ascending order: 9 4 7 5 0 2 8 6",
                                       "Sort in ascending order: 5 0 8 1") for _ in range(3)]
    d = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    runs = {}
    for k, share in ((3, True), (3, False), (1, True)):
        torch.manual_seed(0)
        runs[k, share] = rollout(replace(m, share_prompts=share), prompts, cfg, d, k=k)
    b = runs[3, True]
    assert b.k == 3 and b.C > 3 and b.mask.sum(1).unique().numel() > 1
    assert runs[3, False].k == 1 and runs[3, False].C == 0 and runs[1, True].C == b.C
    assert m.memo["ref"] and m.memo["reward"]          # the frozen models' prefixes, kept
    for other in (runs[3, False], runs[1, True]):     # generate() prefilled the prefix once
        assert torch.equal(b.resp, other.resp)
        for key in ("logp", "ref_logp", "exact_kl", "values", "raw", "adv"):
            assert torch.allclose(getattr(b, key), getattr(other, key), atol=1e-5), key
    assert rollout(m, prompts[1:] + prompts[:1], cfg, d, k=3).k == 1   # groups split: no share
    (g,) = groups(b.seq, b.attn, b.pos, b.P, b.mask, 12, 10**9, k=3, C=b.C)
    assert g.C == b.C
    for model in (actor, critic):
        out = {}
        for k, C in ((3, b.C), (3, 0), (1, b.C), (1, 0)):
            y = response_logits(model, replace(g, k=k, C=C))
            y = (L.token_logprobs(y, b.resp[g.rows, :g.R]) if model is actor else y) \
                * b.mask[g.rows, :g.R]
            (y.sum() * 0.1).backward()
            out[k, C] = y.detach(), [p.grad.clone() for p in model.parameters()]
            model.zero_grad()
        y0, grads0 = out[1, 0]
        assert any(a.abs().sum() > 0 for a in grads0)
        for key, (y, grads) in out.items():
            assert torch.allclose(y, y0, atol=1e-5), key
            for a, c in zip(grads, grads0):
                assert torch.allclose(a, c, atol=1e-5), key
