"""Write tests/fixtures/tf-tiny: a tiny GPT-2 saved by real TensorFlow as gpt-2-simple saves a run.

    pip install tensorflow-cpu transformers && python scripts/make_tf_fixture.py [--out DIR]

The variables are named and shaped as in OpenAI's gpt-2 `src/model.py` (`model/h0/attn/c_attn/w`
is [1, in, out]) and saved by `tf.compat.v1.train.Saver`, the saver gpt-2-simple uses, as
`model-1000` with its `checkpoint` file and `counter`. The `.meta` graph is not written: readers
of the weights never need it, and it would be most of the fixture's size.

The vocabulary is GPT-2's first 511 tokens (the 256 bytes and the first 255 merges, which GPT-2
numbers in merge order) plus <|endoftext|> as id 511, so the embedding stays small (512 x 32)
while encoder.json + vocab.bpe remain a real byte-level BPE. `expected_logits.npz` holds the
logits of transformers' GPT2LMHeadModel built from the same numpy arrays: the oracle the loader
is tested against. Run again only to change the fixture; tests/test_interop.py regenerates it
when TensorFlow is installed and checks it still matches the committed files.
"""

from __future__ import annotations

import argparse
import json
import os
from importlib import resources
from pathlib import Path

import numpy as np

HPARAMS = {"n_vocab": 512, "n_ctx": 64, "n_embd": 32, "n_head": 2, "n_layer": 2}
STEP = 1000
IDS = [464, 300, 257, 11, 290, 511, 2, 399]  # a fixed sequence inside the 512-token vocabulary
FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tf-tiny"


def tf_weights(seed: int = 6) -> dict[str, np.ndarray]:
    """TF variable name -> float32 array. Every value is random (norm gains near 1, biases
    nonzero), so a tensor mapped to the wrong place changes the logits."""
    rng = np.random.default_rng(seed)
    n, c, v = HPARAMS["n_ctx"], HPARAMS["n_embd"], HPARAMS["n_vocab"]

    def normal(*shape, scale=0.1):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    weights = {"model/wte": normal(v, c), "model/wpe": normal(n, c, scale=0.02)}
    for i in range(HPARAMS["n_layer"]):
        for norm in ("ln_1", "ln_2"):
            weights[f"model/h{i}/{norm}/g"] = 1 + normal(c)
            weights[f"model/h{i}/{norm}/b"] = normal(c)
        for conv, (n_in, n_out) in {"attn/c_attn": (c, 3 * c), "attn/c_proj": (c, c),
                                    "mlp/c_fc": (c, 4 * c), "mlp/c_proj": (4 * c, c)}.items():
            weights[f"model/h{i}/{conv}/w"] = normal(1, n_in, n_out)
            weights[f"model/h{i}/{conv}/b"] = normal(n_out)
    weights["model/ln_f/g"], weights["model/ln_f/b"] = 1 + normal(c), normal(c)
    return weights


def save_with_tensorflow(weights: dict[str, np.ndarray], out: Path) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    graph = tf.Graph()
    with graph.as_default():
        variables = []
        for name, value in weights.items():
            scope, leaf = name.rsplit("/", 1)
            with tf.compat.v1.variable_scope(scope):
                variables.append(tf.compat.v1.get_variable(leaf, initializer=tf.constant(value)))
        saver = tf.compat.v1.train.Saver(var_list=variables, max_to_keep=1)
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, str(out / "model"), global_step=STEP, write_meta_graph=False)
    (out / "counter").write_text(f"{STEP}\n")


def write_vocabulary(out: Path) -> None:
    """encoder.json + vocab.bpe (OpenAI's names for vocab.json + merges.txt): GPT-2's first tokens."""
    assets = resources.files("gpt2kit") / "assets"
    vocab = json.loads((assets / "vocab.json").read_text(encoding="utf-8"))
    merges = [line for line in (assets / "merges.txt").read_text(encoding="utf-8").splitlines()[1:] if line]
    keep = HPARAMS["n_vocab"] - 1
    encoder = {token: i for token, i in vocab.items() if i < keep}
    encoder["<|endoftext|>"] = keep
    (out / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    (out / "vocab.bpe").write_text("#version: 0.2\n" + "\n".join(merges[:keep - 256]) + "\n", encoding="utf-8")


def expected_logits(weights: dict[str, np.ndarray]) -> np.ndarray:
    """transformers' logits for IDS with these weights (its Conv1D keeps w[0] as (in, out))."""
    import torch
    import transformers
    cfg = transformers.GPT2Config(vocab_size=HPARAMS["n_vocab"], n_positions=HPARAMS["n_ctx"],
                                  n_embd=HPARAMS["n_embd"], n_layer=HPARAMS["n_layer"],
                                  n_head=HPARAMS["n_head"], bos_token_id=IDS[5], eos_token_id=IDS[5])
    model = transformers.GPT2LMHeadModel(cfg).eval()
    leaf = {"g": "weight", "b": "bias", "w": "weight"}
    state = {}
    for name, value in weights.items():
        parts = name.split("/")[1:]  # drop "model"
        if parts[0] in ("wte", "wpe"):
            key = f"transformer.{parts[0]}.weight"
        else:
            block = [f"h.{parts[0][1:]}"] if parts[0][1:].isdigit() else []  # h0 -> h.0
            rest = parts[1:] if block else parts
            key = ".".join(["transformer", *block, *rest[:-1], leaf[rest[-1]]])
        state[key] = torch.from_numpy(value[0] if value.ndim == 3 else value)
    result = model.load_state_dict(state, strict=False)
    assert set(result.missing_keys) <= {"lm_head.weight"} and not result.unexpected_keys, result
    model.tie_weights()
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].numpy()


def write_fixture(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    weights = tf_weights()
    save_with_tensorflow(weights, out)
    (out / "hparams.json").write_text(json.dumps(HPARAMS, indent=2) + "\n")
    write_vocabulary(out)
    np.savez(out / "expected_logits.npz", ids=np.array(IDS), logits=expected_logits(weights))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FIXTURE)
    out = parser.parse_args().out
    write_fixture(out)
    for path in sorted(out.iterdir()):
        print(f"{path.stat().st_size:>8}  {path}")


if __name__ == "__main__":
    main()
