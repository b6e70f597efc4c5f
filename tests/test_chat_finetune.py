"""Fine-tuning on conversations (`--format chat`): the assistant-only loss mask checked token by
token, the loss computed over the trained targets only, bad lines named, and a CLI run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gpt2kit.chat import BUILTIN, DIALOGPT, encode_chat
from gpt2kit.config import DataConfig
from gpt2kit.data.blocks import IGNORED, TokenBlocks, split_ignored
from gpt2kit.data.prepare import prepare_data
from gpt2kit.errors import InputFileError, OptionError
from gpt2kit.tokenizer import Tokenizer

CHATS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi, who are you?"},
     {"role": "assistant", "content": "A bot."}, {"role": "user", "content": "Tell me a joke."},
     {"role": "assistant", "content": "No."}],
    [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four, I think."}],
    [{"role": "user", "content": "Say something long."},
     {"role": "assistant", "content": "Something long, with a few more words than the others."}],
]


def write_chats(path, chats, repeat: int = 20):
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for _ in range(repeat) for c in chats))
    return path


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.default()


def test_the_mask_trains_on_assistant_turns_only(tmp_path, tok):
    data = DataConfig(path=str(write_chats(tmp_path / "chats.jsonl", CHATS)), format="chat", val_fraction=0,
                      cache_dir=str(tmp_path / "cache"))
    prepared = prepare_data(data, tok, block_size=16)
    train = prepared.train
    assert train.mask is not None and len(train.mask) == len(train.tokens) == prepared.tokens
    # The token stream is the conversations, each rendered and closed by <|endoftext|>, in order.
    expected_ids, expected_mask = [], []
    for chat in CHATS * 20:
        ids, mask = encode_chat(tok, BUILTIN.render(chat))
        expected_ids += ids + [tok.eos_id]
        expected_mask += mask + [mask[-1]]
    assert list(train.tokens) == expected_ids and [bool(m) for m in train.mask] == expected_mask
    trained = tok.decode([t for t, m in zip(train.tokens, train.mask) if m][:40])
    assert trained.startswith(" A bot.\nUser: No.\n<|endoftext|> Four, I think.\n<|endoftext|>")
    assert "terse" not in trained and "joke" not in trained and "two plus" not in trained
    assert prepared.trained_tokens == sum(expected_mask) < prepared.tokens
    assert any("the loss is on" in note for note in prepared.notes)
    # A batch carries the mask inside the ids; split_ignored gives back both, unchanged.
    x = train.batch([0, 3])
    ids, keep = split_ignored(x)
    assert (x[~keep] >= IGNORED).all() and (x[keep] < IGNORED).all()
    assert ids.tolist() == [list(train.block(0)), list(train.block(3))]
    assert keep.tolist() == [[bool(m) for m in train.mask[i * 16:(i + 1) * 16]] for i in (0, 3)]


def test_train_on_all_tokens_and_the_dialogpt_template(tmp_path, tok):
    path = write_chats(tmp_path / "chats.jsonl", CHATS)
    everything = prepare_data(DataConfig(path=str(path), format="chat", train_on_all_tokens=True, val_fraction=0,
                                         cache_dir=str(tmp_path / "cache")), tok, block_size=16)
    assert everything.train.mask is None and everything.trained_tokens is None
    template = tmp_path / "dialogpt.jinja"
    template.write_text(DIALOGPT.source)
    dialog = prepare_data(DataConfig(path=str(path), format="chat", chat_template=str(template), val_fraction=0,
                                     cache_dir=str(tmp_path / "cache")), tok, block_size=16)
    ids = list(dialog.train.tokens)
    first = tok.encode("You are terse.") + [tok.eos_id] + tok.encode("Hi, who are you?") + [tok.eos_id]
    assert ids[:len(first)] == first  # DialoGPT's own <|endoftext|> ends the conversation: not doubled
    n = len(encode_chat(tok, DIALOGPT.render(CHATS[0]))[0])
    assert ids[n - 1] == tok.eos_id and ids[n] != tok.eos_id
    assert dialog.fingerprint != everything.fingerprint


def test_the_loss_counts_the_trained_targets_only(tiny_model):
    from gpt2kit.model import GPT
    from gpt2kit.training.objective import NextTokenLoss
    torch.manual_seed(0)
    model = GPT(tiny_model.config).eval()
    ids = torch.randint(0, 1000, (2, 12))
    keep = torch.rand(2, 12) < 0.4
    keep[0, 5] = True
    x = ids + IGNORED * (~keep)
    logits = model(ids[:, :-1]).float()
    per_token = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    expected = per_token[keep[:, 1:].flatten()].mean()
    loss = NextTokenLoss(model)
    assert torch.allclose(loss(x), expected, atol=1e-5)  # the fused head
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.allclose(loss(x), expected, atol=5e-2)  # the plain path (float16 logits)
    assert torch.allclose(loss(ids), per_token.mean(), atol=1e-5)  # no mask: every target
    # A micro-batch with nothing to learn: zero loss, zero gradients (not NaN).
    nothing = loss(ids + IGNORED)
    nothing.backward()
    assert nothing.item() == 0 and all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_the_validation_loss_counts_the_trained_targets_only(tiny_model):
    from gpt2kit.inference.scoring import evaluate_blocks
    from gpt2kit.model import GPT
    torch.manual_seed(0)
    model = GPT(tiny_model.config).eval()
    tokens = torch.randint(0, 1000, (3 * 16,)).numpy().astype("uint16")
    mask = (torch.rand(3 * 16) < 0.5).numpy().astype("uint8")
    blocks = TokenBlocks(tokens, 16, mask)
    ids, trained = blocks.batch_and_mask(range(3))
    assert torch.equal(blocks.batch(range(3)), ids + IGNORED * ~trained)
    with torch.no_grad():
        per_token = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    expected = per_token[trained[:, 1:].flatten()].mean().item()
    assert evaluate_blocks(model, blocks, batch_size=2)[0] == pytest.approx(expected, rel=1e-5)
    assert evaluate_blocks(model, TokenBlocks(tokens, 16), batch_size=2)[0] == pytest.approx(per_token.mean().item(), rel=1e-5)
    nothing = TokenBlocks(tokens, 16, mask * 0)
    assert evaluate_blocks(model, nothing)[0] != evaluate_blocks(model, nothing)[0]  # NaN: no target


@pytest.mark.parametrize("line, words", [
    ("{not json", "line 2 of"),
    ('{"text": "hi"}', "has no field 'messages'"),
    ('{"messages": "hi"}', "non-empty list"),
    ('{"messages": [{"role": "bot", "content": "x"}]}', "line 2 of"),
    ('{"messages": [{"role": "user", "content": 5}]}', "content must be a string"),
    ('[1, 2]', "not an object"),
])
def test_bad_lines_are_named(tmp_path, tok, line, words):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": CHATS[1]}) + "\n" + line + "\n")
    with pytest.raises(InputFileError) as e:
        prepare_data(DataConfig(path=str(path), format="chat", cache_dir=str(tmp_path / "c")), tok, 16)
    assert words in str(e.value) and "line 2" in str(e.value) and "\n" not in str(e.value)


def test_chat_options_are_checked(tmp_path, tok):
    with pytest.raises(OptionError, match="text, chat"):
        DataConfig(path="x", format="dialog")
    with pytest.raises(OptionError, match="with --format chat only"):
        DataConfig(path="x", train_on_all_tokens=True)
    csv = tmp_path / "a.csv"
    csv.write_text("a\nb\n")
    with pytest.raises(OptionError, match="JSON lines"):
        prepare_data(DataConfig(path=str(csv), format="chat", cache_dir=str(tmp_path / "c")), tok, 16)


def test_text_data_keeps_its_fingerprint_and_has_no_mask(tmp_path, tok):
    path = tmp_path / "t.txt"
    path.write_text("hello world " * 200)
    cfg = DataConfig(path=str(path), cache_dir=str(tmp_path / "c"))
    prepared = prepare_data(cfg, tok, 16)
    assert prepared.train.mask is None and prepared.trained_tokens is None
    assert TokenBlocks(prepared.train.tokens, 16).batch([0]).tolist() == prepared.train.batch([0]).tolist()


def test_finetune_format_chat_from_the_cli(tmp_path, tiny_folder):
    chats = write_chats(tmp_path / "chats.jsonl", CHATS, repeat=10)
    out = tmp_path / "bot"
    r = subprocess.run([sys.executable, "-m", "gpt2kit", "finetune", str(chats), "--format", "chat", "-m",
                        str(tiny_folder), "--out", str(out), "--max-steps", "2", "--batch-size", "2",
                        "--block-size", "32", "--sample-every", "0", "--cache-dir", str(tmp_path / "cache")],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert "the loss is on" in r.stderr and (out / "model.safetensors").is_file()
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 2 and all(v == v for v in losses)
    bad = subprocess.run([sys.executable, "-m", "gpt2kit", "finetune", str(chats), "--train-on-all-tokens",
                          "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ))
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: --train-on-all-tokens applies with --format chat only")
    assert not (out / "chat_template.jinja").exists()  # the built-in template is chosen again


def test_a_chat_run_keeps_the_template_it_was_trained_with(tmp_path, tiny_folder):
    import gpt2kit
    chats = write_chats(tmp_path / "chats.jsonl", CHATS, repeat=10)
    template = tmp_path / "turns.jinja"
    template.write_text("{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}"
                        "{% if add_generation_prompt %}<assistant> {% endif %}")
    out = tmp_path / "bot"
    r = subprocess.run([sys.executable, "-m", "gpt2kit", "finetune", str(chats), "--format", "chat", "-m",
                        str(tiny_folder), "--out", str(out), "--max-steps", "1", "--batch-size", "2",
                        "--block-size", "32", "--sample-every", "0", "--cache-dir", str(tmp_path / "cache"),
                        "--chat-template", str(template)], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert (out / "chat_template.jinja").read_text() == template.read_text()
    assert gpt2kit.load(out, device="cpu").chat_template.source == template.read_text()
