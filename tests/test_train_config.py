"""`segmask.train_config`: TrainConfig coerces YAML and CLI strings, refuses bad values on construction, reads
YAML with overrides, and the shipped recipes are valid."""

from __future__ import annotations

import pytest
from conftest import ROOT

import segmask
from segmask import training
from segmask.train_config import TrainConfig


def test_config_coerces_yaml_and_cli_strings():
    config = TrainConfig(
        model="m", data="a.json", learning_rate="2e-4", epochs="1", lora_r="0", resume="true"
    )
    assert config.data == ("a.json",) and config.learning_rate == 2e-4 and config.epochs == 1.0
    assert config.lora_r == 0 and config.resume is True and config.max_steps is None
    assert TrainConfig(model="m", data=["a", "b"], max_steps="none").data == ("a", "b")
    defaults = TrainConfig(model="m", data="a.json")
    assert (defaults.lora_r, defaults.lora_alpha, defaults.lora_dropout) == (32, 64, 0.05)
    assert defaults.lora_target_modules == ("q_proj", "v_proj")
    assert (defaults.learning_rate, defaults.cutoff_len, defaults.epochs) == (2e-4, 256, 3.0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"learning_rate": 0}, "learning_rate must be positive, got 0"),
        ({"learning_rate": -1e-4}, "learning_rate must be positive"),
        ({"learning_rate": "fast"}, "learning_rate must be float, got 'fast'"),
        ({"policy": "bidirectional"}, "unknown mask policy 'bidirectional'"),
        (
            {"attn_implementation": "flash_attention_2"},
            "flash_attention_2' cannot run mask 'mas'.*drops custom masks",
        ),
        (
            {"policy": "causal", "packing": True, "attn_implementation": "flash_attention_2"},
            "cannot run mask 'causal' with packing",
        ),
        (
            {"train_on_inputs": True},
            "train_on_inputs would put the loss on bidirectional prompt tokens under mask 'mas'",
        ),
        ({"lora_r": 0, "merge": True}, "merge needs a LoRA adapter"),
        ({"batch_size": 0}, "batch_size must be positive"),
        ({"max_steps": 1.5}, "max_steps must be int"),
        ({"overflow": "cut"}, "overflow must be one of error, truncate, skip"),
        ({"precision": "int8"}, "precision must be one of"),
        ({"lr_scheduler": "zigzag"}, "unknown lr_scheduler 'zigzag'"),
        ({"model": ""}, "model is required"),
        ({"data": []}, "data is required"),
    ],
)
def test_bad_config_values_are_refused_on_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{"model": "m", "data": ("a.json",), **overrides})


def test_causal_policy_may_use_flash_attention():
    assert (
        TrainConfig(model="m", data="a", policy="causal", attn_implementation="flash_attention_2").policy
        == "causal"
    )


def test_yaml_unknown_key_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: m\ndata: [a.json]\nlearning_rate: 2e-4\nlora_r: 16\n"
    )  # 2e-4 is a string in YAML 1.1
    config = TrainConfig.from_yaml(path, lora_r=0)
    assert config.learning_rate == 2e-4 and config.lora_r == 0
    path.write_text("model: m\ndata: [a.json]\nlearning_rte: 1e-4\n")
    with pytest.raises(ValueError, match="unknown config key 'learning_rte'; did you mean 'learning_rate'"):
        TrainConfig.from_yaml(path)
    path.write_text("- model\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        TrainConfig.from_yaml(path)
    with pytest.raises(ValueError, match="config file not found"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: m\ndata: [a.json\nmask: mas\n",
         "3:5: not valid YAML: expected ',' or ']', but got ':' (while parsing a flow sequence at line 2, column 7)"),
        ("model: m\n  data: a.json\n", "2:7: not valid YAML: mapping values are not allowed here"),
        ('model: "m\n', "2:1: not valid YAML: found unexpected end of stream (while scanning a quoted scalar at "
                        "line 1, column 8)"),
    ],
)  # fmt: skip
def test_a_yaml_syntax_error_is_one_line_naming_file_line_and_column(tmp_path, text, message):
    """PyYAML's own text spans up to 8 lines (the offending line drawn under a caret)."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        TrainConfig.from_yaml(path)
    assert str(error.value) == f"{path}:{message}"


@pytest.mark.parametrize("name", ["paper_llama3.2-1b.yaml", "paper_qwen2.5-3b.yaml", "cpu_smollm2.yaml"])
def test_shipped_recipes_are_valid_configs(name):
    config = TrainConfig.from_yaml(ROOT / "configs" / name)
    assert (config.lora_r, config.lora_alpha, config.cutoff_len, config.learning_rate) == (32, 64, 256, 2e-4)
    assert config.lora_target_modules == ("q_proj", "v_proj") and config.policy == "mas"


def test_old_import_paths_name_the_same_class():
    assert segmask.TrainConfig is training.TrainConfig is TrainConfig


# the official recipe (issue 17): released adapter_config.json, utils_dora.py, ft_utils.py, DoRA finetune.py
PAPER_RECIPE = dict(
    template="paper", policy="mas", lora_r=32, lora_alpha=64, lora_dropout=0.05,
    lora_target_modules=("q_proj", "v_proj"), learning_rate=2e-4, epochs=3.0, seed=42, cutoff_len=256,
    warmup_steps=100, eval_size=120, eval_steps=80, save_steps=80, save_total_limit=3,
    load_best_model_at_end=True, group_by_length=False, lr_scheduler="linear", weight_decay=0.0,
    train_on_inputs=False,  # deliberate: answer-only loss (the official whole-prompt loss leaks under MAS)
)  # fmt: skip


@pytest.mark.parametrize(
    ("name", "precision"), [("paper_llama3.2-1b.yaml", "fp16"), ("paper_qwen2.5-3b.yaml", "bf16")]
)
def test_paper_configs_are_the_official_recipe(name, precision):
    config = TrainConfig.from_yaml(ROOT / "configs" / name)
    assert {key: getattr(config, key) for key in PAPER_RECIPE} == PAPER_RECIPE
    assert config.batch_size * config.gradient_accumulation_steps == 16 and config.precision == precision
    text = (ROOT / "configs" / name).read_text()
    assert "# Differences that remain, and why:" in text and "# - loss:" in text


def test_template_and_best_model_fields_are_checked():
    base = dict(model="m", data=("d.json",))
    assert TrainConfig(**base).template == "alpaca" and TrainConfig(**base).load_best_model_at_end is False
    with pytest.raises(ValueError, match=r"^unknown template 'official'; expected one of alpaca, paper$"):
        TrainConfig(**base, template="official")
    with pytest.raises(ValueError, match="load_best_model_at_end needs an eval split"):
        TrainConfig(**base, load_best_model_at_end="true")
