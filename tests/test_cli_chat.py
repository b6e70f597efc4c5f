"""`gpt2kit chat` with standard input piped: replies through the API, /save, /reset, /quit, and the
history cut to the context window (said on stderr)."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def chat(folder, lines: list[str], *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt2kit", "chat", "-m", str(folder), *flags],
                          input="".join(line + "\n" for line in lines), capture_output=True, text=True,
                          timeout=120, env=dict(os.environ))


def test_replies_are_model_chat_and_save_reset_quit_work(tiny_folder, tiny_model, tmp_path):
    saved, after_reset = tmp_path / "talk.json", tmp_path / "reset.json"
    r = chat(tiny_folder, ["Hello there", f"/save {saved}", "/reset", f"/save {after_reset}", "/quit",
                           "never read"], "--seed", "1", "--max-new-tokens", "8", "--system", "Be kind.")
    assert r.returncode == 0, r.stderr
    system = {"role": "system", "content": "Be kind."}
    [expected] = tiny_model.chat([system, {"role": "user", "content": "Hello there"}], seed=1, max_new_tokens=8)
    assert r.stdout == expected.text + "\n"  # one reply: "never read" came after /quit
    messages = json.loads(saved.read_text())
    assert messages == [system, {"role": "user", "content": "Hello there"},
                        {"role": "assistant", "content": expected.text.strip()}]
    assert json.loads(after_reset.read_text()) == [system]  # /reset keeps the system message
    assert "(conversation reset)" in r.stderr and f"saved 3 messages to {saved}" in r.stderr


def test_oldest_turns_are_dropped_to_fit_the_context_and_said(tiny_folder, tmp_path):
    saved = tmp_path / "talk.json"
    lines = [f"message number {i} with a few more words" for i in range(4)] + [f"/save {saved}"]
    r = chat(tiny_folder, lines, "--seed", "2", "--max-new-tokens", "16", "--system", "Hi.", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    assert "oldest message" in r.stderr and "64-token context" in r.stderr
    messages = json.loads(saved.read_text())
    assert messages[0] == {"role": "system", "content": "Hi."}  # the system message stays
    assert messages[1]["content"] != "message number 0 with a few more words"  # the oldest went first
    assert messages[-2] == {"role": "user", "content": "message number 3 with a few more words"}
    assert len(r.stdout.splitlines()) >= 4  # every message was answered


def test_a_message_longer_than_the_context_is_refused_and_the_chat_goes_on(tiny_folder):
    r = chat(tiny_folder, ["word " * 80, "/bogus", "short one"], "--seed", "3", "--max-new-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert "say something shorter" in r.stderr and "unknown command '/bogus'" in r.stderr
    assert len(r.stdout.splitlines()) == 1  # only "short one" was answered


def test_bad_flags_and_template_files_are_one_line_errors(tiny_folder, tmp_path):
    r = chat(tiny_folder, ["hi"], "--temperature", "-1")
    assert r.returncode == 2 and r.stderr.strip() == "error: --temperature must be in [0, 2], got -1.0"
    r = chat(tiny_folder, ["hi"], "--chat-template", str(tmp_path / "none.jinja"))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "none.jinja" in r.stderr
    (tmp_path / "t.jinja").write_text("{% for m in messages %}{{ m.content }}|{% endfor %}")
    r = chat(tiny_folder, ["hi"], "--chat-template", str(tmp_path / "t.jinja"), "--max-new-tokens", "2")
    assert r.returncode == 0 and r.stdout.count("\n") == 1
