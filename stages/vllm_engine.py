"""A colocated vLLM engine that samples PPO's rollouts: `rollout.engine=vllm` (CUDA only).

No library offers this for our own PPO loop (TRL keeps its vLLM helper inside its trainers), so
it is written here, the way TRL's colocate mode and OpenRLHF run it: one engine per rank on that
rank's GPU, inside the training process (vLLM's external_launcher backend reuses the ranks the
deepspeed launcher started), its weights overwritten with the actor's after every update. Only
the sampled token ids are taken from it; the actor scores them again, so the PPO ratio is
computed under the trained model's own numerics, not vLLM's kernels.
"""

from __future__ import annotations

import os

import torch


class VLLMSampler:
    def __init__(self, path, dtype: torch.dtype, gpu_memory: float, max_len: int, seed: int):
        # In-process engine (no V1 worker process): its weights live in this process, where
        # load_weights can overwrite them without a copy through shared memory.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM
        self.llm = LLM(model=str(path), dtype=dtype, gpu_memory_utilization=gpu_memory,
                       max_model_len=max_len, tensor_parallel_size=1, seed=seed,
                       distributed_executor_backend="external_launcher")

    def generate(self, enc, max_new_tokens: int, temperature: float | None, tok,
                 min_new_tokens: int = 0) -> torch.Tensor:
        """Responses to the left-padded prompts in `enc`, as a [B, R] tensor padded with
        tok.pad_token_id after the EOS (what HF generate returns past the prompt).
        temperature None: greedy. min_new_tokens: no EOS before that many tokens."""
        from vllm import SamplingParams
        # top_p=1 and no top_k: PPO scores tokens under the full distribution (config._on_policy).
        params = SamplingParams(temperature=temperature or 0.0, top_p=1.0,
                                max_tokens=max_new_tokens, min_tokens=min_new_tokens,
                                stop_token_ids=[tok.eos_token_id])
        prompts = [{"prompt_token_ids": ids[m.bool()].tolist()}
                   for ids, m in zip(enc["input_ids"].cpu(), enc["attention_mask"].cpu())]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        seqs = [list(o.outputs[0].token_ids) for o in outs]
        width = max(1, max(len(s) for s in seqs))
        resp = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            resp[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        return resp.to(enc["input_ids"].device)

    @torch.no_grad()
    def load(self, module: torch.nn.Module) -> None:
        """The actor's current weights into the engine (HF parameter names, which vLLM's
        loaders map onto its fused layers), and its prefix cache dropped: cached KV was
        computed by the old weights."""
        model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        model.load_weights((name, p.data) for name, p in module.named_parameters())
        self.llm.reset_prefix_cache()
