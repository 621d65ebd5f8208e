"""The ``filter`` stage: ``{run_dir}/data/generate/*.parquet`` -> ``{run_dir}/data/filtered/``.

Plain pyarrow, no Ray: read every generated shard, apply :func:`distill.data.filters.apply_filters`,
write the kept rows as zstd Parquet shards ``part-00000.parquet``, ... (same schema, sorted by
``prompt_id``) and a ``manifest.json`` with row/token counts and per-filter drop counts.

Rerun safety: the old manifest is removed first, every shard is written atomically (temp + rename),
shards left over from a previous run that the new output does not have are deleted, and the new
manifest is written last. A ``filtered/`` folder is complete exactly when its ``manifest.json``
exists, and the manifest's ``shards`` list names its files.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from cluster import storage
from cluster.errors import RaydistillError
from distill.data.filters import apply_filters, build_decontamination_index
from distill.data.section import DataConfig
from distill.data.shards import read_shards, token_counts, write_parquet

GENERATE_DIR = "data/generate"
FILTERED_DIR = "data/filtered"
MANIFEST = "manifest.json"
TARGET_SHARD_BYTES = 128 * 1024 * 1024  # in-memory Arrow size per output shard (before zstd)


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _clear_temp_files(out_dir: str) -> None:
    """Temp files of writers that crashed earlier (listdir hides them, so delete them here)."""
    fs, path = storage.filesystem(out_dir)
    if not fs.exists(path):
        return
    for entry in fs.ls(path, detail=False):
        if entry.rstrip("/").rsplit("/", 1)[-1].startswith(storage.TMP_PREFIX):
            fs.rm(entry)


def write_shards(table: pa.Table, out_dir: str, target_bytes: int | None = None) -> list[str]:
    """Write ``table`` as ``part-NNNNN.parquet`` shards (at least one, possibly empty); return names."""
    target_bytes = target_bytes or TARGET_SHARD_BYTES
    per_row = table.nbytes / table.num_rows if table.num_rows else 1
    rows_per_shard = max(1, int(target_bytes // max(per_row, 1)))
    names = []
    offset = 0
    while True:
        piece = table.slice(offset, rows_per_shard)
        name = shard_name(len(names))
        write_parquet(storage.join(out_dir, name), piece)
        names.append(name)
        offset += rows_per_shard
        if offset >= table.num_rows:
            return names


def run_filter_stage(cfg: DataConfig, run_dir: str) -> dict[str, Any]:
    """Filter a run's generated data into ``data/filtered/``; returns the manifest written."""
    start = time.time()
    gen_dir = storage.join(run_dir, GENERATE_DIR)
    out_dir = storage.join(run_dir, FILTERED_DIR)
    inputs = storage.listdir(gen_dir, ".parquet")
    if not inputs:
        raise RaydistillError(
            f"no generated data under {gen_dir}; run `raydistill generate --config FILE` first "
            "(or pass --run ID for a run that has it)"
        )

    fcfg = cfg.filter
    # Eval sets first: a bad URI fails before the (possibly large) read.
    eval_uris = [cfg.resolve_path(u) for u in fcfg.decontaminate]
    index = build_decontamination_index(eval_uris, fcfg.ngram, fcfg.decontaminate_min_tokens) if eval_uris else None

    table = read_shards(inputs)
    assert table is not None  # inputs is non-empty
    kept, dropped = apply_filters(table, fcfg, decontamination=index)

    storage.makedirs(out_dir)
    storage.remove(storage.join(out_dir, MANIFEST))  # the folder is incomplete until the new one lands
    _clear_temp_files(out_dir)
    names = write_shards(kept, out_dir)
    for stale in storage.listdir(out_dir, ".parquet"):
        if stale.rsplit("/", 1)[-1] not in names:
            storage.remove(stale)

    manifest: dict[str, Any] = {
        "stage": "filter",
        "input_dir": gen_dir,
        "input_shards": len(inputs),
        "input_rows": table.num_rows,
        "output_rows": kept.num_rows,
        "dropped": dropped,
        "filter_order": list(dropped),
        "dropped_total": table.num_rows - kept.num_rows,
        "input_tokens": token_counts(table),
        "tokens": token_counts(kept),
        "shards": names,
        "config_hash": cfg.section_hash("filter"),
        "filter": fcfg.model_dump(mode="json"),
        "decontamination_items": len(index) if index is not None else 0,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_time_s": round(time.time() - start, 3),
    }
    storage.atomic_write_json(storage.join(out_dir, MANIFEST), manifest)
    return manifest
