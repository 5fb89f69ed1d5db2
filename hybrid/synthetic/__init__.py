"""Synthetic tasks, generated from a seed: multi-query associative recall (:mod:`.mqar`),
passkey retrieval (:mod:`.passkey`) and the haystack prompts they and the needle tasks are
built from (:mod:`.haystack`).

Training data (:mod:`hybrid.data.synthetic`) and the evaluations (:mod:`hybrid.eval`) both
import them, so a model is scored on exactly the format it was trained on; this package
imports neither.
"""
