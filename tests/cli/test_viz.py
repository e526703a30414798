"""``segmask viz``: a model folder and a messages file in, the mask and attention PNGs out (the drawing
itself: tests/test_viz.py)."""

from __future__ import annotations

import json

from conftest import STORYTELLER_CHAT

from segmask.cli import main


def test_viz_writes_the_mask_and_attention_pngs_and_names_them(chat_model, tmp_path, capsys):
    folder, _, _ = chat_model
    messages = tmp_path / "chat.json"
    messages.write_text(json.dumps({"messages": STORYTELLER_CHAT}))
    out = tmp_path / "viz"
    assert (
        main(["viz", "--model", str(folder), "--messages", str(messages), "--head", "0", "--out", str(out)])
        == 0
    )
    assert sorted(p.name for p in out.iterdir()) == ["attention_layer4_head0.png", "mask.png"]
    assert str(out / "mask.png") in capsys.readouterr().out
