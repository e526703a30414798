"""`segmask chat`: driven through a pseudo-terminal end to end (streamed replies equal the library's, the
policy shows in the prompt line, /mask /system /reset /quit work), plus the command loop in-process."""

from __future__ import annotations

import io
import sys

import pytest
from conftest import PLAIN_ROLES

from segmask.chat import ChatSession
from segmask.cli import main
from segmask.cli.chat import loop
from segmask.loading import load_model


def test_chat_through_a_pseudo_terminal(stories_chat):
    pexpect = pytest.importorskip("pexpect")
    model, tokenizer, _ = load_model(stories_chat)
    expected = ChatSession(model, tokenizer, policy="mas", system="Tell stories.", max_new_tokens=8)
    first, second = expected.send("A cat?"), expected.send("And then?")

    argv = [
        "-m",
        "segmask",
        "chat",
        "--model",
        str(stories_chat),
        "--system",
        "Tell stories.",
        "--max-new-tokens",
        "8",
    ]
    child = pexpect.spawn(sys.executable, argv, encoding="utf-8", timeout=120, echo=False)
    try:
        child.expect_exact("[mas] you> ")
        for user, reply in (("A cat?", first), ("And then?", second)):
            child.sendline(user)
            child.expect_exact("assistant> ")
            child.expect_exact("\r\n[mas] you> ")
            assert child.before == reply.replace("\n", "\r\n")  # the terminal turns \n into \r\n
        child.sendline("/mask causal")
        child.expect_exact("(mask policy: causal)")
        child.expect_exact("[causal] you> ")
        child.sendline("/system Be brief.")
        child.expect_exact("(system message: 'Be brief.')")
        child.sendline("/reset")
        child.expect_exact("(conversation cleared)")
        child.expect_exact("[causal] you> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_loop_commands_and_turns_in_process(stories_chat):
    model, tokenizer, _ = load_model(stories_chat)
    session = ChatSession(model, tokenizer, policy="mas", max_new_tokens=5)
    reference = ChatSession(model, tokenizer, policy="prefix", system="Be kind.", max_new_tokens=5)
    stdin = io.StringIO("\n/mask prefix\n/mask nonsense\n/system Be kind.\nHello\n/system\n/reset\n")
    stdout = io.StringIO()
    assert loop(session, stdin, stdout) == 0  # end of input leaves
    out = stdout.getvalue()
    assert out.startswith("[mas] you> [mas] you> (mask policy: prefix; the whole prompt is one segment")
    assert "re-prefills the conversation)\n[prefix] you> " in out
    assert "commands: /system TEXT, /reset, /mask {causal,mas,prefix}, /quit" in out
    assert f"assistant> {reference.send('Hello')}\n" in out
    assert "(system message removed)" in out and "(conversation cleared)" in out
    assert session.policy == "prefix" and session.system is None and session.messages == []
    assert loop(session, io.StringIO("/quit\nHello\n"), io.StringIO()) == 0 and session.messages == []


def test_ctrl_c_drops_the_reply_or_leaves():
    class Interrupted:
        policy = "mas"

        def stream(self, text):
            yield "Once"
            raise KeyboardInterrupt

    class CtrlC(io.StringIO):
        def readline(self, *args):
            line = super().readline(*args)
            if not line:
                raise KeyboardInterrupt
            return line

    stdout = io.StringIO()
    assert loop(Interrupted(), CtrlC("Hello\n"), stdout) == 0
    assert stdout.getvalue() == "[mas] you> assistant> Once (interrupted; turn dropped)\n[mas] you> \n"


def test_chat_template_flag_lets_a_base_model_chat(stories_path, monkeypatch, capsys):
    """stories260K has no chat template: `segmask chat` refuses it, and chats with --chat-template FILE,
    replying as a ChatSession over the tokenizer with that template."""
    argv = ["chat", "--model", str(stories_path), "--system", "Tell stories.", "--max-new-tokens", "6"]
    assert main(argv) == 2
    assert "has no chat template; pass one with --chat-template FILE" in capsys.readouterr().err
    model, tokenizer, _ = load_model(stories_path)
    tokenizer.chat_template = PLAIN_ROLES.read_text()
    expected = ChatSession(model, tokenizer, policy="mas", system="Tell stories.", max_new_tokens=6)
    first, second = expected.send("A cat?"), expected.send("And then?")
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO("A cat?\nAnd then?\n/quit\n"))
    assert main([*argv, "--chat-template", str(PLAIN_ROLES)]) == 0
    out = capsys.readouterr().out
    assert f"[mas] you> assistant> {first}\n[mas] you> assistant> {second}\n[mas] you> " in out


def test_causal_sink_flag_chats_as_a_session_with_the_sink(stories_path, monkeypatch, capsys):
    model, tokenizer, _ = load_model(stories_path)
    tokenizer.chat_template = PLAIN_ROLES.read_text()
    expected = ChatSession(model, tokenizer, policy="mas", causal_sink=True, max_new_tokens=6).send("A cat?")
    argv = [
        "chat",
        "--model",
        str(stories_path),
        "--max-new-tokens",
        "6",
        "--chat-template",
        str(PLAIN_ROLES),
    ]
    monkeypatch.setattr(sys, "stdin", io.StringIO("A cat?\n/quit\n"))
    assert main([*argv, "--causal-sink"]) == 0
    assert f"[mas] you> assistant> {expected}\n" in capsys.readouterr().out


def test_a_paste_past_the_context_is_refused_and_the_chat_goes_on(stories_chat):
    model, tokenizer, _ = load_model(stories_chat)
    session = ChatSession(model, tokenizer, policy="mas", max_new_tokens=5)
    stdout = io.StringIO()
    assert loop(session, io.StringIO("Hello\n" + "word " * 20_000 + "\nAgain\n"), stdout) == 0
    out = stdout.getvalue()
    assert "(not sent: the prompt has" in out and "more than the model's context of 512 positions" in out
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["Hello", "Again"]
