"""Inference on a trained model: the unified cache, its save/load, sampling, generation and
speculative decoding.

    cache = model.allocate_cache(batch_size=1, max_seqlen=4096)   # a HybridCache
    model(prompt_ids, cache=cache)                                 # prefill
    save_cache(cache, "prompt.cache"); cache = load_cache(model, "prompt.cache")
    model.generate(prompt_ids, 64, temperature=0.8, top_p=0.95)    # GenerationMixin
    speculative_generate(target, draft, prompt_ids, 64)

Nothing here imports :mod:`hybrid.model`; the model imports the cache and the generation
mixin from here.
"""

from hybrid.inference.cache import CacheCheckpoint, HybridCache, token_context
from hybrid.inference.cache_io import load_cache, save_cache
from hybrid.inference.generation import GenerationMixin, beam_search, generate, stream
from hybrid.inference.sampling import SamplingConfig
from hybrid.inference.speculative import SpeculativeResult, speculative_generate

__all__ = [
    "CacheCheckpoint",
    "GenerationMixin",
    "HybridCache",
    "SamplingConfig",
    "SpeculativeResult",
    "beam_search",
    "generate",
    "load_cache",
    "save_cache",
    "speculative_generate",
    "stream",
    "token_context",
]
