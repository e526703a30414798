"""`segmask.train_output`: a run folder's config as saved, under today's names whenever it was written."""

from __future__ import annotations

import json

from segmask.runs import RUN_FILE
from segmask.train_config import TrainConfig
from segmask.train_output import RUN_CONFIG_FILE, check_same_run, saved_config


def test_a_config_saved_before_the_renames_reads_under_todays_names_and_resumes(tmp_path):
    config = TrainConfig(model="m", data="d.json", output=str(tmp_path), policy="prefix", overflow="truncate")
    old = {RENAMED.get(k, k): v for k, v in config.to_dict().items()} | {"overflow": "truncate_prompt"}
    (tmp_path / RUN_CONFIG_FILE).write_text(json.dumps(old))
    saved = saved_config(tmp_path)
    assert saved == config.to_dict() and "mask" not in saved
    check_same_run(config, saved, tmp_path)  # the same run: it resumes


def test_the_config_inside_segmask_json_counts_and_other_files_do_not(tmp_path):
    config = TrainConfig(model="m", data="d.json", output=str(tmp_path))
    (tmp_path / RUN_FILE).write_text(json.dumps({"policy": "mas", "train_config": config.to_dict()}))
    assert saved_config(tmp_path) == config.to_dict()
    (tmp_path / RUN_CONFIG_FILE).write_text(json.dumps({"model": "m"}))  # not a run's config: skipped
    assert saved_config(tmp_path) == config.to_dict()
    (tmp_path / RUN_FILE).unlink()
    assert saved_config(tmp_path) is None


RENAMED = {"policy": "mask"}  # train_config.json before issue 32
