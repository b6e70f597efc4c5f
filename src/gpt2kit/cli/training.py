"""gpt2kit finetune and gpt2kit eval."""

from __future__ import annotations

import argparse
import json
import sys

from ..config import DataConfig, LoraConfig
from ..errors import OptionError
from .flags import add_dataclass_flags, add_model_flags, build, load_options, options_for

FINETUNE_EXAMPLES = """examples:
  gpt2kit finetune onelinefun.csv --column Joke -m gpt2 --out runs/jokes --epochs 10
  gpt2kit finetune data.txt --out runs/x --resume          # continue after a crash or Ctrl-C
  gpt2kit finetune data.jsonl --field text --lora --out runs/y
  gpt2kit finetune corpus.txt --from-scratch --size tiny --out runs/t
  torchrun --nproc_per_node=2 -m gpt2kit finetune data.txt --out runs/ddp
"""


def configure_finetune(p: argparse.ArgumentParser) -> None:
    from ..training.config import TrainConfig
    p.add_argument("data", nargs="?", default=None,
                   help="training text: .txt, .csv/.tsv (with --column), .jsonl (with --field) or a "
                   "folder of .txt files (optional with --resume: the run's data is reused)")
    p.add_argument("-m", "--model", default=None, help="model to start from: hub id, folder or weights "
                   "file (default gpt2; with --resume, the run's)")
    add_dataclass_flags(p, TrainConfig, "training options")
    add_dataclass_flags(p, DataConfig, "data options", skip=("path",))
    add_dataclass_flags(p, LoraConfig, "LoRA options (with --lora)", prefix="lora_")


def run_finetune(args: argparse.Namespace) -> int:
    from ..training.config import TrainConfig
    from ..training.loop import finetune
    data_options = options_for(DataConfig, args)
    data = DataConfig(path=args.data, **data_options) if args.data else None
    if data_options and data is None:
        raise OptionError("data", "options need the data file: repeat its path with --resume")
    options = options_for(TrainConfig, args)
    # --lora is TrainConfig's switch, the --lora-* flags LoraConfig's fields; finetune() takes
    # both as its one `lora` argument: True (default adapters) or the LoraConfig the flags make.
    switch = options.pop("lora", None)
    lora_options = options_for(LoraConfig, args, prefix="lora_")
    lora = build(LoraConfig, lora_options, prefix="lora_") if lora_options else switch
    result = finetune(data, args.model, lora=lora, progress=True, **options)
    print(f"{result.status}: {result.steps} steps; model saved in {result.out} "
          f"(gpt2kit generate -m {result.out} ...)", file=sys.stderr)
    return 0


READ_ONLY_DATA = ("path", "val_fraction", "val_file", "cache_dir", "format", "train_on_all_tokens", "chat_template")


def configure_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="text to score: .txt, .csv/.tsv (with --column), .jsonl (with --field) "
                   "or a folder of .txt files, read as fine-tuning reads it")
    add_model_flags(p)
    add_dataclass_flags(p, DataConfig, "data options", skip=READ_ONLY_DATA)
    p.add_argument("--stride", type=int, default=None,
                   help="sliding-window step for texts longer than the context (default: half the context)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def run_eval(args: argparse.Namespace) -> int:
    data = DataConfig(path=args.data, **options_for(DataConfig, args))
    from ..api import load
    scores = load(args.model, **load_options(args)).evaluate(data, stride=args.stride)
    result = {"loss": scores.nll, "perplexity": scores.ppl, "tokens": scores.n_tokens}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"loss {scores.nll:.4f}  perplexity {scores.ppl:.2f}  ({scores.n_tokens:,} tokens)")
    return 0
