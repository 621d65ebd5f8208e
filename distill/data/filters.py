"""Data-quality filters for generated rows (the ``filter`` stage's logic, plain pyarrow).

``apply_filters(table, cfg)`` returns the kept rows (sorted by ``prompt_id``, same schema) and an
ordered ``{filter name: rows dropped}``. Filters run in this order, each seeing only the rows the
previous ones kept, so every drop is counted once, under the first filter that hit it:

==================  ==========================================================================
``duplicate_id``    a ``prompt_id`` seen before (always on; generation should never emit one)
``empty``           completion null or whitespace only (always on)
``truncated``       ``finish_reason == "length"`` (``drop_truncated``)
``length``          ``completion_len`` outside [``min_completion_tokens``, ``max_completion_tokens``]
``repetitive``      share of repeated word 4-grams in the completion > ``max_repetition`` (< 1)
``quality``         judge score < ``min_quality``; rows without a score are dropped too when
                    ``min_quality`` is set (they were never judged), and a table with no scores at
                    all is an error (``generate.judge`` was off); corpus rows (human text the
                    teacher scored, ``source`` ``corpus:*``) are not judged and pass
``decontaminated``  prompt or completion shares an ``ngram``-token sequence with the eval sets in
                    ``decontaminate``; eval items shorter than ``ngram`` tokens but at least
                    ``decontaminate_min_tokens`` long must appear whole
``exact_dup``       same normalised (prompt, completion) as a kept row (``dedup``: exact|minhash)
``near_dup``        MinHash Jaccard >= ``minhash_threshold`` on prompt *and* completion word
                    3-grams against a kept row (``dedup: minhash``)
==================  ==========================================================================

Disabled filters do not appear in the counts. Dedup runs last so it chooses among good rows only;
of a duplicate group the row with the smallest ``prompt_id`` is kept, so results are deterministic.
Tokens everywhere are :func:`distill.data.dedup.words`: NFKC, lowercase, punctuation stripped.
"""

from __future__ import annotations

import io
import json
import posixpath
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cluster import storage
from cluster.errors import RaydistillError
from distill.data.dedup import NearDuplicateIndex, exact_key, words
from distill.data.schema import is_corpus_source
from distill.data.section import DedupMode, FilterSection

REPETITION_NGRAM = 4
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".zstd")
EVAL_FORMATS = ".jsonl, .json, .parquet, .csv or .txt (optionally .gz/.zst compressed)"


# --------------------------------------------------------------------------- text helpers


def repetition_share(tokens: list[str], n: int = REPETITION_NGRAM) -> float:
    """Share of word n-gram occurrences that repeat an earlier one (0 = none, ->1 = a loop)."""
    total = len(tokens) - n + 1
    if total <= 1:
        return 0.0
    distinct = len({tuple(tokens[i : i + n]) for i in range(total)})
    return (total - distinct) / total


def prompt_text(prompt: str | None, messages: list[dict[str, Any]] | None) -> str:
    if prompt is not None:
        return prompt
    return "\n".join((m or {}).get("content") or "" for m in (messages or []))


# --------------------------------------------------------------------------- decontamination


class DecontaminationIndex:
    """N-grams of an eval set; ``matches(tokens)`` says whether a text shares one with it."""

    def __init__(self, ngram: int = 13, min_tokens: int = 8):
        self.ngram = int(ngram)
        self.min_tokens = min(int(min_tokens), self.ngram)
        self._grams: dict[int, set[int]] = {}  # length -> hashes of token tuples of that length
        self.items = 0

    def add_text(self, text: str) -> bool:
        tokens = words(text)
        if len(tokens) < self.min_tokens:
            return False
        n = min(self.ngram, len(tokens))
        grams = self._grams.setdefault(n, set())
        grams.update(hash(tuple(tokens[i : i + n])) for i in range(len(tokens) - n + 1))
        self.items += 1
        return True

    def __len__(self) -> int:
        return self.items

    def matches(self, tokens: list[str]) -> bool:
        for n, grams in self._grams.items():
            if len(tokens) >= n and any(hash(tuple(tokens[i : i + n])) in grams for i in range(len(tokens) - n + 1)):
                return True
        return False


