"""Prompt sources for the generate stage.

Each source yields *requests*: ``{prompt_id, prompt, messages, source}``. ``messages`` (chat) is
rendered with the teacher's chat template; a request with only ``prompt`` is fed verbatim.

* ``file``: JSONL / Parquet / CSV files (fsspec URIs, globs) with a ``prompt`` or ``messages`` column;
* ``self_instruct``: the teacher writes one task per seed topic (shipped list), then answers it;
  what it writes is cleaned (:mod:`distill.data.instructions`: wrappers unwrapped, echoes of the
  assistant and non-tasks dropped, counted by reason) and it is asked again, at most
  ``MAX_INSTRUCTION_ROUNDS`` rounds, until ``prompts.count`` prompts are kept;
* ``magpie``: the teacher is fed its own chat-template prefix up to the user turn, so it writes the
  question itself (Magpie, Xu et al. 2024), then answers it;
* ``served_prompts``: the serving prompt log (the data flywheel of the pipelines issue).

Sources that ask the teacher to write instructions store them under ``data/prompts/`` on first use,
so a rerun of the same run sees the same prompts (and so the same prompt ids).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import random
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from cluster import storage
from cluster.errors import ConfigError, RaydistillError
from distill.data.instructions import InstructionFilter
from distill.data.schema import prompt_id
from distill.data.section import DataConfig, PromptSource
from distill.teacher.base import SamplingParams

log = logging.getLogger(__name__)
# Rounds of asking the teacher for instructions until prompts.count clean ones (self_instruct, magpie).
MAX_INSTRUCTION_ROUNDS = 4
DEFAULT_TOPICS = os.path.join(os.path.dirname(__file__), "seed_topics.txt")
INSTRUCTION_TEMPLATE = (
    "Write one clear, self-contained question or task that a user might ask an AI "
    "assistant about: {topic}. Reply with the question or task only, nothing else."
)
# (requests, sampling) -> rows with at least prompt_id, completion, finish_reason, skip_reason
TeacherRunner = Callable[[list[dict[str, Any]], SamplingParams], list[dict[str, Any]]]


def _read_table(uri: str) -> pa.Table:
    data = storage.read_bytes(uri)
    if not data.strip():
        raise RaydistillError(f"prompt file {uri} is empty; add rows or fix prompts.path")
    lower = uri.lower()
    try:
        if lower.endswith((".jsonl", ".json", ".ndjson")):
            rows = []
            for line_no, line in enumerate(data.decode("utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise RaydistillError(f"{uri}:{line_no}: not valid JSON ({exc.msg})") from None
            return pa.Table.from_pylist(rows)
        if lower.endswith(".parquet"):
            return pq.read_table(io.BytesIO(data))
        if lower.endswith((".csv", ".tsv")):
            opts = pacsv.ParseOptions(delimiter="\t" if lower.endswith(".tsv") else ",")
            return pacsv.read_csv(io.BytesIO(data), parse_options=opts)
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise RaydistillError(f"cannot parse prompt file {uri}: {exc}") from None
    raise RaydistillError(f"prompt file {uri}: unsupported extension; use .jsonl, .parquet or .csv")


def _normalise_messages(value: Any, where: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RaydistillError(f"{where}: `messages` is a string but not JSON") from None
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    ):
        raise RaydistillError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects")
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in value]


def read_prompt_files(cfg: DataConfig) -> list[dict[str, Any]]:
    """Requests from ``prompts.path`` (one or more URIs/globs); rows without text are skipped."""
    pc = cfg.prompts
    if not pc.path:
        raise ConfigError("prompts.path: required when prompts.source is 'file' (a JSONL/Parquet/CSV URI or glob)")
    patterns = [pc.path] if isinstance(pc.path, str) else list(pc.path)
    files: list[str] = []
    for pattern in patterns:
        resolved = cfg.resolve_path(pattern)
        matches = storage.expand(resolved)
        if not matches:
            raise RaydistillError(f"prompts.path: {pattern!r} matches no file")
        for match in matches:
            if not storage.exists(match):
                raise RaydistillError(f"prompts.path: {match} does not exist")
        files.extend(matches)
    out: list[dict[str, Any]] = []
    for uri in files:
        table = _read_table(uri)
        columns = table.column_names
        has_prompt, has_messages = pc.prompt_column in columns, pc.messages_column in columns
        if not (has_prompt or has_messages or pc.raw_column in columns):
            raise RaydistillError(
                f"{uri}: no {pc.prompt_column!r}, {pc.messages_column!r} or {pc.raw_column!r} column (found "
                f"{columns}); rename the column or set prompts.prompt_column"
            )
        tag = f"file:{os.path.basename(uri)}"
        for row_no, row in enumerate(table.to_pylist(), 1):
            messages = row.get(pc.messages_column) if has_messages else None
            text = row.get(pc.prompt_column) if has_prompt else None
            if text is not None and not str(text).strip():
                text = None  # a blank cell: CSV readers give "" where JSONL has no key
            raw = row.get(pc.raw_column)
            if raw is not None and str(raw).strip() and not messages and text is None:
                out.append(_request(pc, tag, raw=str(raw)))
                continue
            if messages:
                messages = _normalise_messages(messages, f"{uri} row {row_no}")
            elif text is None:
                continue  # counted by the caller as an empty prompt
            out.append(_request(pc, tag, text=None if messages else str(text), messages=messages or None))
    return out


def _request(
    pc: Any, source: str, text: str | None = None, messages: list | None = None, raw: str | None = None
) -> dict[str, Any]:
    """A chat request for user ``text`` (or given ``messages``), or a raw-prefix request (``raw``)."""
    if raw is not None:
        return {"prompt": raw, "messages": None, "source": source}
    if messages is None:
        messages = ([{"role": "system", "content": pc.system_prompt}] if pc.system_prompt else []) + [
            {"role": "user", "content": text}
        ]
    user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), text)
    return {"prompt": user, "messages": messages, "source": source}


def expand_samples(requests: list[dict[str, Any]], samples: int, count: int | None) -> tuple[list[dict[str, Any]], int]:
    """Dedup by id, cap at ``count`` prompts, then ``samples`` rows per prompt; returns (rows, dropped dups)."""
    seen: set[str] = set()
    unique = []
    for req in requests:
        key = prompt_id(req["source"], req["messages"] or req["prompt"], 0)
        if key not in seen:
            seen.add(key)
            unique.append(req)
    dropped = len(requests) - len(unique)
    if count is not None:
        unique = unique[:count]
    rows = []
    for req in unique:
        for index in range(samples):
            body = req["messages"] or req["prompt"]
            rows.append({**req, "prompt_id": prompt_id(req["source"], body, index), "sample_index": index})
    return rows, dropped


def _load_topics(cfg: DataConfig) -> list[str]:
    uri = cfg.resolve_path(cfg.prompts.topics_path) if cfg.prompts.topics_path else DEFAULT_TOPICS
    lines = [ln.strip() for ln in storage.read_text(uri).splitlines()]
    topics = [ln for ln in lines if ln and not ln.startswith("#")]
    if not topics:
        raise RaydistillError(f"prompts.topics_path: {uri} has no topics (one per line)")
    return topics


def magpie_prefix(tokenizer: Any, system_prompt: str | None = None) -> str:
    """The chat template rendered up to where the user's text would start."""
    marker = "\x00MAGPIE\x00"
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": marker}
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    if marker not in rendered:
        raise ConfigError("prompts.source=magpie: the teacher's chat template does not render the user text")
    return rendered.split(marker, 1)[0]


