"""Flags built from the option dataclasses, and the parser that keeps usage errors to one line."""

from __future__ import annotations

import argparse
from dataclasses import fields

from ..config import QUANTIZE, GenerationConfig, option_fields
from ..errors import OptionError

# Fields whose flag is not simply --field-name (the CLI keeps the names users know).
FLAGS = {"n": ("-n", "--num-samples"), "stop_at_eos": ("--ignore-eos",), "bad_words": ("--ban",)}


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def flag_names(dest: str) -> tuple[str, ...]:
    """The flags of a field (its `dest`: the field's name, with the prefix its flags were given)."""
    return FLAGS.get(dest, ("--" + dest.replace("_", "-"),))


def flag_of(dest: str) -> str:
    """The flag errors name: the long one."""
    return flag_names(dest)[-1]


SCALARS = {"int": int, "float": float, "str": str}


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, title: str, skip: tuple[str, ...] = (),
                        prefix: str = "") -> None:
    """One flag per documented field of `cls` (named --PREFIX-FIELD-NAME); unset flags stay None
    so the dataclass defaults (documented once, in its help text) apply."""
    group = parser.add_argument_group(title)
    for f in option_fields(cls):
        if f.name in skip:
            continue
        dest = prefix + f.name
        names = flag_names(dest)
        kind = str(f.type).replace(" | None", "")
        if "negated" in f.metadata:  # a flag that turns the option off (--ignore-eos)
            group.add_argument(*names, dest=dest, action="store_false", default=None,
                               help=f.metadata["negated"])
        elif kind == "bool":
            group.add_argument(*names, dest=dest, action="store_true", default=None, help=f.metadata["help"])
        elif kind.startswith("tuple"):
            group.add_argument(*names, dest=dest, action="append", default=None,
                               metavar=f.metadata.get("metavar", "TEXT"),
                               help=f.metadata["help"] + " (may be repeated)")
        else:
            group.add_argument(*names, dest=dest, type=SCALARS.get(kind, str), default=None,
                               metavar=f.name.upper(), help=f.metadata["help"])


def options_for(cls, args: argparse.Namespace, prefix: str = "") -> dict:
    """The fields of `cls` given on the command line (flags left unset are omitted)."""
    return {f.name: tuple(v) if isinstance(v, list) else v
            for f in fields(cls) if (v := getattr(args, prefix + f.name, None)) is not None}


def build(cls, options: dict, prefix: str = ""):
    """`cls(**options)` for flags added with `prefix`: an OptionError then names the field as its
    flag is named, so LoraConfig's `dropout` is reported as --lora-dropout, not as TrainConfig's
    --dropout (the field name alone cannot tell which option was meant)."""
    try:
        return cls(**options)
    except OptionError as e:
        raise OptionError(prefix + e.field, e.problem) from None


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    """The GenerationConfig for the flags given; the dataclass defaults fill the rest."""
    given = options_for(GenerationConfig, args)
    if "max_length" in given and "max_new_tokens" not in given:
        given["max_new_tokens"] = None
    return GenerationConfig(**given)


def add_model_flags(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("-m", "--model", default=None if required else "gpt2",
                        help="hub id (gpt2, distilgpt2, openai-community/gpt2-large, ...), a "
                        "Hugging Face-layout folder, or a weights file (default: gpt2)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--dtype", default="auto",
                        help="auto | float32 | bfloat16 | float16 (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--quantize", choices=QUANTIZE, default=None,
                        help="store the weights as int8 (one scale per output channel): a quarter of "
                        "the memory, faster on CPU. On CPUs with VNNI/AMX each token's activations are "
                        "quantized too (a scale per token) and multiplied int8 x int8; elsewhere they "
                        "stay in --dtype")
    parser.add_argument("--compile", action="store_true",
                        help="decode with a torch.compile'd fixed-shape step (CUDA graphs on CUDA, where "
                        "it pays; on CPU the default eager step is as fast): the first generation "
                        "compiles for up to a minute")


def load_options(args: argparse.Namespace) -> dict:
    """gpt2kit.load's keyword arguments from the flags add_model_flags added."""
    return {"device": args.device, "dtype": args.dtype, "quantize": args.quantize, "compile": args.compile}