def _strings(obj: Any) -> Iterator[str]:
    """Every string value inside nested lists/dicts (dict keys are field names, not text)."""
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _strings(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _strings(value)


def _table_strings(table: pa.Table) -> Iterator[str]:
    for column in table.columns:
        t = column.type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            yield from (v for v in column.to_pylist() if v is not None)
        elif pa.types.is_nested(t):
            yield from _strings(column.to_pylist())


def _format_of(uri: str) -> tuple[str, str | None]:
    name = posixpath.basename(uri.rstrip("/")).lower()
    compression = None
    for ext in _COMPRESSIONS:
        if name.endswith(ext):
            compression = "infer"
            name = name[: -len(ext)]
            break
    return posixpath.splitext(name)[1], compression


def read_eval_texts(uri: str) -> Iterator[str]:
    """Strings of one eval file: JSONL/JSON (all string values), Parquet/CSV (all string columns),
    anything else as plain text (the whole file, and each line)."""
    import fsspec

    ext, compression = _format_of(uri)
    if ext == ".parquet":
        import pyarrow.parquet as pq

        fs, path = storage.filesystem(uri)
        yield from _table_strings(pq.read_table(path, filesystem=fs))
        return
    with fsspec.open(uri, "rb", compression=compression) as handle:
        data = handle.read()
    if ext == ".csv":
        import pyarrow.csv as pcsv

        yield from _table_strings(pcsv.read_csv(io.BytesIO(data)))
        return
    text = data.decode("utf-8")
    if ext in (".jsonl", ".ndjson", ".json"):
        if ext == ".json":
            try:
                yield from _strings(json.loads(text))
                return
            except json.JSONDecodeError:
                pass  # JSON Lines under a .json name
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    yield from _strings(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"line {lineno} is not valid JSON ({exc.msg})") from None
        return
    # Plain text: the whole file (n-grams may span wrapped lines), and each line as an item of its
    # own so that short one-item-per-line entries can still match whole.
    yield text
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1:
        yield from lines


def _expand(uri: str) -> list[str]:
    if any(ch in uri for ch in "*?["):
        return storage.glob(uri)
    fs, path = storage.filesystem(uri)
    if fs.isdir(path):
        return [u for u in storage.listdir(uri) if not fs.isdir(storage.filesystem(u)[1])]
    return [uri]


def build_decontamination_index(uris: Iterable[str], ngram: int = 13, min_tokens: int = 8) -> DecontaminationIndex:
    """Load every eval set; unreadable, missing or text-free ones raise with the file and the fix."""
    index = DecontaminationIndex(ngram, min_tokens)
    fix = "fix the URI in filter.decontaminate (local path, s3://, gs://, memory://; globs allowed) or remove it"
    for uri in uris:
        try:
            files = _expand(uri)
        except RaydistillError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported with the URI
            raise RaydistillError(f"filter.decontaminate: cannot open eval set {uri!r} ({exc}); {fix}") from exc
        if not files:
            raise RaydistillError(f"filter.decontaminate: eval set {uri!r} matches no file; {fix}")
        for file in files:
            before = len(index)
            try:
                for text in read_eval_texts(file):
                    index.add_text(text)
            except FileNotFoundError as exc:
                raise RaydistillError(f"filter.decontaminate: eval set file {file!r} not found; {fix}") from exc
            except Exception as exc:  # noqa: BLE001 - reported with the file
                raise RaydistillError(
                    f"filter.decontaminate: cannot read eval set file {file!r} ({type(exc).__name__}: {exc}); "
                    f"supported formats: {EVAL_FORMATS}"
                ) from exc
            if len(index) == before:
                raise RaydistillError(
                    f"filter.decontaminate: eval set file {file!r} holds no text of at least "
                    f"{index.min_tokens} words; check that it is the right file ({EVAL_FORMATS}) or remove it"
                )
    return index


# --------------------------------------------------------------------------- the filters


class _Rows:
    """Lazy per-row Python views of the columns the text filters need."""

    def __init__(self, table: pa.Table):
        self.table = table
        self._cols: dict[str, list] = {}
        self._pwords: dict[int, list[str]] = {}
        self._cwords: dict[int, list[str]] = {}

    def col(self, name: str) -> list:
        if name not in self._cols:
            self._cols[name] = self.table.column(name).to_pylist()
        return self._cols[name]

    def prompt_words(self, i: int) -> list[str]:
        if i not in self._pwords:
            self._pwords[i] = words(prompt_text(self.col("prompt")[i], self.col("messages")[i]))
        return self._pwords[i]

    def completion_words(self, i: int) -> list[str]:
        if i not in self._cwords:
            self._cwords[i] = words(self.col("completion")[i])
        return self._cwords[i]


def _completion_lengths(table: pa.Table) -> np.ndarray:
    lengths = table.column("completion_len")
    fallback = pc.list_value_length(table.column("topk_ids"))
    return pc.fill_null(pc.coalesce(lengths, pc.cast(fallback, lengths.type)), 0).to_numpy(zero_copy_only=False)


def apply_filters(
    table: pa.Table, cfg: FilterSection, decontamination: DecontaminationIndex | None = None
) -> tuple[pa.Table, dict[str, int]]:
    """Filter generated rows; returns (kept rows sorted by prompt_id, ordered drop counts).

    ``decontamination`` is a prebuilt index; when None and ``cfg.decontaminate`` is set, it is
    built from those URIs first (so a bad eval set fails before any work).
    """
    if decontamination is None and cfg.decontaminate:
        decontamination = build_decontamination_index(cfg.decontaminate, cfg.ngram, cfg.decontaminate_min_tokens)

    if table.num_rows:
        table = table.take(pc.sort_indices(table, sort_keys=[("prompt_id", "ascending")]))
    n = table.num_rows
    keep = np.ones(n, dtype=bool)
    dropped: dict[str, int] = {}
    rows = _Rows(table)

    def drop(name: str, mask: np.ndarray | None = None, predicate=None) -> None:
        if predicate is not None:
            mask = np.zeros(n, dtype=bool)
            for i in np.flatnonzero(keep):
                mask[i] = predicate(int(i))
        hit = mask & keep
        dropped[name] = int(hit.sum())
        keep[hit] = False

    ids = rows.col("prompt_id")
    seen: set = set()
    dup_ids = np.zeros(n, dtype=bool)
    for i, pid in enumerate(ids):
        dup_ids[i] = pid in seen
        seen.add(pid)
    drop("duplicate_id", dup_ids)

    drop("empty", predicate=lambda i: not (rows.col("completion")[i] or "").strip())

    if cfg.drop_truncated:
        reason = pc.fill_null(pc.equal(table.column("finish_reason"), "length"), False)
        drop("truncated", reason.to_numpy(zero_copy_only=False))

    if cfg.min_completion_tokens > 0 or cfg.max_completion_tokens is not None:
        lengths = _completion_lengths(table)
        bad = lengths < cfg.min_completion_tokens
        if cfg.max_completion_tokens is not None:
            bad |= lengths > cfg.max_completion_tokens
        drop("length", bad)

    if cfg.max_repetition < 1:
        drop("repetitive", predicate=lambda i: repetition_share(rows.completion_words(i)) > cfg.max_repetition)

    if cfg.min_quality is not None:
        quality = table.column("quality")
        # Human text the teacher scored (corpus rows) is no answer to judge: the filter passes it.
        judged = keep & ~np.array([is_corpus_source(s) for s in rows.col("source")], dtype=bool)
        if judged.any() and quality.filter(pa.array(judged)).null_count == int(judged.sum()):
            raise RaydistillError(
                f"filter.min_quality is {cfg.min_quality} but no generated row has a judge score (quality "
                "is null); set generate.judge: true and regenerate, or set filter.min_quality: null"
            )
        low = pc.fill_null(pc.less(quality, cfg.min_quality), True)  # unscored rows are dropped
        drop("quality", low.to_numpy(zero_copy_only=False) & judged)

    if decontamination is not None and len(decontamination):
        drop(
            "decontaminated",
            predicate=lambda i: (
                decontamination.matches(rows.prompt_words(i)) or decontamination.matches(rows.completion_words(i))
            ),
        )

    dedup = DedupMode(cfg.dedup)
    if dedup in (DedupMode.exact, DedupMode.minhash):
        keys: set[bytes] = set()

        def exact_dup(i: int) -> bool:
            key = exact_key(rows.prompt_words(i), rows.completion_words(i))
            if key in keys:
                return True
            keys.add(key)
            return False

        drop("exact_dup", predicate=exact_dup)

    if dedup is DedupMode.minhash:
        index = NearDuplicateIndex(cfg.minhash_threshold, cfg.num_perm)
        drop("near_dup", predicate=lambda i: index.check_and_add(rows.prompt_words(i), rows.completion_words(i)))

    return table.filter(pa.array(keep)), dropped


def summarize_drops(dropped: dict[str, int]) -> str:
    """One line for logs and the CLI: ``empty=2 truncated=5 near_dup=1``."""
    return " ".join(f"{name}={count}" for name, count in dropped.items()) or "(no filters)"


__all__ = [
    "DecontaminationIndex",
    "apply_filters",
    "build_decontamination_index",
    "read_eval_texts",
    "repetition_share",
    "summarize_drops",
]
