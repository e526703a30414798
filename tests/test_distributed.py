"""Multi-process training on CPU, as far as a machine without GPUs allows (see docs/distributed.md).

`accelerate launch --multi_gpu --num_processes 2` goes through torch.distributed.run (no MPI): on a machine
without an accelerator `segmask train` then runs one gloo DDP job. `--cpu` (or a MULTI_CPU config file)
would take accelerate's simple launcher instead, which starts one process, or mpirun with a hostfile."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT, write_recipe

RECORDS = [
    {"instruction": f"What did {name} see?", "input": "", "output": f"{name} saw a {thing}."}
    for name, thing in zip(("Lily", "Tom", "Sue", "Ben", "Max", "Amy"), ("cat", "dog", "ball", "tree", "car", "kite"))
]  # fmt: skip
BIN = Path(sys.executable).parent


@pytest.fixture
def recipe(stories_path, tmp_path) -> Path:
    """6 records, 3 per process: one optimiser step is the whole set on 2 processes (global batch 6)."""
    return write_recipe(
        tmp_path,
        stories_path,
        RECORDS,
        "policy: mas\nbatch_size: 3\ngradient_accumulation_steps: 1\nlearning_rate: 1e-2\nwarmup_steps: 0\n"
        "lora_r: 0\ncutoff_len: 128\nlogging_steps: 1\nsave_steps: 1\nprecision: fp32\nmax_steps: 3\n",
    )


def launch(tmp_path: Path, *argv: str, port: int) -> subprocess.CompletedProcess:
    """`accelerate launch` 2 processes on this machine, with no user accelerate config in the way."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    command = [
        str(BIN / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
    ]
    command += ["--main_process_port", str(port), "-m", "segmask", "train", *argv]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def logged(output: Path) -> list[dict]:
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "loss" in row]


@pytest.mark.slow
def test_accelerate_launch_two_processes_train_as_one_job_and_resume(recipe, tmp_path):
    from segmask.train_config import TrainConfig
    from segmask.training import train

    output = tmp_path / "ddp"
    done = launch(tmp_path, str(recipe), "--output", str(output), port=29541)
    assert done.stdout.count("trained (mas)") == 1  # rank 0 alone reports and writes
    ddp = logged(output)
    assert [row["step"] for row in ddp] == [1, 2, 3]  # one writer: each step once
    assert [row["epoch"] for row in ddp] == [1.0, 2.0, 3.0]  # each step saw all 6 records

    # one process, batch 6: the same global batch, so the same losses (gradients averaged over processes)
    alone = train(TrainConfig.from_yaml(recipe, batch_size=6, output=str(tmp_path / "one")))
    one = logged(alone)
    assert ddp[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-5)
    assert [row["loss"] for row in ddp] == pytest.approx([row["loss"] for row in one], rel=1e-4)
    assert ddp[-1]["loss"] < ddp[0]["loss"]

    # killed after checkpoint-2 (segmask.json, written last, and checkpoint-3 missing): --resume redoes step 3
    shutil.rmtree(output / "checkpoint-3")
    (output / "segmask.json").unlink()
    done = launch(tmp_path, str(recipe), "--output", str(output), "--resume", port=29542)
    assert done.stdout.count("trained (mas)") == 1
    resumed = logged(output)
    assert [row["step"] for row in resumed] == [1, 2, 3]
    assert resumed[:2] == ddp[:2]  # the first two rows are kept as written
    assert resumed[2]["loss"] == pytest.approx(ddp[2]["loss"], rel=1e-5)
    assert (output / "segmask.json").exists() and (output / "checkpoint-3").is_dir()


FSDP_SCRIPT = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from transformers import AutoModelForCausalLM
    import segmask

    path, layer_class, reshard = sys.argv[1], sys.argv[2], sys.argv[3] == "True"
    dist.init_process_group("gloo")
    reference = segmask.enable(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    model = segmask.enable(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    wrapped = [m for m in model.modules() if type(m).__name__ == layer_class]
    for module in wrapped:
        fully_shard(module, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100, 110]])
    segments = torch.tensor([[0, 0, 0, 1, 1, -1, -1, -1]])
    out = model(input_ids=ids, segment_ids=segments, labels=ids)
    out.loss.backward()
    change = (out.logits - reference(input_ids=ids, segment_ids=segments).logits).abs().max().item()
    local = sum(p.to_local().numel() for p in model.parameters())
    total = sum(p.numel() for p in reference.parameters())
    grads = all(p.grad is not None for p in model.parameters() if p.requires_grad)
    if dist.get_rank() == 0:
        print(f"wrapped={len(wrapped)} fsdp={isinstance(model, FSDPModule)} change={change} "
              f"local={local} total={total} grads={grads}")
    dist.destroy_process_group()
    """
)


@pytest.mark.slow
def test_fsdp_config_shards_an_enabled_model_on_cpu(stories_path, tmp_path):
    """configs/accelerate_fsdp.yaml parses as accelerate's FSDP2 config; its wrap settings shard a MAS-enabled
    stories260K over 2 gloo processes, with the logits of the unsharded model.

    accelerate itself does not apply FSDP on CPU (AcceleratorState turns FSDP on only for GPU-like
    distributed types; with --cpu it stays MULTI_CPU), so the wrap here is torch's fully_shard, the FSDP2
    call accelerate makes per layer."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(ROOT / "configs" / "accelerate_fsdp.yaml"))
    assert config.distributed_type == DistributedType.FSDP and not config.use_cpu
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert config.parallelism_config == {}  # no context / sequence parallelism (refused by segmask)

    script = tmp_path / "fsdp_build.py"
    script.write_text(FSDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", str(script), str(stories_path)]
    command += [fsdp["fsdp_transformer_layer_cls_to_wrap"], str(fsdp["fsdp_reshard_after_forward"])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    report = dict(item.split("=") for item in done.stdout.split())
    assert report["wrapped"] == "5" and report["fsdp"] == "True" and report["grads"] == "True"
    assert float(report["change"]) < 1e-5
    assert int(report["local"]) < int(report["total"])  # each process holds only its shard
