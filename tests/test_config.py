from pathlib import Path

import pytest
import yaml

from stages.config import SCHEMAS, PretrainConfig
from stages.configfile import ConfigError, load_config, parse_stage_args, resolved
from tests.conftest import REPO

TINY = REPO / "configs" / "tiny" / "pretrain.yaml"


def write(tmp_path, data, name="cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def base() -> dict:
    return yaml.safe_load(TINY.read_text())


def test_every_shipped_config_validates_and_names_its_command():
    configs = sorted((REPO / "configs").rglob("*.yaml"))
    assert configs
    for path in configs:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and "stages." in first, f"{path}: no launch command on top"
        stage = yaml.safe_load(path.read_text()).get("stage") or path.stem
        cfg = load_config(SCHEMAS[stage], path)
        assert cfg.stage == stage
        assert f"--module stages.{stage}" in first


def test_overrides_are_typed_and_nested():
    cfg = load_config(PretrainConfig, TINY, ["optim.lr=3e-4", "train.max_steps=20",
                                             "deepspeed.num_gpus=1", "run.name=x"])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.train.max_steps == 20 and cfg.deepspeed.num_gpus == 1 and cfg.run.name == "x"
    assert resolved(cfg)["optim"]["lr"] == 3e-4


def test_unknown_key_in_file_is_rejected_with_suggestion(tmp_path):
    data = base()
    data["optim"]["lrr"] = 0.1
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, path)
    msg = str(e.value)
    assert str(path) in msg and "optim.lrr" in msg and "did you mean 'lr'" in msg


def test_unknown_override_is_rejected_before_validation():
    with pytest.raises(ConfigError, match=r"unknown field 'train.max_step'.*did you mean 'max_steps'"):
        load_config(PretrainConfig, TINY, ["train.max_step=5"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(PretrainConfig, TINY, ["train.max_steps"])
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(PretrainConfig, TINY, ["optim.lr.x=1"])


@pytest.mark.parametrize("override, field, allowed", [
    ("optim.lr=-1", "optim.lr", "greater than 0"),
    ("model.preset=huge", "model.preset", "'tiny', 'demo', '125m'"),
    ("train.max_steps=many", "train.max_steps", "valid integer"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio", "less than or equal to 1"),
])
def test_bad_value_names_file_field_value_and_allowed(override, field, allowed):
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, TINY, [override])
    msg = str(e.value)
    value = override.split("=", 1)[1]
    assert str(TINY) in msg and field in msg and value in msg and allowed in msg
    assert "(set on the command line)" in msg


def test_missing_required_field(tmp_path):
    data = base()
    del data["data"]["mixture"]
    with pytest.raises(ConfigError, match=r"data.mixture: required field is missing"):
        load_config(PretrainConfig, write(tmp_path, data))


def test_cross_field_rules():
    with pytest.raises(ConfigError, match="does not divide over 2 rank"):
        load_config(PretrainConfig, TINY, ["train.global_batch_size=12"])
    with pytest.raises(ConfigError, match="warmup_steps=6 must be below"):
        load_config(PretrainConfig, TINY, ["optim.warmup_steps=6"])
    with pytest.raises(ConfigError, match="template infra/deepspeed/zero9.json not found"):
        load_config(PretrainConfig, TINY, ["deepspeed.template=infra/deepspeed/zero9.json"])
    with pytest.raises(ConfigError, match="needs a hostfile"):
        load_config(PretrainConfig, TINY, ["deepspeed.num_nodes=2"])
    # the message, not the whole config the rule read
    with pytest.raises(ConfigError) as e:
        load_config(PretrainConfig, TINY, ["train.global_batch_size=12"])
    assert "'run':" not in str(e.value) and len(str(e.value).splitlines()) == 2


def test_offload_param_needs_zero3(tmp_path):
    tpl = tmp_path / "bad.json"
    tpl.write_text('{"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}')
    with pytest.raises(ConfigError, match="offload_param needs ZeRO stage 3"):
        load_config(PretrainConfig, TINY, [f"deepspeed.template={tpl}"])


def test_file_problems(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(PretrainConfig, tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(PretrainConfig, bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(PretrainConfig, bad)


def test_stage_args_ignore_the_launchers_local_rank():
    cfg, path, overrides = parse_stage_args(PretrainConfig, ["--local_rank=1", "--config",
                                                             str(TINY), "optim.lr=0.01"])
    assert cfg.optim.lr == 0.01 and path == TINY and overrides == ["optim.lr=0.01"]
    with pytest.raises(ConfigError, match="usage"):
        parse_stage_args(PretrainConfig, [str(TINY)])


def test_string_fields_keep_overrides_that_look_like_numbers():
    from stages.config import SFTConfig
    cfg = load_config(SFTConfig, REPO / "configs" / "tiny" / "sft.yaml",
                      ["parent=" + "0" * 64, "run.name=123", "optim.lr=1e-3"])
    assert cfg.parent == "0" * 64 and cfg.run.name == "123" and cfg.optim.lr == 1e-3


@pytest.mark.parametrize("override, message", [
    ("ppo.vf_coef=0.5", "vf_coef has no effect here: the critic is its own engine"),
    ("rollout.top_k=20", "truncated sampling would train off-policy"),
    ("rollout.top_p=0.9", "truncated sampling would train off-policy"),
    ("optim.warmup_steps=3", "optim.warmup_steps=3 must be below train.max_steps=3"),
])
def test_ppo_settings_that_would_do_nothing_or_train_off_policy_are_refused(override, message):
    from stages.config import PPOConfig
    with pytest.raises(ConfigError, match=message):
        load_config(PPOConfig, REPO / "configs" / "tiny" / "ppo.yaml", [override])


def test_bf16_on_a_cpu_runs_where_the_cpu_multiplies_bf16_and_is_refused_elsewhere(monkeypatch):
    import torch
    from stages import engine
    from stages.config import DeepSpeedConfig
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(engine, "cpu_bf16", lambda: True)
    assert engine.precision(DeepSpeedConfig(precision="bf16")) == "bf16"
    assert engine.precision(DeepSpeedConfig(precision="auto")) == "fp32"  # the reference numbers
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        engine.precision(DeepSpeedConfig(precision="fp16"))
    monkeypatch.setattr(engine, "cpu_bf16", lambda: False)
    with pytest.raises(ConfigError, match="bf16 needs a CUDA GPU or a CPU with AVX512-BF16"):
        engine.precision(DeepSpeedConfig(precision="bf16"))
