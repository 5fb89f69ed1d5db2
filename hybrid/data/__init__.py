"""The training data pipeline: sources loaded with ``datasets``, a byte-level or BPE tokenizer,
documents packed into fixed rows, and seeded, resumable, rank-sharded loaders.

    dm = HybridDataModule(recipe.data, recipe.tokenizer, seed=recipe.seed,
                          micro_batch_size=8, grad_accum=1, run_dir=recipe.run_dir)
    dm.prepare()        # DataError (one line naming the field or file) on bad input
    dm.tokenizer, dm.stats, dm.train_dataloader(), dm.val_dataloader()
"""

from hybrid.data.errors import DataError
from hybrid.data.module import HybridDataModule

__all__ = ["DataError", "HybridDataModule"]
