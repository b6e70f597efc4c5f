"""`python -m gpt2kit` runs the CLI (also the entry point for torchrun)."""

import sys

from .cli import main

sys.exit(main())
