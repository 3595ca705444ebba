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
    model: str | None = Field(None, description="A pretrained model to import first (an "
                              "import recipe such as datasets_cfg/smollm2_import.yaml, a .gguf, "
                              "an HF directory or org/model@rev); with from_stage sft it is "
                              "SFT's parent.")
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


def _smollm2() -> PipelineParams:
    """A real pretrained model (SmolLM2-135M-Instruct) through sft -> rm -> ppo on a CPU."""
    return PipelineParams(from_stage="sft", corpus=None, model="datasets_cfg/smollm2_import.yaml",
                          pretrain=None, **{s: StageParams(config=f"configs/smollm2/{s}.yaml")
                                            for s in STAGES[1:]})


PRESETS = {"demo": PipelineParams(), "tiny": _tiny(), "smollm2": _smollm2()}


# --- the typed Run form of each stage deployment -------------------------------------------

# The settings a person changes from the UI, per stage; the rest stays in the YAML (and the
# free-text overrides).
FORM_FIELDS = {
    "pretrain": ["data.mixture", "model.preset", "model.init_from", "data.total_tokens",
                 "train.max_steps", "train.global_batch_size", "train.micro_batch_size",
                 "optim.lr", "optim.warmup_steps", "run.seed"],
    "sft": ["parent", "data.dataset", "train.max_steps", "train.global_batch_size",
            "train.micro_batch_size", "optim.lr", "lora.enabled", "lora.r", "run.seed"],
    "rm": ["parent", "data.dataset", "train.max_steps", "train.global_batch_size",
           "train.micro_batch_size", "optim.lr", "target_accuracy", "run.seed"],
    "ppo": ["actor", "reward", "data.prompts", "ppo.advantage", "ppo.group_size",
            "kl.target", "kl.coef", "rollout.temperature", "rollout.max_new_tokens",
            "train.max_steps", "optim.lr", "run.seed"],
}


def _schema_field(schema, dotted: str):
    *path, last = dotted.split(".")
    for part in path:
        schema = schema.model_fields[part].annotation
    return schema.model_fields[last]


def settings_form(stage: str, config: str) -> type[BaseModel]:
    """A pydantic model of the stage's form fields: types, limits and descriptions from the
    stage's own schema, defaults from `config` (the YAML the deployment runs), so the Run form
    shows what will happen and refuses a bad value before anything starts."""
    from pydantic import create_model
    from pydantic.fields import FieldInfo

    from stages.config import SCHEMAS
    from stages.configfile import load_config, resolved
    schema = SCHEMAS[stage]
    values = resolved(load_config(schema, config))
    fields = {}
    for dotted in FORM_FIELDS[stage]:
        info = _schema_field(schema, dotted)
        default = values
        for part in dotted.split("."):
            default = default[part]
        field = FieldInfo.merge_field_infos(info, default=default, title=dotted,
                                            description=info.description or "")
        fields[dotted.replace(".", "__")] = (info.annotation, field)
    return create_model(f"{stage.capitalize()}Settings", __base__=BaseModel, **fields)


def form_overrides(settings: BaseModel | dict | None, defaults: BaseModel) -> list[str]:
    """`key=value` overrides for the form fields a person changed from the shown defaults."""
    if settings is None:
        return []
    given = settings if isinstance(settings, dict) else settings.model_dump()
    shown = defaults.model_dump()
    out = []
    for name, value in given.items():
        if name in shown and value != shown[name]:
            text = "null" if value is None else str(value).lower() if isinstance(value, bool) \
                else str(value)
            out.append(f"{name.replace('__', '.')}={text}")
    return out
