"""Context and sequence parallelism are refused (they would train MAS as causal); other modes pass.

Driven through the configuration objects and the environment `accelerate launch` sets: no GPU needed."""

from __future__ import annotations

import pytest
from accelerate.parallelism_config import ParallelismConfig

import segmask
from segmask.parallel import SequenceShardingError, check_sequence_sharding, sharding_modes


@pytest.fixture
def clean_env(monkeypatch):
    for name in (
        "PARALLELISM_CONFIG_CP_SIZE",
        "PARALLELISM_CONFIG_SP_SIZE",
        "ACCELERATE_USE_PARALLELISM_CONFIG",
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_plain_data_parallel_tensor_parallel_and_fsdp_pass(clean_env):
    assert sharding_modes(environ={}) == []
    check_sequence_sharding(ParallelismConfig(dp_shard_size=2, tp_size=2), environ={})
    check_sequence_sharding(ParallelismConfig(), environ={"PARALLELISM_CONFIG_CP_SIZE": "1"})


def test_context_parallel_config_is_refused_in_one_line(clean_env):
    config = ParallelismConfig(cp_size=2)  # accelerate's own object, as Trainer's accelerator holds it
    assert config.cp_enabled
    with pytest.raises(SequenceShardingError) as error:
        check_sequence_sharding(config, environ={})
    message = str(error.value)
    assert message.startswith("segmask cannot run under context parallelism (parallelism_config.cp_size=2)")
    assert "is_causal=True (accelerate #4177)" in message and "silently train as causal" in message
    assert "\n" not in message and isinstance(error.value, ValueError)


def test_ulysses_sequence_parallel_config_is_refused(clean_env):
    config = ParallelismConfig(sp_size=4)
    assert sharding_modes(config, environ={}) == [
        "Ulysses sequence parallelism (parallelism_config.sp_size=4)"
    ]
    with pytest.raises(ValueError, match=r"own causal mask \(accelerate #4209\)"):
        check_sequence_sharding(config, environ={})


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("PARALLELISM_CONFIG_CP_SIZE", "2", "context parallelism (PARALLELISM_CONFIG_CP_SIZE=2)"),
        ("PARALLELISM_CONFIG_SP_SIZE", "8", "Ulysses sequence parallelism (PARALLELISM_CONFIG_SP_SIZE=8)"),
    ],
)
def test_the_environment_accelerate_launch_sets_is_refused(clean_env, name, value, expected):
    """`accelerate launch --parallelism_config_cp_size 2 ...` exports these to every process."""
    assert sharding_modes(environ={name: value}) == [expected]
    with pytest.raises(SequenceShardingError, match=rf"^segmask cannot run under {expected.split(' (')[0]}"):
        check_sequence_sharding(environ={name: value})
    # a ParallelismConfig built in that process reads the same variable: reported once, not twice
    clean_env.setenv(name, value)
    assert sharding_modes(ParallelismConfig()) == [expected]


def test_enable_refuses_under_context_parallelism(clean_env, stories_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories_path)
    clean_env.setenv("PARALLELISM_CONFIG_CP_SIZE", "2")
    with pytest.raises(SequenceShardingError, match="context parallelism"):
        segmask.enable(model)
    assert not segmask.hook.is_enabled(model)  # refused before any hook was installed
    clean_env.delenv("PARALLELISM_CONFIG_CP_SIZE")
    assert segmask.hook.is_enabled(segmask.enable(model))


def test_enable_refuses_a_live_accelerator_state_with_sequence_parallelism(clean_env, stories_path):
    """A model enabled after `Accelerator(parallelism_config=...)` exists (e.g. inside a launched script)."""
    import sys
    import types

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories_path)
    fake_state = types.SimpleNamespace(
        AcceleratorState=types.SimpleNamespace(
            _shared_state={"parallelism_config": types.SimpleNamespace(sp_size=2)}
        )
    )
    clean_env.setitem(sys.modules, "accelerate.state", fake_state)
    with pytest.raises(SequenceShardingError, match=r"the accelerator state\.sp_size=2"):
        segmask.enable(model)


def test_segmask_train_refuses_context_parallelism_before_the_first_step(
    clean_env, stories_path, tmp_path, capsys
):
    """`accelerate launch --parallelism_config_cp_size 2 -m segmask train ...` exports this to every process."""
    import json

    from segmask.cli import main

    data = tmp_path / "train.json"
    data.write_text(json.dumps([{"instruction": "What did Tom see?", "input": "", "output": "A dog."}]))
    clean_env.setenv("PARALLELISM_CONFIG_CP_SIZE", "2")
    argv = ["train", "--model", str(stories_path), "--data", str(data), "--output", str(tmp_path / "run")]
    assert main([*argv, "--max-steps", "1", "--mask", "mas"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the weight-loading bar
    assert last.startswith("segmask train: error: segmask cannot run under context parallelism")
    assert "PARALLELISM_CONFIG_CP_SIZE=2" in last and not (tmp_path / "run" / "metrics.jsonl").exists()
