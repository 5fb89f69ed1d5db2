"""Training recipes: a YAML file validated by a pydantic schema before anything runs.

A recipe has one section per concern (``model``, ``data``, ``tokenizer``, ``optim``,
``schedule``, ``trainer``, ``logging``, ``checkpoint``, ``eval``) plus a ``seed`` and a run
``name``. Any field can be overridden from the command line with a dotted ``key=value``
(``optim.lr=3e-4 model.d_model=128``), the syntax of litgpt and Hydra; values are parsed as
YAML scalars.

Errors are one line naming the field: an unknown key gets the closest valid key suggested,
a wrong type names the field and the expected type.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hybrid.config import HybridConfig
from hybrid.overrides import apply_overrides, load_yaml
from hybrid.tokenizer import ByteTokenizer

if TYPE_CHECKING:
    from hybrid.tokenizer import Tokenizer


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, assignments are validated, and
    numbers are finite (an ``inf`` learning rate is refused, not trained with)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SourceConfig(Section):
    """Where the text comes from.

    ``format`` picks the loader: ``text`` (files or globs; one document per file),
    ``jsonl`` / ``parquet`` (a ``text_field`` per record), ``disk`` (a dataset written by
    ``datasets``' ``save_to_disk``; ``path`` is its directory) or ``hub`` (a dataset name on
    the Hugging Face hub, needs network; cached by ``datasets``), or ``mqar`` (synthetic
    multi-query associative recall examples, configured by ``data.mqar``; no tokenizer), or
    ``passkey`` (synthetic passkey-retrieval documents, configured by ``data.passkey``). In
    ``paths``, ``{stdlib}`` stands for this Python's standard-library directory.
    """

    format: Literal["text", "jsonl", "parquet", "disk", "hub", "mqar", "passkey"] = "text"
    paths: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    text_field: str = "text"
    name: str | None = None
    subset: str | None = None
    split: str = "train"


class MQARDataConfig(Section):
    """Synthetic MQAR examples (Zoology): training examples from the recipe seed's training
    stream, validation from its disjoint test stream, ``*_examples`` per ``kv_pairs`` value;
    sequences of ``data.seq_len`` ids over a ``vocab_size`` vocabulary (keys from its first
    half, values from its second)."""

    vocab_size: int = Field(512, ge=8)
    kv_pairs: list[int] = Field(default_factory=lambda: [4, 8, 16, 32], min_length=1)
    train_examples: int = Field(20_000, ge=1)
    val_examples: int = Field(256, ge=1)
    power_a: float = Field(0.01, gt=0, le=1)


class PasskeyDataConfig(Section):
    """Synthetic passkey-retrieval sequences of ``data.seq_len`` tokens in the format of
    ``hybrid eval passkey``: the prompt with a random 5-digit key at a random depth and of a
    random length (after a filler document when shorter than the sequence), then the answer
    `` KEY.``. ``supervise``: the loss on the answer only, or on every token."""

    train_examples: int = Field(100_000, ge=1)
    val_examples: int = Field(128, ge=1)
    supervise: Literal["answer", "all"] = "answer"


class DataConfig(Section):
    """Training and validation data: sources, packing and loading."""

    source: SourceConfig = Field(default_factory=SourceConfig)
    validation: SourceConfig | None = None  # a separate validation source; else a split
    val_fraction: float = Field(0.01, gt=0, lt=1)
    seq_len: int = Field(256, ge=8)
    # Packed rows hold several documents, each opened by the tokenizer's end-of-document id.
    # "reset": no token sees an earlier document of its row (scans and convs restart,
    # attention is block-diagonal, positions restart), as each document trained alone.
    # "none": the row is one sequence (the state flows across documents).
    document_boundaries: Literal["reset", "none"] = "reset"
    streaming: bool = False
    shuffle_buffer: int = Field(10_000, ge=1)
    num_workers: int = Field(0, ge=0)
    cache_dir: str | None = None
    max_documents: int | None = Field(None, ge=1)
    mqar: MQARDataConfig = Field(default_factory=MQARDataConfig)
    passkey: PasskeyDataConfig = Field(default_factory=PasskeyDataConfig)


class TokenizerConfig(Section):
    """``byte`` (UTF-8 bytes plus an end-of-document id; no training) or ``bpe`` (byte-level
    BPE trained with ``tokenizers`` on the training corpus, or loaded from ``path``)."""

    kind: Literal["byte", "bpe"] = "byte"
    vocab_size: int = Field(4096, ge=260)
    train_bytes: int = Field(20_000_000, ge=1000)
    path: str | None = None


class OptimConfig(Section):
    """AdamW; no weight decay on norms, biases and embeddings."""

    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0)  # 0 = no clipping

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in betas):
            raise ValueError("each beta must be in [0, 1)")
        return betas


class ScheduleConfig(Section):
    """Linear warmup, then ``cosine`` decay to ``min_lr_ratio * lr``, ``wsd`` (constant, then
    linear decay over the last ``decay_fraction`` of the steps) or ``constant``."""

    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    decay_fraction: float = Field(0.2, gt=0, le=1)


class TrainerConfig(Section):
    """Lightning trainer settings. Tokens per optimizer step =
    ``micro_batch_size * grad_accum * devices * num_nodes * data.seq_len``."""

    max_steps: int = Field(1000, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true"] = "auto"
    accelerator: Literal["auto", "cpu", "gpu", "cuda"] = "auto"
    devices: int = Field(1, ge=1)
    num_nodes: int = Field(1, ge=1)
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    val_every: int = Field(200, ge=1)
    val_batches: int = Field(20, ge=1)
    log_every: int = Field(10, ge=1)
    threads: int | None = Field(None, ge=1)  # torch CPU threads (default: torch's choice)
    # CPU: flush subnormal floats to zero (x86 FTZ/DAZ). A loss on few positions (a passkey
    # answer, an SFT response) makes the SSM backward decay gradients into subnormals, ~1.4x
    # slower per step (scripts/bench_sparse_loss.py); no effect on CUDA kernels.
    flush_denormal: bool = True
    # Recompute activations in the backward instead of keeping them: true = every sublayer,
    # n = every n-th sublayer (0 / false = off). Same results, less memory, ~1/3 more compute.
    activation_checkpointing: bool | int = False
    # torch.compile the model for the training step (compiled on the first step).
    compile: bool = False
    # MoE load-balancing loss: expert token counts of this rank's micro-batch ("rank") or
    # all-reduced over the data-parallel ranks ("global", global-batch balancing).
    moe_balance: Literal["rank", "global"] = "rank"

    @field_validator("activation_checkpointing")
    @classmethod
    def _checkpointing_every(cls, value: bool | int) -> bool | int:
        if not isinstance(value, bool) and value < 0:
            raise ValueError("must be true, false or a number of sublayers >= 0")
        return value

    def checkpoint_every(self) -> int:
        """Sublayers per recomputed one: 1 for ``true``, 0 for off (``int(True) == 1``)."""
        return int(self.activation_checkpointing)


class LoggingConfig(Section):
    """W&B through Lightning's logger (online when logged in, else offline) and a CSV log."""

    wandb: bool = True
    wandb_mode: Literal["auto", "online", "offline"] = "auto"
    project: str = "hybrid"
    entity: str | None = None
    tags: list[str] = Field(default_factory=list)


