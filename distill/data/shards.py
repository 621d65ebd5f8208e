"""Parquet shards on fsspec storage: read a folder of them, write one atomically, count tokens."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cluster import storage
from cluster.errors import RaydistillError

SHARD_SUFFIX = ".parquet"
FILTERED_DIR, GENERATED_DIR = "data/filtered", "data/generate"


def data_dir_for(run_dir: str) -> str:
    """A run's teacher data: ``data/filtered`` once its manifest exists (written last), else ``data/generate``."""
    filtered = storage.join(run_dir, FILTERED_DIR)
    if storage.exists(storage.join(filtered, "manifest.json")):
        return filtered
    generated = storage.join(run_dir, GENERATED_DIR)
    if storage.listdir(generated, SHARD_SUFFIX):
        return generated
    raise RaydistillError(
        f"no training data in {run_dir}: neither {FILTERED_DIR}/manifest.json nor "
        f"{GENERATED_DIR}/*.parquet exists; run `raydistill generate` (and `filter`) first"
    )


def shard_uris(data_dir: str) -> list[str]:
    return storage.listdir(data_dir, SHARD_SUFFIX)


def read_shards(uris: list[str], columns: list[str] | None = None) -> pa.Table | None:
    """Concatenate shards into one table (``None`` when there are none); a torn file is named."""
    tables = []
    for uri in uris:
        fs, path = storage.filesystem(uri)
        try:
            tables.append(pq.read_table(path, filesystem=fs, columns=columns))
        except Exception as exc:  # noqa: BLE001 - reported with the file
            raise RaydistillError(
                f"cannot read shard {uri} ({exc}); delete it and rerun the stage that "
                "wrote it with --run to regenerate its rows"
            ) from exc
    if not tables:
        return None
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowInvalid as exc:
        raise RaydistillError(f"shards under {uris[0].rsplit('/', 1)[0]} have different schemas ({exc})") from exc


def read_dir(data_dir: str, columns: list[str] | None = None) -> pa.Table | None:
    return read_shards(shard_uris(data_dir), columns)


def write_parquet(uri: str, table: pa.Table) -> str:
    """One zstd Parquet file, written to a temp sibling and renamed into place."""
    with storage.atomic_open(uri, "wb") as handle:
        pq.write_table(table, handle, compression="zstd")
    return uri


def token_counts(table: pa.Table | None) -> dict[str, int]:
    def total(name: str) -> int:
        if table is None or not table.num_rows:
            return 0
        return int(pc.sum(table.column(name)).as_py() or 0)

    prompt, completion = total("prompt_len"), total("completion_len")
    return {"prompt": prompt, "completion": completion, "total": prompt + completion}
