"""What every ``hybrid`` subcommand parses with: a parser whose errors are one line on stderr
and exit code 2, and the table of dtype names the options take."""

from __future__ import annotations

import argparse
from typing import NoReturn

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit code 2 (no usage
    block; ``--help`` still prints it). Its subcommand parsers are of the same class."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")