def _written_instructions(
    run_dir: str, kind: str, make: Callable[[], tuple[list[str], dict[str, Any]]]
) -> tuple[list[str], dict[str, Any]]:
    """Instructions the teacher wrote and their cleaning stats, stored once per run so reruns reuse them.

    ``data/prompts/{kind}.jsonl`` holds the kept instructions, ``{kind}.stats.json`` the counts
    (absent for runs written before cleaning existed: their stats are ``{}``).
    """
    uri = storage.join(run_dir, "data", "prompts", f"{kind}.jsonl")
    stats_uri = storage.join(run_dir, "data", "prompts", f"{kind}.stats.json")
    if storage.exists(uri):
        stored = [json.loads(line)["instruction"] for line in storage.read_text(uri).splitlines() if line.strip()]
        return stored, (storage.read_json(stats_uri) if storage.exists(stats_uri) else {})
    instructions, stats = make()
    if instructions:  # nothing usable is an error the caller raises; a rerun asks again
        storage.atomic_write_json(stats_uri, stats)
        storage.atomic_write_text(uri, "".join(json.dumps({"instruction": i}) + "\n" for i in instructions))
    return instructions, stats


def write_instructions(
    pc: Any,
    teacher: TeacherRunner,
    count: int,
    seeds_for_round: Callable[[int, int], list],
    max_rounds: int | None = None,
) -> tuple[list[str], dict[str, Any]]:
    """Ask the teacher for instructions until ``count`` clean ones (at most ``max_rounds`` rounds).

    ``seeds_for_round(round, n)`` gives ``n`` writing requests. Round 0 asks for ``count``; later
    rounds ask for twice what is missing (drops are common with a small teacher). Returns the
    kept instructions (at most ``count``) and ``{"requested", "asked", "kept", "rounds",
    "dropped": {reason: n}, "short_by"}``.
    """
    max_rounds = MAX_INSTRUCTION_ROUNDS if max_rounds is None else max_rounds
    found = InstructionFilter()
    rounds = 0
    next_index = 0
    while len(found.kept) < count and rounds < max_rounds:
        missing = count - len(found.kept)
        seeds = seeds_for_round(rounds, missing if rounds == 0 else 2 * missing)
        for seed in seeds:  # identical seed prompts must still be distinct requests
            seed["prompt_id"] = prompt_id(seed["source"], seed["messages"] or seed["prompt"], next_index)
            next_index += 1
        params = SamplingParams(max_new_tokens=64, temperature=0.9, top_p=0.95, logprobs=1, seed=pc.seed + rounds)
        for row in teacher(seeds, params):
            if row.get("skip_reason"):
                found.asked += 1
                found.dropped["teacher_skipped"] = found.dropped.get("teacher_skipped", 0) + 1
            else:
                found.add(row.get("completion"), row.get("finish_reason"))
        rounds += 1
    kept = found.kept[:count]
    stats = {
        "requested": count,
        "asked": found.asked,
        "kept": len(kept),
        "rounds": rounds,
        "dropped": dict(sorted(found.dropped.items())),
        "short_by": count - len(kept),
    }
    if stats["short_by"]:
        log.warning(
            "prompts: the teacher wrote %d of %d usable instructions in %d rounds (dropped %s)",
            len(kept),
            count,
            rounds,
            stats["dropped"],
        )
    return kept, stats


