"""Build the model of a recipe and run it over real text: this file's own bytes.

Usage: python scripts/forward_demo.py RECIPE
Prints the next-byte loss of the untrained model (about ln(vocab) when initialised well) and
the prefill speed.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hybrid import HybridLM
from hybrid.info import load_model_config


def main(recipe: str) -> None:
    config = load_model_config(recipe)
    torch.manual_seed(0)
    model = HybridLM(config).eval()
    text = Path(__file__).read_bytes()[:1024]
    ids = torch.tensor([list(text)]) % config.vocab_size
    with torch.inference_mode():
        model(ids[:, :64])  # warm up
        start = time.perf_counter()
        logits = model(ids).logits
        seconds = time.perf_counter() - start
    loss = F.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
    print(
        f"{model.num_parameters():,} parameters; next-byte loss {loss:.3f} "
        f"(uniform: {math.log(config.vocab_size):.3f}); prefill {ids.shape[1] / seconds:,.0f} tok/s"
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "recipes/quickstart.yaml")
