"""Chat templates (gpt2kit.chat): the built-in and DialoGPT renderings, Jinja files in the sandbox,
which template a checkpoint gets, the assistant-token mask, and `Model.chat` on a tiny model."""

from __future__ import annotations

import json
import shutil

import pytest

from gpt2kit.chat import (
    BUILTIN,
    DIALOGPT,
    EOS_MARK,
    ChatTemplate,
    Message,
    choose_template,
    encode_chat,
    fit_history,
    prompt_ids,
    template_file,
    to_messages,
)
from gpt2kit.errors import InputFileError, OptionError
from gpt2kit.tokenizer import Tokenizer

TALK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "4"}]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def test_builtin_renders_plain_turns_and_stops_at_the_next_user_line():
    text = BUILTIN.render_text(TALK[:4])
    assert text == "Be brief.\n\nUser: Hi there\nAssistant: Hello!\nUser: 2 + 2?\nAssistant:"
    assert BUILTIN.render_text(TALK[:4], add_generation_prompt=False).endswith("User: 2 + 2?\n")
    assert BUILTIN.stop == ("\nUser:",)


def test_dialogpt_joins_turns_with_end_of_text_only_where_the_template_puts_it(tok):
    talk = [{"role": "user", "content": "Hi <|endoftext|> you"}, {"role": "assistant", "content": "Hey"},
            {"role": "user", "content": "Bye"}]
    ids = prompt_ids(tok, DIALOGPT, talk)
    eos = tok.eos_id
    expected = tok.encode("Hi <|endoftext|> you") + [eos] + tok.encode("Hey") + [eos] + tok.encode("Bye") + [eos]
    assert ids == expected  # the typed "<|endoftext|>" stays text: three end-of-text ids, not four
    assert ids.count(eos) == 3


def test_assistant_mask_covers_replies_and_their_end_of_turn(tok):
    ids, mask = encode_chat(tok, BUILTIN.render(TALK))
    assert len(ids) == len(mask)
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    # " Hello!" (the space after "Assistant:" rides on the first token), then "\nUser:" that ends
    # the turn, then " 4" and the newline that ends the conversation; nothing of the system or user text
    assert trained == " Hello!\nUser: 4\n"
    ids, mask = encode_chat(tok, DIALOGPT.render(TALK))
    trained = [t for t, m in zip(ids, mask) if m]
    assert trained == tok.encode("Hello!") + [tok.eos_id] + tok.encode("4") + [tok.eos_id]


def test_mask_with_multibyte_text(tok):
    talk = [{"role": "user", "content": "東京は"}, {"role": "assistant", "content": "🤗 café"}]
    ids, mask = encode_chat(tok, BUILTIN.render(talk))
    assert tok.decode(ids) == BUILTIN.render_text(talk, add_generation_prompt=False)
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == " 🤗 café\n"  # to the end: the last turn


def test_jinja_file_renders_like_transformers(tmp_path, tok):
    source = ("{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}{{ eos_token }}{% endfor %}"
              "{% if add_generation_prompt %}<assistant>{% endif %}")
    path = tmp_path / "t.jinja"
    path.write_text(source)
    template = template_file(path)
    assert template.name == str(path)
    assert template.render_text(TALK[1:2]) == f"<user>Hi there{EOS_MARK}<assistant>"
    transformers = pytest.importorskip("transformers", reason="transformers is a test dependency (pip install -e \".[test]\"); CI installs it")
    tok.save(tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    hf.chat_template = source
    assert tok.decode(prompt_ids(tok, template, TALK)) == hf.apply_chat_template(
        TALK, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("source, message", [
    ("{{ messages.__class__.__mro__ }}", "unsafe"),  # the sandbox: no Python internals
    ("{{ messages.append(1) }}", "messages"),  # the immutable sandbox: no mutation
    ("{{ raise_exception('only user turns') }}", "only user turns"),
    ("{{ messages[0].content + 1 }}", "failed to render"),
])
def test_template_failures_are_one_line_errors(source, message):
    with pytest.raises(OptionError) as e:
        ChatTemplate(source, "hostile").render_text(TALK)
    assert e.value.field == "messages" and message in str(e.value) and "\n" not in str(e.value)


def test_bad_templates_and_files(tmp_path):
    with pytest.raises(OptionError, match="not a valid Jinja template"):
        ChatTemplate("{% for %}", "broken")
    with pytest.raises(OptionError, match="empty"):
        ChatTemplate("  ", "blank")
    with pytest.raises(InputFileError, match="cannot read the chat template"):
        template_file(tmp_path / "missing.jinja")
    rewrites = ChatTemplate("{% for m in messages %}{{ m.content | upper }}{% endfor %}", "upper")
    assert rewrites.render_text(TALK[:3]).endswith("HELLO!")  # fine for generating...
    with pytest.raises(OptionError, match="verbatim"):  # ...but its assistant tokens cannot be found
        rewrites.render(TALK[:3])


@pytest.mark.parametrize("messages, problem", [
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"role": "bot", "content": "x"}], "[0] role must be one of system, user, assistant; got 'bot'"),
    ([{"role": "user", "content": "x"}, {"role": "user", "content": 3}], "[1] content must be a string, got int"),
    ([{"role": "user"}], "[0] must be an object with a role and a content"),
    ([{"role": "user", "content": "a\ue000"}], "U+E000"),
])
def test_bad_messages(messages, problem):
    with pytest.raises(OptionError) as e:
        to_messages(messages)
    assert e.value.field == "messages" and problem in e.value.problem