def build_requests(
    cfg: DataConfig,
    run_dir: str,
    teacher: TeacherRunner | None = None,
    tokenizer: Any = None,
    cleaning: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """All requests of this run (before resume filtering) and counts of prompts dropped, by reason.

    For sources the teacher writes (self_instruct, magpie), ``cleaning`` (a dict, if given) is
    filled with the instruction cleaning stats of :func:`write_instructions`.
    """
    pc = cfg.prompts
    dropped: dict[str, int] = {}
    if pc.source == PromptSource.file:
        requests = read_prompt_files(cfg)
    elif pc.source in (PromptSource.self_instruct, PromptSource.magpie):
        if teacher is None:
            raise RaydistillError(f"prompts.source={pc.source.value} needs a running teacher")
        count = pc.count or 64
        if pc.source == PromptSource.self_instruct:
            topics = _load_topics(cfg)

            def seeds_for_round(round_no: int, n: int) -> list[dict[str, Any]]:
                rng = random.Random(pc.seed if round_no == 0 else f"{pc.seed}:{round_no}")
                start = 0 if round_no == 0 else rng.randrange(len(topics))
                picks = [topics[(start + i) % len(topics)] for i in range(n)]
                rng.shuffle(picks)
                return [_request(pc, "self_instruct_seed", text=INSTRUCTION_TEMPLATE.format(topic=t)) for t in picks]
        else:
            if tokenizer is None:
                raise RaydistillError("prompts.source=magpie needs the teacher's tokenizer")
            prefix = magpie_prefix(tokenizer, pc.system_prompt)

            def seeds_for_round(round_no: int, n: int) -> list[dict[str, Any]]:
                return [_request(pc, "magpie_seed", raw=prefix) for _ in range(n)]

        instructions, cleaning_stats = _written_instructions(
            run_dir, pc.source.value, lambda: write_instructions(pc, teacher, count, seeds_for_round)
        )
        if cleaning is not None:
            cleaning.update(cleaning_stats)
        requests = [_request(pc, pc.source.value, text=i) for i in instructions if i]
        if not requests:
            raise RaydistillError(
                f"prompts.source={pc.source.value}: the teacher wrote no usable prompt in "
                f"{cleaning_stats.get('rounds')} rounds ({cleaning_stats.get('asked')} asked; dropped "
                f"{cleaning_stats.get('dropped')}); use a stronger teacher (teacher.model) or prompts.source=file"
            )
        if len(requests) < count:
            dropped["missing_prompts"] = count - len(requests)
    elif pc.source == PromptSource.served_prompts:
        requests = served_prompt_requests(cfg, run_dir)
    else:  # pragma: no cover - enum is exhaustive
        raise ConfigError(f"prompts.source: unknown {pc.source}")
    rows, dups = expand_samples(requests, pc.samples_per_prompt, pc.count)
    if dups:
        dropped["duplicate_prompt"] = dups
    if not rows:
        raise RaydistillError(f"prompts: source {pc.source.value} produced no prompts; check prompts.path/count")
    return rows, dropped


# ----------------------------------------------------------------------------- served_prompts
SERVED_SOURCE = "served_prompts"
_SUCCESSFUL_RUN = ("done", "refused")  # run statuses whose generate stage consumed the log


def _parse_time(value: Any) -> dt.datetime | None:
    if not value:
        return None
    parsed = dt.datetime.fromisoformat(str(value))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def prompt_log_files(uri: str) -> list[str]:
    """Parquet files of the serving prompt log: a folder (searched recursively), a glob or one file."""
    if any(c in uri for c in "*?["):
        files = storage.glob(uri)
    else:
        fs, path = storage.filesystem(uri)
        if not fs.exists(path):
            return []
        if fs.isfile(path):
            return [uri]
        found = fs.find(path)
        files = found if storage.is_local(uri) else [fs.unstrip_protocol(f) for f in found]
    return sorted(f for f in files if f.endswith(".parquet") and not os.path.basename(f).startswith(storage.TMP_PREFIX))


def read_served_log(uri: str, since: dt.datetime | None = None, files: list[str] | None = None) -> pa.Table:
    """Rows of the prompt log with ``ts > since`` (all when None), sorted by ``ts``, from ``files`` (default:
    every :func:`prompt_log_files` file). A ``_file`` column names each row's file."""
    import pyarrow.compute as pc

    columns = ["ts", "endpoint", "prompt", "messages"]
    tables = []
    for f in prompt_log_files(uri) if files is None else files:
        fs, path = storage.filesystem(f)
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle, columns=columns)
        if since is not None and table.num_rows:
            table = table.filter(pc.greater(table["ts"], pa.scalar(since, type=table.schema.field("ts").type)))
        tables.append(table.append_column("_file", pa.array([f] * table.num_rows, pa.string())))
    if not tables:
        return pa.table({**{c: [] for c in columns}, "_file": pa.array([], pa.string())})
    return pa.concat_tables(tables, promote_options="default").sort_by("ts")


