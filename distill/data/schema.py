"""The Parquet schema of generated data (``data/generate/`` and ``data/filtered/``).

One row per (prompt, sample). ``topk_ids[i]`` / ``topk_logprobs[i]`` are the teacher's raw
(temperature 1, unfiltered) top-k distribution over completion token ``i``, i.e. over
``input_ids[prompt_len + i]``; their outer length equals ``len(input_ids) - prompt_len``.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

MESSAGE_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def schema(logprob_dtype: str = "float32") -> pa.Schema:
    value_type = {"float32": pa.float32(), "float16": pa.float16()}[logprob_dtype]
    return pa.schema(
        [
            ("prompt_id", pa.string()),
            ("prompt", pa.string()),
            ("messages", MESSAGE_TYPE),
            ("completion", pa.string()),
            ("input_ids", pa.list_(pa.int32())),
            ("prompt_len", pa.int32()),
            ("completion_len", pa.int32()),
            ("topk_ids", pa.list_(pa.list_(pa.int32()))),
            ("topk_logprobs", pa.list_(pa.list_(value_type))),
            ("teacher", pa.string()),
            ("sampling", pa.string()),
            ("finish_reason", pa.string()),
            ("quality", pa.float32()),
            ("source", pa.string()),
        ]
    )


COLUMNS = [f.name for f in schema()]
CORPUS_SOURCE = "corpus:"  # ``source`` prefix of human text the teacher scored (distill.data.corpus)


def is_corpus_source(source: str | None) -> bool:
    """A row of human-written text the teacher labelled, not a completion it wrote."""
    return bool(source) and source.startswith(CORPUS_SOURCE)


def prompt_id(source: str, prompt: str | list[dict[str, str]], sample_index: int) -> str:
    """Stable id of (source, prompt text or messages, sample index): same input, same id, any run."""
    body = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)
    digest = hashlib.sha256(f"{source}\x1f{body}\x1f{sample_index}".encode()).hexdigest()
    return digest[:24]


def to_table(rows: list[dict[str, Any]], logprob_dtype: str = "float32") -> pa.Table:
    """Rows (dicts with the schema's keys) -> a typed table; missing nullable fields become null."""
    sch = schema(logprob_dtype)
    columns = {name: [row.get(name) for row in rows] for name in sch.names}
    return pa.Table.from_pydict(columns, schema=sch)
