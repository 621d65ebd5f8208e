"""``raydistill data inspect URI``: counts, token stats, a sample row and soft-label sanity."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from cluster import storage
from cluster.errors import RaydistillError
from distill.data.shards import read_dir, read_shards


def _load(uri: str) -> pa.Table:
    if uri.endswith(".parquet"):
        return read_shards([uri])
    candidates = [uri, storage.join(uri, "data", "filtered"), storage.join(uri, "data", "generate")]
    for candidate in candidates:
        table = read_dir(candidate)
        if table is not None:
            return table
    raise RaydistillError(f"{uri}: no Parquet shards here (looked in {', '.join(candidates)})")


def _describe(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {"mean": 0.0, "min": 0, "max": 0}
    return {"mean": round(float(values.mean()), 2), "min": int(values.min()), "max": int(values.max())}


def inspect_data(uri: str) -> dict[str, Any]:
    table = _load(uri)
    prompt_len = np.asarray(table.column("prompt_len").to_numpy(zero_copy_only=False))
    completion_len = np.asarray(table.column("completion_len").to_numpy(zero_copy_only=False))
    report: dict[str, Any] = {
        "uri": uri,
        "rows": table.num_rows,
        "unique_prompt_ids": len(set(table.column("prompt_id").to_pylist())),
        "prompt_tokens": int(prompt_len.sum()),
        "completion_tokens": int(completion_len.sum()),
        "prompt_len": _describe(prompt_len),
        "completion_len": _describe(completion_len),
        "finish_reason": dict(
            zip(*np.unique(np.asarray(table.column("finish_reason").to_pylist(), dtype=object), return_counts=True))
        )
        if table.num_rows
        else {},
        "sources": sorted(set(table.column("source").to_pylist())),
        "teachers": sorted(set(table.column("teacher").to_pylist())),
    }
    report["finish_reason"] = {str(k): int(v) for k, v in report["finish_reason"].items()}
    report["soft_labels"] = soft_label_sanity(table)
    if table.num_rows:
        sample = table.slice(0, 1).to_pylist()[0]
        k = len(sample["topk_ids"][0]) if sample["topk_ids"] else 0
        report["sample"] = {
            "prompt_id": sample["prompt_id"],
            "prompt": sample["prompt"],
            "completion": sample["completion"],
            "prompt_len": sample["prompt_len"],
            "completion_len": sample["completion_len"],
            "finish_reason": sample["finish_reason"],
            "quality": sample["quality"],
            "k": k,
            "first_position_topk": list(
                zip(sample["topk_ids"][0][:5], [round(x, 4) for x in sample["topk_logprobs"][0][:5]])
            )
            if k
            else [],
        }
    return report


def soft_label_sanity(table: pa.Table) -> dict[str, Any]:
    """Log-probs must be <= 0 and sorted descending; their mass says how much of the teacher k covers."""
    positions = bad_sign = unsorted = length_mismatch = 0
    mass_sum = 0.0
    for lps, completion_len in zip(
        table.column("topk_logprobs").to_pylist(), table.column("completion_len").to_pylist()
    ):
        if len(lps) != completion_len:
            length_mismatch += 1
        if not lps:
            continue
        arr = np.asarray(lps, dtype=np.float64)  # [T, k]
        positions += arr.shape[0]
        bad_sign += int((arr > 1e-6).any(axis=1).sum())
        unsorted += int((np.diff(arr, axis=1) > 1e-6).any(axis=1).sum())
        mass_sum += float(np.exp(arr).sum(axis=1).sum())
    return {
        "positions": positions,
        "positive_logprob_positions": bad_sign,
        "unsorted_positions": unsorted,
        "rows_with_length_mismatch": length_mismatch,
        "mean_topk_mass": round(mass_sum / positions, 4) if positions else None,
        "ok": positions > 0 and bad_sign == 0 and unsorted == 0 and length_mismatch == 0,
    }