def _earlier_runs(cfg: DataConfig, run_dir: str) -> list[str]:
    from cluster.runs import list_runs, runs_root

    root = runs_root(cfg)
    this = run_dir.rstrip("/").rsplit("/", 1)[-1]
    return [storage.join(root, r) for r in list_runs(cfg) if r != this]


def served_log_position(cfg: DataConfig, run_dir: str) -> tuple[dt.datetime | None, set[str]]:
    """Where the log is read from: ``(since, consumed files)``.

    The log is consumed by file: a file is immutable once written (one atomic flush), so the files the
    successful earlier runs read completely are skipped and every other file is read whole, whatever
    the timestamps of its rows (a row still in an ingress buffer while a run read the log lands in a
    later file and is read by the next run). ``since`` only comes from runs that predate file
    tracking (their window's ``until``, else their start), or, with no earlier run at all, from the
    currently served model's promotion time; None = no time filter.
    """
    from cluster.runs import runs_root

    marks = []
    consumed: set[str] = set()
    any_run = False
    for run in _earlier_runs(cfg, run_dir):
        manifest_uri = storage.join(run, "manifest.json")
        if not storage.exists(manifest_uri):
            continue
        manifest = storage.read_json(manifest_uri)
        if manifest.get("status") not in _SUCCESSFUL_RUN:
            continue
        any_run = True
        window_uri = storage.join(run, "data", "prompts", "served_prompts.json")
        window = storage.read_json(window_uri) if storage.exists(window_uri) else {}
        if "consumed" in window:
            consumed.update(window["consumed"])
            continue
        mark = _parse_time(window.get("until")) or _parse_time(manifest.get("created_at"))
        if mark:
            marks.append(mark)
    if marks:
        return max(marks), consumed
    if any_run:
        return None, consumed
    registry_uri = storage.join(runs_root(cfg), "serving.json")
    if storage.exists(registry_uri):
        return _parse_time((storage.read_json(registry_uri).get("current") or {}).get("promoted_at")), consumed
    return None, consumed


def served_log_since(cfg: DataConfig, run_dir: str) -> dt.datetime | None:
    """The time filter of :func:`served_log_position` (kept for callers that only need it)."""
    return served_log_position(cfg, run_dir)[0]


