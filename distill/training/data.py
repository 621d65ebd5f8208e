"""Training data: where it is, which rows each stage reads, and packing rows into batches.

Plain Python/NumPy/PyTorch; the Ray Data side (datasets built on the driver, iterated on the
workers) is in :mod:`distill.training.ray_data`. Legend: B packed sequences per micro-batch, T the
packed length, N counted (completion) positions in a batch, K soft labels per position.

Determinism is what makes a mid-stage resume exact: a rank's rows of a mixture component come in
an order fixed by (seed, epoch), rows are assigned to ranks by a hash of their ``prompt_id``, and
the mixture draws components with a seeded generator whose state is checkpointed.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from cluster.errors import ConfigError, RaydistillError
from distill.data.shards import FILTERED_DIR, GENERATED_DIR, data_dir_for  # noqa: F401 (re-exported)
from distill.data.split import SPLIT_COLUMNS, row_is_heldout

TRAIN_COLUMNS = [
    "prompt_id",
    "input_ids",
    "prompt_len",
    "completion_len",
    "topk_ids",
    "topk_logprobs",
    "source",
    "quality",
    "finish_reason",
    "prompt",
    "messages",
]


def rank_of(prompt_id: str, world_size: int) -> int:
    """The rank that trains on a prompt's rows: disjoint across ranks, the same on every restart."""
    if world_size == 1:
        return 0
    return int.from_bytes(hashlib.sha256(prompt_id.encode()).digest()[:8], "big") % world_size


# ----------------------------------------------------------------------------- mixture selection
def component_mask(table: pa.Table, component: Any) -> np.ndarray:
    """Which rows of ``table`` a mixture component selects. ``table`` needs source, quality, path."""
    mask = np.ones(table.num_rows, dtype=bool)
    if component.source is not None:
        mask &= np.asarray(pc.fill_null(pc.equal(table["source"], component.source), False))
    if component.min_quality is not None:
        mask &= np.asarray(pc.fill_null(pc.greater_equal(table["quality"], component.min_quality), False))
    if component.finish_reason is not None:
        mask &= np.asarray(pc.fill_null(pc.equal(table["finish_reason"], component.finish_reason), False))
    if component.files is not None:
        names = [p.rsplit("/", 1)[-1] for p in table["path"].to_pylist()]
        mask &= np.array([fnmatch.fnmatch(n, component.files) for n in names], dtype=bool)
    return mask


def heldout_mask(table: pa.Table, fraction: float, seed: int) -> np.ndarray:
    """``[rows]`` bool: held-out rows, chosen by prompt (all samples of a prompt on the same side)."""
    if fraction <= 0:
        return np.zeros(table.num_rows, dtype=bool)
    columns = {c: (table[c].to_pylist() if c in table.column_names else [None] * table.num_rows) for c in SPLIT_COLUMNS}
    return np.array(
        [row_is_heldout({c: columns[c][i] for c in SPLIT_COLUMNS}, fraction, seed) for i in range(table.num_rows)],
        dtype=bool,
    )


# ----------------------------------------------------------------------------- rows
def rows_from_table(table: pa.Table) -> list[dict[str, Any]]:
    """Arrow rows -> dicts of NumPy arrays: input_ids [L], topk_ids / topk_logprobs [C, K] (or None)."""
    out = []
    input_ids = table["input_ids"].to_pylist()
    topk_ids = table["topk_ids"].to_pylist() if "topk_ids" in table.column_names else [None] * table.num_rows
    topk_lp = table["topk_logprobs"].to_pylist() if "topk_logprobs" in table.column_names else [None] * table.num_rows
    for i, pid in enumerate(table["prompt_id"].to_pylist()):
        ids, lp = topk_ids[i], topk_lp[i]
        out.append(
            {
                "prompt_id": pid,
                "input_ids": np.asarray(input_ids[i], dtype=np.int64),
                "prompt_len": int(table["prompt_len"][i].as_py()),
                "topk_ids": _ragged_to_array(ids, -1, np.int64),
                "topk_logprobs": _ragged_to_array(lp, -np.inf, np.float32),
            }
        )
    return out


def _ragged_to_array(values: list[list[float]] | None, fill: float, dtype) -> np.ndarray | None:
    if not values:
        return None
    width = max(len(v) for v in values)
    arr = np.full((len(values), width), fill, dtype=dtype)
    for i, v in enumerate(values):
        arr[i, : len(v)] = v
    return arr


