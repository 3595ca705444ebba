"""Typed flow parameters: the Prefect UI renders these as the Run form, descriptions included."""

from __future__ import annotations

from pydantic import BaseModel, Field


class StageParams(BaseModel):
    config: str = Field(description="Stage config YAML, relative to the alignflow checkout.")
    overrides: list[str] = Field(default_factory=list, description="key.sub=value overrides, "
                                 "e.g. optim.lr=1e-4 or train.max_steps=50.")
    force: bool = Field(False, description="Retrain even if an artifact with these exact "
                        "inputs exists.")


class PipelineParams(BaseModel):
    store: str | None = Field(None, description="Artifact store root (path or fsspec URL); "
                              "default $ALIGNFLOW_STORE or .alignflow/store.")
    corpus: str | None = Field("datasets_cfg/demo_corpus.yaml", description="Corpus recipe to "
                               "build first; empty when the mixture needs no corpus artifact.")
    pretrain: StageParams = Field(default_factory=lambda: StageParams(
        config="configs/demo/pretrain.yaml"))
    sft: StageParams | None = Field(default_factory=lambda: StageParams(
        config="configs/demo/sft.yaml"), description="Empty to stop after pretraining.")
    rm: StageParams | None = Field(default_factory=lambda: StageParams(
        config="configs/demo/rm.yaml"), description="Empty to stop after SFT.")
    ppo: StageParams | None = Field(default_factory=lambda: StageParams(
        config="configs/demo/ppo.yaml"), description="Empty to stop after the reward model.")


def _tiny() -> PipelineParams:
    return PipelineParams(corpus=None, **{s: StageParams(config=f"configs/tiny/{s}.yaml")
                                          for s in ("pretrain", "sft", "rm", "ppo")})


PRESETS = {"demo": PipelineParams(), "tiny": _tiny()}