def used_prompt_ids(cfg: DataConfig, run_dir: str) -> set[str]:
    """Prompt ids already in earlier runs' ``data/generate`` shards."""
    used: set[str] = set()
    for run in _earlier_runs(cfg, run_dir):
        for shard in storage.listdir(storage.join(run, "data", "generate"), ".parquet"):
            fs, path = storage.filesystem(shard)
            with fs.open(path, "rb") as handle:
                used.update(pq.read_table(handle, columns=["prompt_id"]).column("prompt_id").to_pylist())
    return used


def served_prompt_requests(cfg: DataConfig, run_dir: str) -> list[dict[str, Any]]:
    """Requests from the serving prompt log since the last successful run, minus prompts already used.

    The selection is stored in ``data/prompts/served_prompts.jsonl`` (+ ``.json`` with the window) on
    first use, so a resumed run sees the same prompts (and prompt ids) however the log has grown.
    When ``prompts.count`` caps the selection, the window ends at the last row taken, so the next
    round starts with the rest.
    """
    pc = cfg.prompts
    stored = storage.join(run_dir, "data", "prompts", "served_prompts.jsonl")
    if storage.exists(stored):
        return [json.loads(line) for line in storage.read_text(stored).splitlines() if line.strip()]
    log_uri = pc.path or getattr(cfg.serve, "prompt_log", None)
    if isinstance(log_uri, list):
        if len(log_uri) != 1:
            raise ConfigError("prompts.path: served_prompts reads one prompt log URI, got a list")
        log_uri = log_uri[0]
    if not log_uri:
        raise ConfigError(
            "prompts.source=served_prompts needs the prompt log: set prompts.path (or serve.prompt_log) "
            "to the folder the server logs prompts to (serve.prompt_log_enabled: true)"
        )
    log_uri = cfg.resolve_path(log_uri)
    read_at = dt.datetime.now(dt.timezone.utc)
    since, consumed = served_log_position(cfg, run_dir)
    read_files = [f for f in prompt_log_files(log_uri) if f not in consumed]  # listed once: files added
    table = read_served_log(log_uri, since, files=read_files)  # later wait for the next run
    used = used_prompt_ids(cfg, run_dir)
    requests: list[dict[str, Any]] = []
    seen: set[str] = set()
    counts = {"rows": table.num_rows, "already_used": 0, "duplicate": 0, "empty": 0}
    until = read_at
    rows = table.to_pylist()
    per_file: dict[str, int] = {}
    for row in rows:
        per_file[row["_file"]] = per_file.get(row["_file"], 0) + 1
    considered: dict[str, int] = {}
    for row in rows:
        considered[row["_file"]] = considered.get(row["_file"], 0) + 1
        messages = row.get("messages")
        text = row.get("prompt")
        endpoint = str(row.get("endpoint") or "")
        if messages and any(m.get("content") and str(m["content"]).strip() for m in messages):
            req = _request(pc, SERVED_SOURCE, messages=_normalise_messages(messages, f"{log_uri} request"))
        elif not messages and text and str(text).strip():
            # /v1/completions prompts were fed verbatim; anything else is a user message.
            req = (
                _request(pc, SERVED_SOURCE, raw=str(text))
                if "chat" not in endpoint
                else _request(pc, SERVED_SOURCE, text=str(text))
            )
        else:
            counts["empty"] += 1
            continue
        key = prompt_id(SERVED_SOURCE, req["messages"] or req["prompt"], 0)
        if key in used:
            counts["already_used"] += 1
            continue
        if key in seen:
            counts["duplicate"] += 1
            continue
        seen.add(key)
        requests.append(req)
        if pc.count is not None and len(requests) >= pc.count:
            until = row["ts"] if row["ts"].tzinfo else row["ts"].replace(tzinfo=dt.timezone.utc)
            break
    # Consumed: the files whose every row was looked at (a file cut by prompts.count is read again next
    # round; the prompts taken from it then count as already used).
    consumed_now = {f for f in read_files if considered.get(f, 0) == per_file.get(f, 0)}
    if not requests:
        raise RaydistillError(
            f"prompts.source=served_prompts: no new prompts in {log_uri} since "
            f"{since.isoformat() if since else 'the start'} ({counts}); serve more traffic "
            "with serve.prompt_log_enabled: true, or skip this round"
        )
    window = {
        "log": log_uri,
        "since": since.isoformat() if since else None,
        "until": until.isoformat(),
        "read_at": read_at.isoformat(),
        "selected": len(requests),
        **counts,
        "consumed": sorted(consumed | consumed_now),
    }
    storage.atomic_write_json(storage.join(run_dir, "data", "prompts", "served_prompts.json"), window)
    storage.atomic_write_text(stored, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in requests))
    return requests