class RowSource(Protocol):
    """One mixture component's rows for this rank, in an order fixed by (seed, epoch)."""

    def rows(self, epoch: int) -> Iterator[dict[str, Any]]: ...


class TableSource:
    """Rows from an in-memory Arrow table (the no-Ray path and tests)."""

    def __init__(self, table: pa.Table, seed: int, rank: int = 0, world_size: int = 1):
        keep = [rank_of(p, world_size) == rank for p in table["prompt_id"].to_pylist()]
        self.rows_list = rows_from_table(table.filter(pa.array(keep, type=pa.bool_())))
        self.seed = seed

    def rows(self, epoch: int) -> Iterator[dict[str, Any]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows_list))
        for i in order:
            yield self.rows_list[int(i)]


class MixtureStream:
    """Draw rows from components by weight; a component that runs out starts its next epoch.

    ``state()`` is JSON-able and describes the position after the last *taken* row: a peeked row
    that did not fit a batch is drawn again after a resume.
    """

    def __init__(self, sources: list[RowSource], weights: list[float], seed: int, state: dict[str, Any] | None = None):
        if not sources:
            raise ConfigError("empty mixture: no components to read from")
        self.sources = sources
        w = np.asarray(weights, dtype=np.float64)
        self.probs = w / w.sum()
        self.rng = np.random.default_rng(seed)
        self.epochs = [0] * len(sources)
        self.consumed = [0] * len(sources)
        if state:
            self.rng.bit_generator.state = state["rng"]
            self.epochs, self.consumed = list(state["epochs"]), list(state["consumed"])
        self._iters: list[Iterator | None] = [None] * len(sources)
        for i, skip in enumerate(self.consumed):
            self._iters[i] = self._open(i, skip)
        self._peeked: tuple[int, dict, dict] | None = None
        self.empty_components: set[int] = set()

    def _open(self, index: int, skip: int = 0) -> Iterator:
        it = self.sources[index].rows(self.epochs[index])
        for _ in range(skip):
            if next(it, None) is None:
                break
        return it

    def state(self) -> dict[str, Any]:
        if self._peeked is not None:
            return self._peeked[2]
        return self._state_now()

    def _state_now(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, "epochs": list(self.epochs), "consumed": list(self.consumed)}

    def peek(self) -> dict[str, Any]:
        if self._peeked is None:
            before = self._state_now()
            index = int(self.rng.choice(len(self.sources), p=self.probs))
            row = next(self._iters[index], None)
            if row is None:  # end of this component's epoch
                if self.consumed[index] == 0:
                    raise RaydistillError(
                        f"mixture component {index} has no rows on this worker; lower "
                        "train.workers or widen the component"
                    )
                self.epochs[index] += 1
                self.consumed[index] = 0
                self._iters[index] = self._open(index)
                row = next(self._iters[index])
            self.consumed[index] += 1
            self._peeked = (index, row, before)
        return self._peeked[1]

    def take(self) -> dict[str, Any]:
        row = self.peek()
        self._peeked = None
        return row


# ----------------------------------------------------------------------------- packing
@dataclasses.dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T], restarting at 0 for each packed row
    attention_mask: torch.Tensor  # [B, T] bool
    pred_index: torch.Tensor  # [N] flat index into B*T of the position that predicts each target
    targets: torch.Tensor  # [N] the teacher's completion tokens
    topk_ids: torch.Tensor | None  # [N, K] (-1 = no label)
    topk_logprobs: torch.Tensor | None  # [N, K] (-inf = no label)
    rows: int
    prompt_ids: list[str]

    @property
    def tokens(self) -> int:
        return int(self.targets.numel())

    def to(self, device: torch.device) -> PackedBatch:
        moved = {
            f.name: (v.to(device) if isinstance(v := getattr(self, f.name), torch.Tensor) else v)
            for f in dataclasses.fields(self)
        }
        return PackedBatch(**moved)


def _fits(row: dict[str, Any], seq_len: int) -> int:
    return min(len(row["input_ids"]), seq_len)