class CheckpointConfig(Section):
    """Checkpoints every ``every_steps`` optimizer steps plus ``last.ckpt``."""

    every_steps: int = Field(200, ge=1)
    keep: int = Field(2, ge=-1)  # step checkpoints kept besides last (-1 = all)


class EvalConfig(Section):
    """What runs after training: a sampled completion of ``prompt``."""

    prompt: str = "def scale(values, factor):"
    max_new_tokens: int = Field(200, ge=0)
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)


class Recipe(Section):
    """A whole training run."""

    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    # Weights to start from (fine-tuning): a run directory, our model directory, a `hybrid
    # train` .ckpt or a transformers directory; the model section must have the same layers.
    # Optimizer state and step count start afresh; --resume continues from last.ckpt instead.
    init_from: str | None = None
    model: dict[str, Any]
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("name")
    @classmethod
    def _name_stays_inside_output_dir(cls, name: str) -> str:
        path = Path(name)
        if not name or path.is_absolute() or len(path.parts) != 1 or name in (".", ".."):
            raise ValueError(
                "must be one directory name inside output_dir (no '/', '..' or absolute path)"
            )
        return name

    @property
    def run_dir(self) -> Path:
        """Where everything of this run is written: ``{output_dir}/{name}``."""
        return Path(self.output_dir) / self.name

    def hybrid_config(self, vocab_size: int | None = None) -> HybridConfig:
        """The model section as a :class:`HybridConfig`; ``vocab_size`` (the tokenizer's)
        fills it when the recipe leaves it unset.

        Raises:
            RecipeError: ``model.<field>: ...`` naming the bad field.
        """
        data = dict(self.model)
        if vocab_size is not None:
            data.setdefault("vocab_size", vocab_size)
        try:
            return HybridConfig.from_dict(data)
        except ValueError as error:
            raise RecipeError(f"model.{error}") from None

    def resolved(self) -> dict[str, Any]:
        """Every field, defaults filled in: what is saved with the run."""
        return self.model_dump(mode="json")


def vocab_size(recipe: Recipe, tokenizer: Tokenizer | None = None) -> int:
    """The vocabulary the recipe's ids span, which its model takes unless ``model.vocab_size``
    says otherwise (see :meth:`Recipe.hybrid_config`).

    Once the run has its ``tokenizer``, that tokenizer's: a BPE trained on a corpus with too
    few distinct pairs has fewer ids than asked for, and one loaded from ``tokenizer.path``
    (or adopted from ``init_from``) has its own. Without it, the one the recipe asks for: a
    synthetic MQAR task's ``data.mqar.vocab_size``, else the tokenizer section's (bytes: 256 +
    end of document; BPE: its ``vocab_size``).
    """
    if tokenizer is not None:
        return tokenizer.vocab_size
    if recipe.data.source.format == "mqar":
        return recipe.data.mqar.vocab_size
    if recipe.tokenizer.kind == "byte":
        return ByteTokenizer.vocab_size
    return recipe.tokenizer.vocab_size


