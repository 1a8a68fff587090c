"""Read the records of an offline W&B run (`run-*.wandb`), to check what a run sent to W&B.

The file is a LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version), then 32 KiB
blocks of chunks, each with a 7-byte header (CRC32, length, type: full, first, middle, last);
each reassembled record is a `wandb_internal_pb2.Record` protobuf. wandb ships no reader for it.
"""

import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK, HEADER = 32 * 1024, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B run file"
    out, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # the block's tail is padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def summary_and_history(path: Path) -> tuple[dict, list[dict], dict]:
    """(config, history rows, summary) with JSON-decoded values."""
    import json

    config, history, summary = {}, [], {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind in ("config", "run"):  # the run record carries the config given to wandb.init
            items = record.config.update if kind == "config" else record.run.config.update
            config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                           for i in items})  # fmt: skip
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                            for i in record.history.item})  # fmt: skip
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                            for i in record.summary.update})  # fmt: skip
    return config, history, summary


def run_record(path: Path) -> wandb_internal_pb2.RunRecord:
    """The run's own record: its id, project and config, and `resume`, which wandb sets when
    wandb.init was given `resume=` (an attempt continuing an earlier one)."""
    (run,) = [r.run for r in records(path) if r.WhichOneof("record_type") == "run"]
    return run
