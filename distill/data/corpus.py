"""Human-written text labelled by the teacher: its soft labels on real English, nothing generated.

The teacher's answers teach the student the teacher's style; its distribution over text people
wrote teaches English at large (Minitron distils on the pretraining corpus for that reason). The
``corpus:`` section names such text: ``builtin: fortunes`` (Debian's ``fortunes`` package, every
file but the eval's) and/or ``path`` URIs. Each packed row is teacher-forced once
(:meth:`TeacherBackend.score` through a :class:`~distill.teacher.service.LabelService`, so every
backend works) and written beside the generated rows in the run's data with ``prompt_len = 1``:
the student learns the teacher's distribution at every later position.

Texts that share an n-gram with the builtin human eval corpus (the ``fortunes-min`` files) are
dropped before packing, so the eval's human-text bits per byte stay a measure of unseen text.
Corpus rows are never held out (:func:`distill.data.split.row_is_heldout`): the held-out split
measures the teacher's own text, and the eval corpora measure human text.

Legend: ``R`` packed rows, ``L_r`` tokens of row ``r`` (at most ``row_tokens``), ``k`` soft labels.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from typing import Any

from cluster import storage
from cluster.errors import ConfigError, RaydistillError
from distill.data import texts as text_files
from distill.data.dedup import words
from distill.data.filters import DecontaminationIndex
from distill.data.schema import CORPUS_SOURCE, prompt_id, to_table
from distill.data.section import CorpusSection, DataConfig

# Fortune files that are no English prose: pictures, and sayings in other languages.
NOT_PROSE = ("ascii-art", "translate-me")
BUILTIN_HINT = "install it with `apt-get install fortunes` (or `make corpus`), or set corpus.builtin: null"


def builtin_files(cc: CorpusSection) -> list[str]:
    """The fortune files ``builtin: fortunes`` reads: all but the eval's, non-prose and ``exclude``."""
    present = text_files.fortune_files()
    unknown = sorted(set(cc.exclude) - set(present))
    if unknown:
        raise ConfigError(
            f"corpus.exclude: {unknown} are not fortune files under {text_files.FORTUNES_DIR}; "
            f"the files there: {present}"
        )
    skip = set(text_files.EVAL_FORTUNE_FILES) | set(NOT_PROSE) | set(cc.exclude)
    files = [f for f in present if f not in skip]
    if not files:
        raise RaydistillError(
            f"corpus.builtin: fortunes: no fortune files under {text_files.FORTUNES_DIR}; {BUILTIN_HINT}"
        )
    return files


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def corpus_texts(cc: CorpusSection, resolve: Callable[[str], str] = lambda p: p) -> list[tuple[str, str]]:
    """``(name, text)`` of every configured text, in file order: fortune entries, .txt paragraphs, .jsonl texts."""
    out: list[tuple[str, str]] = []
    if cc.builtin == "fortunes":
        for name in builtin_files(cc):
            out.extend(("fortunes", t) for t in text_files.read_fortunes(name))
    for pattern in cc.path:
        resolved = resolve(pattern)
        matches = storage.expand(resolved)
        if not matches:
            raise RaydistillError(f"corpus.path: {pattern!r} matches no file; fix the glob or remove it")
        for uri in matches:
            name = uri.rstrip("/").rsplit("/", 1)[-1]
            for text in text_files.read_texts(uri, "corpus.path"):
                out.extend((name, p) for p in (_paragraphs(text) if not uri.endswith((".jsonl", ".json")) else [text]))
    return out


def eval_overlap_index(ngram: int, min_tokens: int) -> DecontaminationIndex:
    """N-grams of the builtin human eval corpus (the ``fortunes-min`` files present)."""
    index = DecontaminationIndex(ngram, min_tokens)
    for text in text_files.read_eval_fortunes():
        index.add_text(text)
    return index


