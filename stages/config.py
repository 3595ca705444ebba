"""Typed stage configuration: one pydantic schema per stage on the shared `StageConfig`.

Values live in YAML (configs/<size>/<stage>.yaml), loaded by stages/configfile.py. This module
must stay free of torch: flows import it to type their parameters.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field, model_validator

from stages.configfile import Strict, find_file

STAGES = ("pretrain", "sft", "rm", "ppo")   # the one spelling of the stage names


# --- shared parts -------------------------------------------------------------------------

class RunConfig(Strict):
    name: str = Field(description="Model name in the artifact store; each run adds a version.",
                      pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    store: str | None = Field(None, description="Artifact store root: a path or fsspec URL. "
                              "Default: $ALIGNFLOW_STORE, else .alignflow/store.")
    work_dir: str | None = Field(None, description="Scratch for checkpoints and logs; on "
                                 "several nodes, a path every node mounts. Default: "
                                 "$ALIGNFLOW_HOME/runs/<name>.")
    flow_run_id: str | None = Field(None, description="The Prefect flow run that launched this "
                                    "run (set by the flow; recorded in the manifest).")
    seed: int = Field(1337, description="One seed drives data order, init and sampling.")
    log_every: int = Field(10, gt=0, description="Steps between metric lines.")
    force: bool = Field(False, description="Train even when an artifact with exactly these "
                        "inputs (config, parents, code) exists; otherwise it is reused.")


class ModelConfig(Strict):
    preset: Literal["tiny", "demo", "125m", "350m", "1b", "7b"] | None = Field(
        "tiny", description="LLaMA shape: tiny for tests, demo for the CPU demo, the rest for GPUs "
        "(unused with init_from).")
    init_from: str | None = Field(None, description="Model artifact to continue from instead of "
                                  "a random init (its architecture and tokenizer replace preset "
                                  "and vocab_size); a directory must be imported first "
                                  "(`alignflow import`).")
    max_position_embeddings: int | None = Field(None, gt=0, description="Override the preset's "
                                                "context length.")


class OptimConfig(Strict):
    lr: float = Field(3e-4, gt=0, description="Peak learning rate, reached after warmup.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine floor as a fraction of lr "
                                "(Chinchilla decays to ~10%).")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup; keeps early Adam steps from "
                              "blowing up on random init.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW decoupled decay on matrices only.")
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1, description="0.95 rather than 0.999: steadier for LLMs.")
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, gt=0, description="Global norm clip; guards against loss spikes.")


class TrainConfig(Strict):
    micro_batch_size: int = Field(4, gt=0, description="Sequences per rank per forward pass.")
    global_batch_size: int = Field(8, gt=0, description="Sequences per optimizer step over all "
                                   "ranks; must be a multiple of micro_batch_size x ranks.")
    max_steps: int = Field(100, gt=0, description="Optimizer steps; the cosine horizon matches it.")
    eval_every: int = Field(50, gt=0, description="Steps between held-out evaluations.")
    eval_batches: int = Field(4, gt=0, description="Micro-batches per evaluation, per domain.")


class DeepSpeedConfig(Strict):
    template: str = Field("infra/deepspeed/zero2.json", description="DeepSpeed JSON template: "
                          "ZeRO stage and offload live there (zero0..zero3, zero3_offload); "
                          "batch sizes, precision and clipping are filled in from this config.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on GPUs that support it, fp32 on CPU. bf16 also runs "
        "on CPUs with AVX512-BF16 or AMX (about twice fp32's matmul rate).")
    num_gpus: int = Field(1, gt=0, description="Ranks per node (CPU processes on a CPU machine).")
    num_nodes: int = Field(1, gt=0)
    hostfile: str | None = Field(None, description="DeepSpeed hostfile for multi-node launches.")
    master_port: int | None = Field(None, gt=0, lt=65536, description="Rendezvous port; default "
                                    "picks a free one so concurrent jobs do not collide.")

    @model_validator(mode="after")
    def _check(self):
        zero = load_deepspeed_template(self.template).get("zero_optimization", {})
        stage = zero.get("stage", 0)
        if "offload_param" in zero and stage != 3:
            raise ValueError(f"{self.template}: offload_param needs ZeRO stage 3, template has "
                             f"stage {stage}")
        if "offload_optimizer" in zero and stage == 0:
            raise ValueError(f"{self.template}: offload_optimizer needs ZeRO stage 1, 2 or 3")
        if self.num_nodes > 1 and not self.hostfile:
            raise ValueError("num_nodes > 1 needs a hostfile")
        if self.hostfile and not find_file(self.hostfile).is_file():
            raise ValueError(f"hostfile {self.hostfile} not found")
        return self

    @property
    def world_size(self) -> int:
        return self.num_gpus * self.num_nodes


def load_deepspeed_template(path: str) -> dict:
    p = find_file(path)
    if not p.is_file():
        raise ValueError(f"DeepSpeed template {path} not found")
    try:
        data = json.loads(p.read_text())
    except ValueError as e:
        raise ValueError(f"DeepSpeed template {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"DeepSpeed template {path} must hold a JSON object")
    return data


class CheckpointConfig(Strict):
    every_steps: int = Field(50, gt=0, description="Steps between resumable checkpoints.")
    keep_last: int = Field(2, gt=0, description="Older checkpoints are deleted to bound disk use.")
    resume: bool = Field(True, description="Continue from the newest checkpoint in work_dir.")


class StageConfig(Strict):
    """The sections every stage has; each stage's schema adds its own (parents, data, method).
    One level, for shared fields only: no behaviour lives here."""
    run: RunConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    @model_validator(mode="after")
    def _batch_divides(self):
        per_step = self.train.micro_batch_size * self.deepspeed.world_size
        if self.train.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size={self.train.global_batch_size} does not divide over "
                f"{self.deepspeed.world_size} rank(s) x micro_batch_size "
                f"{self.train.micro_batch_size}; use a multiple of {per_step}")
        if self.optim.warmup_steps >= self.train.max_steps:
            raise ValueError(f"optim.warmup_steps={self.optim.warmup_steps} must be below "
                             f"train.max_steps={self.train.max_steps}")
        return self


# --- pretrain -----------------------------------------------------------------------------

class PretrainDataConfig(Strict):
    mixture: str = Field(description="Data mixture YAML (datasets_cfg/*.yaml).")
    tokenizer: str | None = Field(None, description="Tokenizer artifact ref or HF directory to "
                                  "reuse; empty trains a byte-level BPE on the mixture.")
    vocab_size: int | None = Field(8192, gt=0, description="BPE vocabulary when training a "
                                   "tokenizer (unused with a tokenizer or init_from).")
    tokenizer_train_chars: int = Field(2_000_000, gt=0, description="Characters of the mixture "
                                       "(by weight) the BPE is trained on; more barely helps.")
    seq_len: int = Field(256, gt=1, description="Tokens per packed row (T of BxT).")
    total_tokens: int = Field(2_000_000, gt=0, description="Tokens drawn from the mixture "
                              "for training; the per-domain split follows the weights.")
    val_tokens_per_domain: int = Field(16_384, gt=0, description="Held-out tokens per domain.")
    shard_tokens: int = Field(4_194_304, gt=0, description="Tokens per training shard (.npy "
                              "of packed rows, memory-mapped by every rank); the build holds one "
                              "shard in memory at a time.")
    token_dtype: Literal["auto", "uint16", "uint32"] = Field(
        "auto", description="Stored token ids: auto takes uint16 when the vocabulary fits.")
    workers: int = Field(0, ge=0, description="Tokenizer processes (datatrove tasks at a time); "
                         "0: one per CPU core. The dataset is the same for any count.")
    executor: Literal["local", "ray"] = Field(
        "local", description="datatrove executor for tokenization: local processes, or a Ray "
        "cluster (RAY_ADDRESS; the work directory must be on a filesystem every node mounts).")


class PretrainConfig(StageConfig):
    stage: Literal["pretrain"] = "pretrain"
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: PretrainDataConfig

    @model_validator(mode="after")
    def _settings_that_apply(self):
        # Continued pretraining takes shape and tokenizer from the model: the preset and BPE
        # size are cleared, so neither the input key nor the lineage shows settings never used.
        if self.model.init_from:
            if self.model.max_position_embeddings is not None:
                raise ValueError("model.max_position_embeddings cannot change a pretrained "
                                 "model's positions (model.init_from is set)")
            if self.data.tokenizer and self.data.tokenizer != self.model.init_from:
                raise ValueError(f"data.tokenizer={self.data.tokenizer} with model.init_from="
                                 f"{self.model.init_from}: the model reads its own tokenizer's "
                                 f"ids; leave data.tokenizer empty")
            self.model.preset = None
        if self.model.init_from or self.data.tokenizer:
            self.data.vocab_size = None
        elif self.model.preset is None:
            raise ValueError("model.preset is empty and no model.init_from is given")
        elif self.data.vocab_size is None:
            raise ValueError("data.vocab_size is empty and no data.tokenizer is given")
        return self


# --- sft ----------------------------------------------------------------------------------

class LoraConfig(Strict):
    enabled: bool = False
    r: int = Field(16, gt=0, description="Adapter rank.")
    alpha: int = Field(32, gt=0, description="Scale alpha/r; 2x rank is the common default.")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj",
                                                               "o_proj"])


class SFTDataConfig(Strict):
    dataset: str = Field(description="SFT dataset YAML (datasets_cfg/*.yaml).")
    max_length: int = Field(512, gt=1, description="Tokens per example; longer ones are counted "
                            "and dropped (truncation would cut the EOS an SFT model must learn).")
    packing: bool = Field(False, description="Pack examples into full rows (faster, no padding).")
    completion_only: bool = Field(True, description="Loss on answer tokens only.")
    eval_examples: int = Field(200, gt=0, description="Held-out task prompts answered by "
                               "generation for gold accuracy (parent and result).")
    eval_max_new_tokens: int = Field(16, gt=0, description="Generation budget per answer.")


class SFTConfig(StageConfig):
    stage: Literal["sft"] = "sft"
    parent: str = Field(description="Causal-LM artifact ref (name@version or digest).")
    data: SFTDataConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    optim_8bit: bool = Field(False, description="bitsandbytes 8-bit AdamW (GPU only).")
    weights_8bit: bool = Field(False, description="Base weights frozen in bitsandbytes 8-bit "
                               "(LLM.int8), LoRA adapters trained on top: a quarter of the fp32 "
                               "weight memory (GPU only; needs lora.enabled).")

    @model_validator(mode="after")
    def _8bit_weights_need_lora(self):
        if self.weights_8bit and not self.lora.enabled:
            raise ValueError("weights_8bit=true freezes the base weights in 8 bits: only LoRA "
                             "adapters can train on them; set lora.enabled=true")
        return self


# --- rm -----------------------------------------------------------------------------------

class RMDataConfig(Strict):
    dataset: str = Field(description="Preference dataset YAML (prompt, chosen, rejected).")
    max_length: int = Field(512, gt=1)
    eval_examples: int = Field(200, gt=0)
    policy_samples: int = Field(0, ge=0, description="Answers sampled from the parent SFT model "
                                "per task prompt (pairs with a known answer); those the checker "
                                "rejects become extra rejected answers. The RM then learns the "
                                "mistakes PPO will explore, as RLHF labels policy samples.")
    policy_temperature: float = Field(1.0, gt=0, description="Sampling temperature of those "
                                      "answers: PPO's rollout temperature.")
    policy_max_new_tokens: int = Field(16, gt=0)


class RMConfig(StageConfig):
    stage: Literal["rm"] = "rm"
    parent: str = Field(description="SFT artifact ref the reward model starts from.")
    data: RMDataConfig
    target_accuracy: float = Field(0.85, gt=0, le=1, description="Held-out pairwise accuracy "
                                   "the headline calls good enough to train PPO against; below "
                                   "it PPO mostly finds the RM's blind spots.")
    center_rewards_coefficient: float = Field(0.01, ge=0, description="Pulls mean reward to 0 so "
                                              "PPO sees rewards on a stable scale.")


# --- ppo ----------------------------------------------------------------------------------

class RolloutConfig(Strict):
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0, description="1.0 samples the policy PPO optimizes.")
    top_k: int = Field(0, ge=0, description="Must stay 0 (see _on_policy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Must stay 1.0 (see _on_policy).")
    missing_eos_penalty: float = Field(1.0, ge=0, description="Subtracted from the score of a "
                                       "response that never ends, so PPO learns to stop.")
    min_new_tokens: int = Field(0, ge=0, description="No EOS is sampled before a response has "
                                "this many tokens (HF's min_new_tokens, vLLM's min_tokens). For "
                                "throughput measurements with rollouts of a fixed length "
                                "(= max_new_tokens, as the peers are run): the log-probs PPO "
                                "trains on are the full distribution's, so a positive value "
                                "samples slightly off-policy.")
    engine: Literal["hf", "vllm"] = Field(
        "hf", description="What samples the rollouts. hf: the actor's own generate(). vllm: a "
        "vLLM engine on the same GPU (colocated), given the actor's weights after every update, "
        "as TRL and OpenRLHF do; the actor still scores every sampled token, so the PPO ratio "
        "stays exact (CUDA and the vllm package needed).")
    vllm_gpu_memory: float = Field(0.3, gt=0, lt=1, description="vllm: share of GPU memory the "
                                   "vLLM engine may take (weights and KV cache); the training "
                                   "engines share the rest.")


    @model_validator(mode="after")
    def _on_policy(self):
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(f"min_new_tokens={self.min_new_tokens} is more than "
                             f"max_new_tokens={self.max_new_tokens}")
        if self.top_k or self.top_p < 1:
            raise ValueError(
                f"top_k={self.top_k}, top_p={self.top_p}: PPO scores each sampled token under "
                f"the full distribution at the temperature, so truncated sampling would train "
                f"off-policy; keep top_k=0 and top_p=1.0 (truncate when sampling for people: "
                f"alignflow sample --top-k/--top-p)")
        return self


class KLConfig(Strict):
    coef: float = Field(0.05, ge=0, description="Initial beta of the per-token KL penalty.")
    estimator: Literal["k1", "k3"] = Field("k1", description="k1 is unbiased per token; k3 is "
                                           "non-negative with lower variance.")
    adaptive: bool = Field(False, description="Ziegler et al. controller towards target.")
    target: float = Field(6.0, gt=0, description="KL (nats/sequence) the controller aims for.")
    horizon: int = Field(10000, gt=0)
    placement: Literal["reward", "loss"] = Field(
        "reward", description="reward: -beta x KL on every response token of the reward, as "
        "PPO for RLHF does (Ziegler et al.); with grpo/rloo the summed KL lowers the sequence's "
        "score before the group baseline. loss: beta x k3 KL to the reference added to the "
        "policy loss, as GRPO does; the reward is then the score alone.")


class PPOAlgoConfig(Strict):
    epochs: int = Field(4, gt=0, description="PPO passes over each batch of rollouts.")
    minibatch_size: int = Field(4, gt=0)
    clip_range: float = Field(0.2, gt=0)
    value_clip_range: float = Field(0.2, gt=0)
    gamma: float = Field(1.0, ge=0, le=1, description="No discount: the reward arrives at the end.")
    lam: float = Field(0.95, ge=0, le=1)
    whiten_advantages: bool = Field(True, description="gae only: advantages normalized over "
                                    "the whole batch (all ranks).")
    advantage: Literal["gae", "grpo", "rloo"] = Field(
        "gae", description="gae: a critic (from the RM) and generalized advantage estimation; "
        "four engines. grpo: group_size samples per prompt, each scored against the group's "
        "mean (and std, scale_rewards); rloo: against the mean of the other samples. grpo and "
        "rloo build no critic: a third less memory and compute, and nothing to warm up; they "
        "suit verifiable rewards and a reward model alike.")
    group_size: int = Field(4, ge=1, description="grpo/rloo: responses sampled per prompt; "
                            "the rollouts per rank must be a multiple.")
    scale_rewards: bool = Field(True, description="grpo: divide by the group's std (DeepSeekMath). "
                                "false is Dr. GRPO's choice: no weight on near-unanimous groups.")
    loss_agg: Literal["token", "sequence", "constant"] = Field(
        "token", description="How the policy loss averages: token (over every real token of "
        "the batch), sequence (per response, then over responses; GRPO's paper), constant (each "
        "response's sum over rollout.max_new_tokens; Dr. GRPO's length-unbiased loss).")
    reward_clip: float = Field(5.0, gt=0, description="Clip normalized RM scores.")
    reward_source: Literal["rm", "checker"] = Field(
        "rm", description="What PPO maximizes. rm: the reward model's normalized score (RLHF). "
        "checker: +1 for an answer the task's checker accepts, -1 otherwise (verifiable "
        "rewards; every prompt needs an answer). The RM scores every response either way, so "
        "a checker run is also the control that tells a PPO problem from an RM one.")

    forward_overhead_tokens: int | None = Field(
        None, ge=0, description="Rollout scoring and training forwards run over rows sorted by "
        "length, each forward padded only to its own longest prompt and response. None: the "
        "fewest forwards (rows / micro-batch). A number: more forwards where the padding they "
        "save outweighs this cost of a forward, in tokens (SmolLM2-135M on 2 CPU cores: a "
        "forward's fixed cost is ~50 tokens' worth); for responses whose lengths differ by "
        "hundreds of tokens. Ignored under ZeRO-3 on several ranks.")
    vf_coef: float | None = Field(None, description="Refused when set: the critic is its own "
                                  "engine with its own Adam, which a loss scale does not change.")

    @model_validator(mode="after")
    def _no_vf_coef(self):
        if self.advantage == "rloo" and self.group_size < 2:
            raise ValueError("advantage=rloo needs group_size >= 2 (a leave-one-out baseline)")
        if self.vf_coef is not None:
            raise ValueError("vf_coef has no effect here: the critic is its own engine with its "
                             "own Adam, which a constant loss scale does not change; tune "
                             "critic_lr instead")
        return self


class PPODataConfig(Strict):
    prompts: str = Field(description="Prompt dataset YAML.")
    max_prompt_length: int = Field(128, gt=0)
    eval_prompts: int = Field(128, gt=0)
    eval_split: Literal["all", "validation", "test"] = Field(
        "all", description="Which half of the held-out prompts to evaluate on (by a hash of "
        "the prompt, tasks.heldout_split): choose settings on validation, report test once.")
    eval_samples: int = Field(
        4, ge=0, description="Sampled responses per held-out prompt at the rollout temperature, "
        "besides the greedy one: PPO optimizes the sampled policy, a greedy user sees its mode; "
        "the two can move apart, so both are reported.")


class PPOConfig(StageConfig):
    stage: Literal["ppo"] = "ppo"
    actor: str = Field(description="SFT artifact ref: actor and frozen reference.")
    reward: str = Field(description="RM artifact ref: frozen reward model and critic init.")
    data: PPODataConfig
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    kl: KLConfig = Field(default_factory=KLConfig)
    ppo: PPOAlgoConfig = Field(default_factory=PPOAlgoConfig)
    critic_lr: float = Field(5e-6, gt=0)
    frozen_offload: bool = Field(False, description="Offload reference and reward engines to CPU.")


SCHEMAS: dict[str, type[StageConfig]] = {"pretrain": PretrainConfig, "sft": SFTConfig,
                                     "rm": RMConfig, "ppo": PPOConfig}


def load_stage_config(stage: str, path, overrides: list[str] = ()) -> StageConfig:
    """A stage's config and the data YAML it names (mixture or example set), both validated:
    what the launcher checks before any rank starts, and what the stage reads again."""
    from stages.configfile import load_config
    from stages.datacfg import ExampleSetConfig, MixtureConfig
    cfg = load_config(SCHEMAS[stage], path, list(overrides))
    if stage == "pretrain":
        load_config(MixtureConfig, cfg.data.mixture, what="mixture file")
    else:
        data = cfg.data.prompts if stage == "ppo" else cfg.data.dataset
        load_config(ExampleSetConfig, data, what="dataset config")
    return cfg
