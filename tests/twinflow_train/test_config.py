import pytest
import yaml

from twinflow_train.config import Config, ConfigError, config_hash, load_config, to_yaml


def test_defaults_load_and_round_trip(tmp_path):
    cfg = load_config(None)
    p = tmp_path / "c.yaml"
    p.write_text(to_yaml(cfg))
    again = load_config(p)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)


def test_dotted_overrides_parse_yaml_values():
    cfg = load_config(None, ["method.estimate_order=3", "renoise.applies_to=[rect, main]",
                             "teacher.cfg_scale=2", "rl.hpsv2_checkpoint=null"])
    assert cfg.method.estimate_order == 3
    assert cfg.renoise.applies_to == ["rect", "main"]
    assert cfg.teacher.cfg_scale == 2.0 and isinstance(cfg.teacher.cfg_scale, float)
    assert cfg.teacher_cfg_scale == 2.0
    assert load_config(None).teacher_cfg_scale == 1.0 / (1.0 - load_config(None).method.enhanced_ratio)  # EMA target


@pytest.mark.parametrize("override, needle", [
    (["method.estimat=3"], "method: unknown key 'estimat'; valid keys: layout"),
    (["methd.loss=l2"], "unknown key 'methd'"),
    (["renoise.main.kind=gamma"], "renoise.main.kind: unknown value 'gamma'"),
    (["method.estimate_order=1.5"], "method.estimate_order: expected an integer"),
    (["optim.lr=fast"], "optim.lr: expected a number"),
    (["rl.enabled=1"], "rl.enabled: expected true/false"),
    (["method.estimate_order=0"], "method.estimate_order must be >= 1"),
    (["optim.max_grad_norm=0"], "optim.max_grad_norm must be > 0"),
    (["rl.enabled=true"], "rl.reward must be set"),
    (["data.batch_size=3"], "data.batch_size per micro-batch (3"),
    (["renoise.start=-1"], "renoise.start and end must be > 0"),
    (["method.group_ratios=[1,1,1]"], "method.group_ratios must have 4 entries"),
    (["run=3"], "run: expected a mapping"),
    (["bad"], "must look like section.key=value"),
])
def test_bad_values_name_the_field(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert needle in str(e.value)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"optim": {"lr": 1e-3, "betaz": [0.9, 0.99]}}))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "optim: unknown key 'betaz'" in str(e.value)


def test_yaml_syntax_error_and_missing_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("run: {steps: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML syntax error"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_tutorial_layout_ignores_group_count_minimum():
    cfg = load_config(None, ["method.layout=tutorial", "data.batch_size=2"])
    assert cfg.data.batch_size == 2


def test_hash_changes_with_any_field():
    a = load_config(None)
    b = load_config(None, ["sampler.stochastic_ratio=0.5"])
    assert config_hash(a) != config_hash(b)
    assert isinstance(Config(), Config)