def pack_rows(
    texts: list[tuple[str, str]], tokenizer: Any, row_tokens: int, budget: int | None, seed: int
) -> list[tuple[str, list[int]]]:
    """Shuffle, then pack texts (joined by a blank line) into ``(name, ids)`` rows of <= ``row_tokens`` tokens.

    A text longer than a row is cut into row-sized pieces. Rows are taken until ``budget`` tokens.
    Each row holds texts of one name (source).
    """
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    separator = tokenizer.encode("\n\n", add_special_tokens=False)
    open_rows: dict[str, list[int]] = {}
    rows: list[tuple[str, list[int]]] = []
    total = 0

    def close(name: str) -> None:
        nonlocal total
        ids = open_rows.pop(name, None)
        if ids and len(ids) >= 2:
            rows.append((name, ids))
            total += len(ids) - 1

    for i in order:
        name, text = texts[i]
        ids = tokenizer.encode(text, add_special_tokens=False)
        for start in range(0, len(ids), row_tokens):
            piece = ids[start : start + row_tokens]
            current = open_rows.get(name)
            if current is not None and len(current) + len(separator) + len(piece) > row_tokens:
                close(name)
                current = None
            open_rows[name] = piece if current is None else current + separator + piece
            if len(open_rows[name]) >= row_tokens:
                close(name)
        if budget is not None and total >= budget:
            break
    for name in list(open_rows):
        if budget is None or total < budget:
            close(name)
    return rows


def corpus_rows(cfg: DataConfig, tokenizer: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The corpus requests of a run (``prompt_id``, ``source``, ``input_ids``) and what was read and dropped."""
    cc = cfg.corpus
    texts = corpus_texts(cc, cfg.resolve_path)
    index = eval_overlap_index(cfg.filter.ngram, cfg.filter.decontaminate_min_tokens)
    kept = [(n, t) for n, t in texts if not index.matches(words(t))]
    stats: dict[str, Any] = {"texts": len(texts), "dropped_eval_overlap": len(texts) - len(kept)}
    if not kept:
        raise RaydistillError(f"corpus: all {len(texts)} texts overlap the eval corpus; give other texts")
    packed = pack_rows(kept, tokenizer, cc.row_tokens, cc.tokens, cc.seed)
    rows = []
    for name, ids in packed:
        source = f"{CORPUS_SOURCE}{name}"
        rows.append({"prompt_id": prompt_id(source, " ".join(map(str, ids)), 0), "source": source, "input_ids": ids})
    stats["rows"] = len(rows)
    stats["tokens"] = sum(len(r["input_ids"]) - 1 for r in rows)
    return rows, stats


def score_corpus(
    cfg: DataConfig,
    requests: list[dict[str, Any]],
    tokenizer: Any,
    write: Callable[[Any], None],
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Teacher-force ``requests`` on ``teacher.replicas`` labelling actors; ``write`` each finished table.

    Rows: prompt = the first token, completion = the rest, with the teacher's top-``generate.logprobs``
    labels at every completion position (``[L_r - 1, k]``).
    """
    from distill.teacher.service import LabelService

    if not requests:
        return {"new_rows": 0, "new_tokens": 0, "seconds": 0.0}
    t = cfg.teacher
    # Every core the replicas share, as the generate stage's actors use (Ray gives an actor 1 thread).
    threads = t.threads or max(1, (os.cpu_count() or 1) // t.replicas)
    service = LabelService(t, threads=threads)
    k = cfg.generate.logprobs
    chunk = t.batch_size * t.replicas
    started = time.perf_counter()
    new_tokens = 0
    try:
        teacher = service.teacher_name()
        for lo in range(0, len(requests), chunk):
            part = requests[lo : lo + chunk]
            labels = service.score([r["input_ids"] for r in part], [1] * len(part), k)
            rows = [_row(r, s, tokenizer, k, teacher) for r, s in zip(part, labels.scored)]
            write(to_table(rows, cfg.generate.logprob_dtype))
            new_tokens += labels.tokens
            if progress:
                progress(len(part), labels.tokens)
    finally:
        service.shutdown()
    seconds = time.perf_counter() - started
    return {"new_rows": len(requests), "new_tokens": new_tokens, "seconds": round(seconds, 2)}


def _row(request: dict[str, Any], scored: Any, tokenizer: Any, k: int, teacher: str) -> dict[str, Any]:
    import json

    ids = [int(i) for i in request["input_ids"]]
    return {
        "prompt_id": request["prompt_id"],
        "prompt": tokenizer.decode(ids[:1]),
        "messages": None,
        "completion": tokenizer.decode(ids[1:]),
        "input_ids": ids,
        "prompt_len": 1,
        "completion_len": len(ids) - 1,
        "topk_ids": scored.topk_ids.tolist(),
        "topk_logprobs": scored.topk_logprobs.tolist(),
        "teacher": teacher,
        "sampling": json.dumps({"scored": True, "logprobs": k}, sort_keys=True),
        "finish_reason": "stop",
        "quality": None,
        "source": request["source"],
    }
