"""Calibration text for the student's initialisation: token-id sequences from teacher data or text files.

``student.calibration.data``: ``run`` (the run's own teacher data, training rows only: prompt +
completion ids), or a list of URIs, each a run directory, a folder of teacher-data Parquet shards,
or a ``.txt`` / ``.jsonl`` file (tokenized with the teacher's tokenizer).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from cluster import storage
from cluster.errors import ConfigError
from distill.data.shards import SHARD_SUFFIX, data_dir_for, read_dir
from distill.data.split import SPLIT_COLUMNS
from distill.data.texts import read_texts

FIELD = "student.calibration.data"


def _parquet_sequences(data_dir: str, keep: Callable[[dict[str, Any]], bool]) -> list[list[int]]:
    table = read_dir(data_dir)
    if table is None:
        return []
    columns = {
        c: (table[c].to_pylist() if c in table.column_names else [None] * table.num_rows)
        for c in (*SPLIT_COLUMNS, "input_ids")
    }
    rows = ({c: columns[c][i] for c in columns} for i in range(table.num_rows))
    return [list(row["input_ids"]) for row in rows if keep(row)]


def check_sources(sources: Sequence[str], run_dir: str | None) -> None:
    if "run" in sources and run_dir is None:
        raise ConfigError(
            f"{FIELD}: 'run' needs a pipeline run; pass --run, list data URIs, or set "
            "student.calibration.data: none for the data-free init"
        )


def calibration_sequences(
    sources: Sequence[str],
    *,
    run_dir: str | None,
    tokenizer: Any,
    keep: Callable[[dict[str, Any]], bool] = lambda row: True,
    seed: int = 0,
) -> list[list[int]]:
    """Token-id sequences from ``sources`` (``"run"`` or URIs), shuffled with ``seed``.

    ``keep(row)`` filters teacher-data rows (a dict with :data:`~distill.data.split.SPLIT_COLUMNS`
    and ``input_ids``; the train stage passes "not held out", so the held-out evaluation never sees
    text the initialisation was fitted on).
    """
    check_sources(sources, run_dir)
    sequences: list[list[int]] = []
    for source in sources:
        if source == "run":
            sequences += _parquet_sequences(data_dir_for(run_dir), keep)
        elif source.endswith((".txt", ".jsonl", ".json")):
            bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
            sequences += [bos + tokenizer(text)["input_ids"] for text in read_texts(source, FIELD)]
        elif storage.listdir(source, SHARD_SUFFIX):
            sequences += _parquet_sequences(source, keep)
        elif storage.exists(storage.join(source, "data")):
            sequences += _parquet_sequences(data_dir_for(source), keep)
        else:
            raise ConfigError(
                f"{FIELD}: {source} is neither a run directory, a folder of .parquet shards, nor a "
                ".txt/.jsonl file; fix the URI or remove it"
            )
    if not sequences:
        raise ConfigError(
            f"{FIELD}: {list(sources)} gave no text; point it at teacher data or text files, or "
            "set student.calibration.data: none for the data-free init"
        )
    random.Random(seed).shuffle(sequences)
    return sequences