def next_batch(
    stream: Callable[[], dict[str, Any]], peek: Callable[[], dict[str, Any]], batch_size: int, seq_len: int
) -> list[list[dict[str, Any]]]:
    """Pack rows into ``batch_size`` sequences of at most ``seq_len`` tokens, taking them in stream order.

    Each row goes into the first sequence it fits (first fit), else starts the next sequence; the first
    row that fits no sequence once all ``batch_size`` are open is left in the stream for the next batch.
    A row longer than ``seq_len`` is truncated (it then fills a sequence alone). Rows are still taken in
    stream order, so a resumed stream packs the same batches; first fit only fills earlier sequences'
    gaps (the quickstart's mix of ~100-token answers and ~250-token human-text rows: 82% of positions
    filled instead of 77%).
    """
    sequences: list[list[dict[str, Any]]] = [[]]
    used = [0]
    while True:
        length = _fits(peek(), seq_len)
        target = next((i for i, u in enumerate(used) if u + length <= seq_len), None)
        if target is None:
            if len(sequences) == batch_size:
                return sequences
            sequences.append([])
            used.append(0)
            target = len(sequences) - 1
        sequences[target].append(stream())
        used[target] += length


def collate(
    sequences: list[list[dict[str, Any]]], seq_len: int, pad_id: int = 0, needs_soft_labels: bool = True
) -> PackedBatch:
    """Packed rows -> tensors. Only completion positions count: the prompt is masked."""
    bsz = len(sequences)
    input_ids = np.full((bsz, seq_len), pad_id, dtype=np.int64)
    positions = np.zeros((bsz, seq_len), dtype=np.int64)
    valid = np.zeros((bsz, seq_len), dtype=bool)
    pred, targets, ids_list, lp_list, prompt_ids = [], [], [], [], []
    width = 1
    for b, seq in enumerate(sequences):
        col = 0
        for row in seq:
            ids = row["input_ids"][: seq_len - col]
            n = len(ids)
            input_ids[b, col : col + n] = ids
            positions[b, col : col + n] = np.arange(n)
            valid[b, col : col + n] = True
            prompt_len = row["prompt_len"]
            # Completion token j sits at column col + prompt_len + j and is predicted one column earlier.
            completion = max(0, n - max(prompt_len, 1))
            first = max(prompt_len, 1)
            if completion:
                cols = np.arange(col + first, col + n)
                pred.append(b * seq_len + cols - 1)
                targets.append(ids[first:])
                offset = first - prompt_len  # 1 only when the prompt is empty
                if row["topk_ids"] is not None:
                    ids_list.append(row["topk_ids"][offset : offset + completion])
                    lp_list.append(row["topk_logprobs"][offset : offset + completion])
                    width = max(width, row["topk_ids"].shape[1])
                elif needs_soft_labels:
                    raise RaydistillError(
                        f"row {row['prompt_id']} has no soft labels but the stage's loss "
                        "needs them; use a ce-only stage or regenerate the data"
                    )
                else:
                    ids_list.append(np.full((completion, 1), -1, dtype=np.int64))
                    lp_list.append(np.full((completion, 1), -np.inf, dtype=np.float32))
            prompt_ids.append(row["prompt_id"])
            col += n
        # Padding continues the last row's positions so it never opens a new segment.
        if col < seq_len:
            last = positions[b, col - 1] if col else 0
            positions[b, col:] = last + 1 + np.arange(seq_len - col)
    n_total = sum(len(t) for t in targets)
    topk_ids = np.full((n_total, width), -1, dtype=np.int64)
    topk_lp = np.full((n_total, width), -np.inf, dtype=np.float32)
    at = 0
    for ids, lp in zip(ids_list, lp_list):
        topk_ids[at : at + len(ids), : ids.shape[1]] = ids
        topk_lp[at : at + len(lp), : lp.shape[1]] = lp
        at += len(ids)
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),
        position_ids=torch.from_numpy(positions),
        attention_mask=torch.from_numpy(valid),
        pred_index=torch.from_numpy(np.concatenate(pred) if pred else np.zeros(0, dtype=np.int64)),
        targets=torch.from_numpy(np.concatenate(targets) if targets else np.zeros(0, dtype=np.int64)),
        topk_ids=torch.from_numpy(topk_ids),
        topk_logprobs=torch.from_numpy(topk_lp),
        rows=sum(len(s) for s in sequences),
        prompt_ids=prompt_ids,
    )


