"""Run tracking: a local CSV log always, W&B (online when logged in, else offline) optionally."""

from __future__ import annotations

import netrc
import os
import secrets
import string
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero_only

from hybrid.atomic import atomic_write_text
from hybrid.recipe import LoggingConfig

WANDB_ID_FILE = "wandb_id"


def wandb_logged_in() -> bool:
    """Whether W&B has credentials: ``WANDB_API_KEY``, or the netrc entry ``wandb login``
    writes for its host. (Read without importing wandb: asking wandb itself sets up its
    global settings, which then ignore the offline mode chosen afterwards.)"""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(config: LoggingConfig) -> str:
    """``online`` / ``offline``: ``auto`` is online only when logged in (and not forced off
    by ``WANDB_MODE``)."""
    if config.wandb_mode != "auto":
        return config.wandb_mode
    if os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled"):
        return "offline"
    return "online" if wandb_logged_in() else "offline"


def build_loggers(
    config: LoggingConfig, run_dir: Path, run_name: str, *, resume: bool
) -> tuple[list[Logger], str | None]:
    """The run's loggers and the W&B mode (None when W&B is off).

    The CSV log goes to ``run_dir/csv/version_N/metrics.csv`` (one version per launch). The
    W&B run id is kept in ``run_dir/wandb_id`` so that ``--resume`` continues the same run.
    """
    # Every logged row is flushed at once (Lightning's default holds 100 steps in memory), so
    # a kill -9 loses no row that a resume will not log again.
    csv = CSVLogger(save_dir=str(run_dir), name="csv", flush_logs_every_n_steps=1)
    loggers: list[Logger] = [csv]
    if not config.wandb:
        return loggers, None
    from lightning.pytorch.loggers import WandbLogger

    mode = wandb_mode(config)
    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
    if run_id is None:
        alphabet = string.ascii_lowercase + string.digits
        run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    kwargs: dict[str, Any] = {"resume": "allow"} if resume else {}
    loggers.append(
        WandbLogger(
            name=run_name,
            project=config.project,
            entity=config.entity,
            tags=config.tags or None,
            save_dir=str(run_dir),
            offline=mode == "offline",
            mode=mode,
            id=run_id,
            **kwargs,
        )
    )
    if rank_zero_only.rank == 0:  # DDP children must not replace the id
        atomic_write_text(id_file, run_id)
    return loggers, mode