class RecipeError(ValueError):
    """A recipe problem, as one line naming the file or field."""


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """The raw mapping in a recipe file (not validated).

    Raises:
        RecipeError: missing file, invalid YAML, or not a mapping at the top level.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        data = load_yaml(path.read_text())
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    except UnicodeDecodeError as error:
        message = f"{path}: not UTF-8 text ({error.reason} at byte {error.start})"
        raise RecipeError(message) from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: expected a mapping of recipe sections at the top level")
    return data


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe (model section included).

    Raises:
        RecipeError: one line naming the file or the field and what is wrong.
    """
    data = read_recipe_file(path)
    try:
        data = apply_overrides(data, overrides or [])
    except ValueError as error:
        raise RecipeError(str(error)) from None
    return validate_recipe(data)


def parse_recipe(data: dict[str, Any]) -> Recipe:
    """A :class:`Recipe` from plain data, every section checked against the schema except the
    model section (a free-form mapping here; :func:`validate_recipe` checks it too).

    Raises:
        RecipeError: one line naming the field.
    """
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(describe_validation_error(error)) from None


def validate_recipe(data: dict[str, Any]) -> Recipe:
    """A :class:`Recipe` from plain data; the model section is checked by building its config.

    Raises:
        RecipeError: one line naming the field.
    """
    recipe = parse_recipe(data)
    recipe.hybrid_config(vocab_size(recipe))  # before any tokenizer exists: the one asked for
    return recipe


def describe_validation_error(error: ValidationError) -> str:
    """The first problem of a pydantic error as ``field.path: what is wrong``."""
    first = error.errors()[0]
    location = [str(part) for part in first["loc"]]
    field = ".".join(location)
    if first["type"] == "extra_forbidden":
        valid = _field_names(location[:-1])
        close = difflib.get_close_matches(location[-1], valid, n=1)
        hint = f"did you mean {'.'.join([*location[:-1], close[0]])!r}? " if close else ""
        return f"{field}: unknown key; {hint}valid keys: {', '.join(valid)}"
    if first["type"] == "missing":
        return f"{field}: required"
    got = first.get("input")
    shown = repr(got) if not isinstance(got, dict) else "a mapping"
    message = first["msg"].removeprefix("Value error, ")
    return f"{field}: {message[0].lower()}{message[1:]} (got {shown})"


def _field_names(location: list[str]) -> list[str]:
    """The valid keys of the section at ``location`` (a path of field names)."""
    section: type[BaseModel] = Recipe
    for part in location:
        annotation = section.model_fields[part].annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return []
        section = nested[0]
    return list(section.model_fields)


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML (what ``recipe.yaml`` in the run directory holds)."""
    return yaml.safe_dump(recipe.resolved(), sort_keys=False)


def load_model_config(
    source: str, overrides: list[str] | None = None, **defaults: Any
) -> HybridConfig:
    """A config from a recipe file (its ``model`` section), a checkpoint directory (ours, a
    run directory or a transformers model: :func:`hybrid.checkpoint.read_model_config`) or a
    pattern string.

    ``defaults`` (e.g. ``vocab_size``, ``d_model``) fill fields the source leaves unset;
    ``overrides`` are dotted ``key=value`` strings applied last: relative to the model
    (``d_model=256``), or for a recipe also full recipe paths as ``hybrid train`` takes them
    (``model.d_model=256``, ``data.mqar.vocab_size=256``).

    Raises:
        ValueError: unreadable recipe, or an invalid config (one line naming the field).
    """
    path = Path(source)
    if path.is_dir():
        from hybrid.checkpoint import read_model_config

        data = read_model_config(path)
    elif path.suffix in (".yaml", ".yml", ".json") or path.is_file():
        recipe = read_recipe_file(path)
        if "model" in recipe:  # full recipe paths, as `hybrid train` takes them, apply first
            sections = set(Recipe.model_fields)
            full = [o for o in overrides or [] if o.partition("=")[0].split(".")[0] in sections]
            recipe = apply_overrides(recipe, full)
            overrides = [o for o in overrides or [] if o not in full]
        data = recipe.get("model", recipe)
        if not isinstance(data, dict):
            raise ValueError(f"{source}: model: expected a mapping")
        if "model" in recipe and "vocab_size" not in data:
            data = {**data, "vocab_size": vocab_size(parse_recipe(recipe))}
    else:
        data = {"pattern": source}
    data = {**{k: v for k, v in defaults.items() if v is not None}, **data}
    return HybridConfig.from_dict(apply_overrides(data, overrides or []))