# ----------------------------------------------------------------------------- validation (driver)
@dataclasses.dataclass
class DataSummary:
    data_dir: str
    files: list[str]
    rows: int
    heldout_rows: int
    train_rows: int
    completion_tokens: int
    soft_label_rows: int
    max_token_id: int
    stage_rows: list[list[int]]  # per stage, per component: training rows selected


def scan(data_dir: str, section: Any, vocab_size: int) -> DataSummary:
    """Read the light columns of every shard and check the data against the stages, before any worker starts."""
    from distill.data.shards import read_shards, shard_uris

    files = shard_uris(data_dir)
    if not files:
        raise RaydistillError(f"{data_dir} has no .parquet shards; run the generate stage first")
    columns = [
        "prompt_id",
        "input_ids",
        "completion_len",
        "topk_ids",
        "source",
        "quality",
        "finish_reason",
        "prompt",
        "messages",
    ]
    tables = []
    for uri in files:
        t = read_shards([uri], columns)
        tables.append(t.append_column("path", pa.array([uri] * t.num_rows, type=pa.string())))
    table = pa.concat_tables(tables, promote_options="permissive")
    if table.num_rows == 0:
        raise RaydistillError(f"{data_dir} holds no rows; check the generate/filter manifests")
    held = heldout_mask(table, section.heldout_fraction, section.seed)
    train = table.filter(pa.array(~held))
    if train.num_rows == 0:
        raise ConfigError(
            f"train.heldout_fraction={section.heldout_fraction} leaves no training rows out of "
            f"{table.num_rows}; lower it"
        )
    max_id = pc.max(pc.list_flatten(table["input_ids"])).as_py() or 0
    if max_id >= vocab_size:
        raise ConfigError(
            f"tokenizer/vocab mismatch: the data in {data_dir} has token id {max_id} but the student's "
            f"vocab_size is {vocab_size}; the student must use the teacher's tokenizer (set "
            "student.vocab_size to the teacher's, or regenerate the data with this teacher)"
        )
    has_labels = pc.fill_null(pc.greater(pc.list_value_length(table["topk_ids"]), 0), False)
    soft_rows = int(pc.sum(has_labels).as_py() or 0)
    completion_rows = int(pc.sum(pc.greater(table["completion_len"], 0)).as_py() or 0)
    stage_rows = []
    for s, stage in enumerate(section.stages):
        counts = []
        for c, component in enumerate(stage.mixture):
            mask = component_mask(train, component)
            count = int(mask.sum())
            if count == 0:
                sources = sorted(set(x for x in train["source"].to_pylist() if x))
                raise ConfigError(
                    f"train.stages[{s}] ({stage.name!r}) mixture[{c}] selects no training rows "
                    f"(source={component.source!r}, min_quality={component.min_quality!r}, files={component.files!r}, "
                    f"finish_reason={component.finish_reason!r}); "
                    f"sources in the data: {sources}"
                )
            if count < section.workers:
                raise ConfigError(
                    f"train.stages[{s}] mixture[{c}] selects {count} rows, fewer than "
                    f"train.workers={section.workers}; widen it or use fewer workers"
                )
            counts.append(count)
        loss = stage.loss
        needs = loss.forward_kl > 0 or loss.reverse_kl > 0 or loss.jsd > 0
        if needs and soft_rows < completion_rows:
            raise ConfigError(
                f"train.stages[{s}] ({stage.name!r}) uses a logit loss (forward_kl/reverse_kl/jsd) but "
                f"{completion_rows - soft_rows} of {completion_rows} rows in {data_dir} have no soft labels; "
                "regenerate with generate.logprobs > 0 or set this stage's loss to ce only"
            )
        stage_rows.append(counts)
    return DataSummary(
        data_dir=data_dir,
        files=files,
        rows=table.num_rows,
        heldout_rows=int(held.sum()),
        train_rows=train.num_rows,
        completion_tokens=int(pc.sum(table["completion_len"]).as_py() or 0),
        soft_label_rows=soft_rows,
        max_token_id=int(max_id),
        stage_rows=stage_rows,
    )


def read_table(files: list[str]) -> pa.Table:
    """All training columns of the shards plus their ``path`` (for ``files`` mixture components)."""
    from distill.data.shards import read_shards

    tables = []
    for uri in files:
        t = read_shards([uri], TRAIN_COLUMNS)
        tables.append(t.append_column("path", pa.array([uri] * t.num_rows, type=pa.string())))
    return pa.concat_tables(tables, promote_options="permissive")