def test_choosing_a_template(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert choose_template(None, folder) is BUILTIN
    assert choose_template(None, None) is BUILTIN
    config = {"model_type": "gpt2", "task_specific_params": {"conversational": {"max_length": 1000}}}
    (folder / "config.json").write_text(json.dumps(config))
    assert choose_template(None, folder) is DIALOGPT  # DialoGPT's own config says so
    named = tmp_path / "models--microsoft--DialoGPT-small"
    shutil.copytree(folder, named)
    (named / "config.json").write_text("{}")
    assert choose_template(None, named) is DIALOGPT  # a hub copy without that field: its name
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages[0].content }}!"}))
    assert choose_template(None, folder).render_text(TALK[1:2]) == "Hi there!"  # the checkpoint's own wins
    listed = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "{{ 'd' }}"}]
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": listed}))
    assert choose_template(None, folder).render_text(TALK) == "d"
    (folder / "chat_template.jinja").write_text("{{ 'file' }}")
    assert choose_template(None, folder).render_text(TALK) == "file"
    explicit = tmp_path / "mine.jinja"
    explicit.write_text("{{ 'mine' }}")
    assert choose_template(explicit, folder).render_text(TALK) == "mine"  # the flag wins over all


def test_fit_history_drops_the_oldest_turns_after_the_system_message():
    messages = [Message(**m) for m in TALK]
    kept, dropped = fit_history(messages, len, 3)
    assert dropped == 2 and kept == [messages[0], messages[3], messages[4]]
    kept, dropped = fit_history(messages, len, 1)
    assert kept == [messages[0], messages[4]] and dropped == 3  # the last message always stays
    assert fit_history(messages, len, 10) == (messages, 0)


def test_model_chat_continues_the_rendered_prompt(tiny_model):
    options = dict(max_new_tokens=6, seed=5)
    [reply] = tiny_model.chat(TALK[:4], **options)
    ids = tiny_model.chat_prompt_ids(TALK[:4])
    assert ids == tiny_model.tokenizer.encode(BUILTIN.render_text(TALK[:4]))
    assert reply.prompt_tokens == len(ids)
    [plain] = tiny_model.complete(BUILTIN.render_text(TALK[:4]), stop=("\nUser:",), **options)
    assert reply.text == plain.text and reply.token_ids == plain.token_ids
    pieces = list(tiny_model.chat_stream(TALK[:4], **options))
    assert "".join(pieces) == reply.text and pieces[-1].finish_reason == reply.finish_reason
    with pytest.raises(OptionError, match="role"):
        tiny_model.chat([{"role": "robot", "content": "x"}])


def test_dialogpt_checkpoint_loads_and_chats(tmp_path):
    from conftest import tiny_hf_model

    import gpt2kit
    hf = tiny_hf_model(seed=3, task_specific_params={"conversational": {"max_length": 1000}})
    hf.save_pretrained(tmp_path)
    model = gpt2kit.load(tmp_path, device="cpu")
    assert model.chat_template is DIALOGPT
    talk = [{"role": "user", "content": "Hello"}]
    assert model.chat_prompt_ids(talk) == model.tokenizer.encode("Hello") + [model.tokenizer.eos_id]
    [reply] = model.chat(talk, max_new_tokens=5, seed=0, min_new_tokens=5)
    assert len(reply.token_ids) == 5 and reply.prompt_tokens == 2
    model.chat_template = BUILTIN
    assert model.chat_template is BUILTIN


def test_load_takes_a_template_file_and_fails_fast_on_a_bad_one(tiny_folder, tmp_path):
    import gpt2kit
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}bot:")
    model = gpt2kit.load(tiny_folder, device="cpu", chat_template=path)
    assert model.tokenizer.decode(model.chat_prompt_ids(TALK[1:2])) == "user: Hi there\nbot:"
    with pytest.raises(InputFileError, match="missing.jinja"):
        gpt2kit.load(tiny_folder, device="cpu", chat_template=tmp_path / "missing.jinja")
