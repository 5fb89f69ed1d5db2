"""Reads an offline W&B run file (``run-<id>.wandb``) back, to check what a run logged.

The file is a LevelDB-style log (wandb's own format): a 7-byte header (":W&B", magic,
version), then 32 KiB blocks of records, each with a 7-byte header (crc32, length, type:
1 full, 2 first, 3 middle, 4 last) and a serialized ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    records, pending, position = [], b"", HEADER
    while position + HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < HEADER:
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        position += HEADER
        chunk = data[position : position + length]
        position += length
        if kind == 0:
            break
        if kind in (1, 2):
            pending = chunk
        elif kind in (3, 4):
            pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def read_history(path: Path) -> list[dict]:
    """The logged rows (``run.log`` calls) as dicts of metric -> value."""
    rows = []
    for record in read_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def read_config(path: Path) -> dict:
    """The run config (last value of each key)."""
    config = {}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind in ("config", "run"):
            updates = record.config.update if kind == "config" else record.run.config.update
            for item in updates:
                key = item.key or "/".join(item.nested_key)
                config[key] = json.loads(item.value_json)
    return config


def read_summary(path: Path) -> dict:
    """The run summary (last value of each key)."""
    summary = {}
    for record in read_records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                key = item.key or "/".join(item.nested_key)
                summary[key] = json.loads(item.value_json)
    return summary
