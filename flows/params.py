"""Typed flow parameters: the Prefect UI renders these as the Run form, descriptions included."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from stages.config import STAGES
from stages.configfile import REPO_ROOT, find_file

class StageParams(BaseModel):
    config: str = Field(description="Stage config YAML under configs/ of the alignflow "
                        "checkout, e.g. configs/demo/sft.yaml.")
    overrides: list[str] = Field(default_factory=list, description="key.sub=value overrides, "
                                 "e.g. optim.lr=1e-4 or train.max_steps=50.")
    force: bool = Field(False, description="Retrain even if an artifact with these exact "
                        "inputs exists.")
    retries: int = Field(0, ge=0, le=10, description="Relaunch a failed stage this many times; "
                         "a relaunch resumes from the stage's last checkpoint.")
    retry_delay_s: float = Field(30, ge=0, description="Seconds between relaunches.")

    @field_validator("config")
    @classmethod
    def _under_configs(cls, value: str) -> str:
        # The Run form is reachable from a browser: it may pick a shipped config, not any
        # file on the machine (the config names data files and what runs).
        allowed = {(REPO_ROOT / "configs").resolve(), (Path.cwd() / "configs").resolve()}
        path = find_file(value).resolve()     # the file the launch will read
        if not any(path.is_relative_to(c) for c in allowed) or \
                path.suffix not in (".yaml", ".yml"):
            raise ValueError(f"config {value!r}: must be a YAML file under "
                             f"{REPO_ROOT / 'configs'}")
        return value


class PipelineParams(BaseModel):
    store: str | None = Field(None, description="Artifact store root (path or fsspec URL); "
                              "default $ALIGNFLOW_STORE or .alignflow/store.")
    from_stage: Literal[STAGES] = Field(
        "pretrain", description="First stage to run. Earlier stages are not run: the first "
        "one run takes its parents from its own config (e.g. rm's `parent: demo-sft@latest`).")
    corpus: str | None = Field("datasets_cfg/demo_corpus.yaml", description="Corpus recipe to "
                               "build first (with from_stage pretrain); empty when the mixture "
                               "needs no corpus artifact.")
    pretrain: StageParams | None = Field(default_factory=lambda: StageParams(
        config="configs/demo/pretrain.yaml"), description="Empty to start from an existing "
        "pretrain artifact (with from_stage sft or later).")
    sft: StageParams | None = Field(default_factory=lambda: StageParams(
        config="configs/demo/sft.yaml"), description="Empty to stop after pretraining.")
    rm: StageParams | None = Field(default_factory=lambda: StageParams(
        config="configs/demo/rm.yaml"), description="Empty to stop after SFT.")
    ppo: StageParams | None = Field(default_factory=lambda: StageParams(
        config="configs/demo/ppo.yaml"), description="Empty to stop after the reward model.")

    def stages(self) -> list[str]:
        """The stages this run launches, in order."""
        start = STAGES.index(self.from_stage)
        out = []
        for stage in STAGES[start:]:
            if getattr(self, stage) is None:
                break
            out.append(stage)
        return out


def _tiny() -> PipelineParams:
    return PipelineParams(corpus=None, **{s: StageParams(config=f"configs/tiny/{s}.yaml")
                                          for s in STAGES})


PRESETS = {"demo": PipelineParams(), "tiny": _tiny()}
