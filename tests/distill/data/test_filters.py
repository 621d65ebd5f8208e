"""Data-quality filters and the filter stage (plain pyarrow, no Ray)."""

from __future__ import annotations

import json
import random
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster import storage
from cluster.errors import RaydistillError
from distill.data import filter_stage
from distill.data.filter_stage import run_filter_stage
from distill.data.filters import DecontaminationIndex, apply_filters, build_decontamination_index, repetition_share
from distill.data.schema import prompt_id, schema, to_table
from distill.data.section import FilterSection
from pipelines.config import load_config

VOCAB = [
    f"{a}{b}"
    for a in ("al", "bo", "ca", "du", "ek", "fi", "go", "hu", "in", "jo", "ka", "lu")
    for b in ("ba", "ce", "di", "fo", "gu", "ha", "ji", "ko", "le", "mu", "no", "pi")
]


def text(seed: int, n: int = 40) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def row(
    pid: str,
    prompt: str,
    completion: str | None,
    *,
    finish: str = "stop",
    quality=None,
    messages=None,
    clen: int | None = -1,
) -> dict:
    n = len((completion or "").split()) if clen == -1 else clen
    k = n or 0
    return {
        "prompt_id": pid,
        "prompt": prompt if messages is None else None,
        "messages": messages,
        "completion": completion,
        "input_ids": list(range(3 + k)),
        "prompt_len": 3,
        "completion_len": n,
        "topk_ids": [[1, 2]] * k,
        "topk_logprobs": [[-0.1, -2.5]] * k,
        "teacher": "t@r",
        "sampling": "{}",
        "finish_reason": finish,
        "quality": quality,
        "source": "test",
    }


def cfg(**kw) -> FilterSection:
    base = {"dedup": "none", "max_repetition": 1.0, "drop_truncated": False, "min_completion_tokens": 0}
    base.update(kw)
    return FilterSection(**base)


def kept_ids(table: pa.Table) -> list[str]:
    return table.column("prompt_id").to_pylist()


# ------------------------------------------------------------------ simple filters


def test_empty_and_truncated():
    rows = [
        row("a", "p1", text(1)),
        row("b", "p2", ""),
        row("c", "p3", "   \n"),
        row("d", "p4", None, clen=0),
        row("e", "p5", text(5), finish="length"),
        row("f", "p6", text(6), finish=None),
    ]
    out, dropped = apply_filters(to_table(rows), cfg(drop_truncated=True))
    assert kept_ids(out) == ["a", "f"]
    assert dropped == {"duplicate_id": 0, "empty": 3, "truncated": 1}
    # drop_truncated off keeps the truncated row and does not report the filter.
    out, dropped = apply_filters(to_table(rows), cfg(drop_truncated=False))
    assert kept_ids(out) == ["a", "e", "f"] and "truncated" not in dropped


def test_length_bounds_with_null_fallback():
    rows = [
        row("a", "p", text(1, 3)),
        row("b", "p", text(2, 10)),
        row("c", "p", text(3, 50)),
        row("d", "p", text(4, 60), clen=None),
    ]  # null completion_len: counted from topk_ids (0 here)
    out, dropped = apply_filters(to_table(rows), cfg(min_completion_tokens=5, max_completion_tokens=40))
    assert kept_ids(out) == ["b"]
    assert dropped["length"] == 3


def test_repetitive():
    loop = " ".join(["the cat sat on the mat"] * 10)
    assert repetition_share(loop.split()) > 0.8
    assert repetition_share(text(7, 60).split()) < 0.1
    assert repetition_share(["a", "b"]) == 0.0
    rows = [row("a", "p", loop), row("b", "p", text(7, 60)), row("c", "p", "one two three")]
    out, dropped = apply_filters(to_table(rows), cfg(max_repetition=0.5))
    assert kept_ids(out) == ["b", "c"] and dropped["repetitive"] == 1


def test_quality_null_handling():
    rows = [
        row("a", "p1", text(1), quality=9.0),
        row("b", "p2", text(2), quality=4.0),
        row("c", "p3", text(3), quality=None),
        row("d", "p4", text(4), quality=7.0),
    ]
    out, dropped = apply_filters(to_table(rows), cfg(min_quality=7))
    assert kept_ids(out) == ["a", "d"] and dropped["quality"] == 2  # low score and unscored
    out, dropped = apply_filters(to_table(rows), cfg())  # no min_quality: nulls kept
    assert kept_ids(out) == ["a", "b", "c", "d"] and "quality" not in dropped
    unscored = [row("x", "p", text(9), quality=None)]
    with pytest.raises(RaydistillError, match="generate.judge"):
        apply_filters(to_table(unscored), cfg(min_quality=5))


def test_duplicate_prompt_id_keeps_first():
    rows = [row("a", "p", text(1)), row("a", "p", text(2)), row("b", "p", text(3))]
    out, dropped = apply_filters(to_table(rows), cfg())
    assert kept_ids(out) == ["a", "b"] and out.column("completion")[0].as_py() == text(1)
    assert dropped["duplicate_id"] == 1


def test_drops_are_counted_once_in_order():
    rows = [row("a", "p", "", finish="length"), row("b", "p", text(2), finish="length")]
    _, dropped = apply_filters(to_table(rows), cfg(drop_truncated=True, dedup="minhash"))
    assert list(dropped) == ["duplicate_id", "empty", "truncated", "exact_dup", "near_dup"]
    assert dropped == {"duplicate_id": 0, "empty": 1, "truncated": 1, "exact_dup": 0, "near_dup": 0}


# ------------------------------------------------------------------ dedup


def test_exact_dedup_normalises_and_keeps_smallest_prompt_id():
    completion = text(11)
    rows = [
        row("z-late", "What is X?", completion),
        row("a-early", "what is x", completion.upper() + " !!"),  # same after normalisation
        row("m-sample2", "What is X?", text(12)),  # another sample of the prompt
        row("q-other", "Something else entirely", completion),  # same answer, other prompt
    ]
    table = to_table(rows)
    out, dropped = apply_filters(table, cfg(dedup="exact"))
    assert dropped["exact_dup"] == 1 and "near_dup" not in dropped
    assert kept_ids(out) == ["a-early", "m-sample2", "q-other"]  # sorted, first by prompt_id kept
    # Input order does not change which row survives.
    out2, _ = apply_filters(table.take([3, 2, 1, 0]), cfg(dedup="exact"))
    assert kept_ids(out2) == kept_ids(out)


def test_near_duplicates_caught_distinct_rows_survive():
    rows = [row(f"r{i:03d}", f"Question {i}: {text(1000 + i, 12)}", text(i, 100)) for i in range(200)]
    # Lightly edited copies: one word changed, casing/punctuation changed, a word appended.
    base = rows[10]
    words = base["completion"].split()
    words[30] = "CHANGED"
    rows.append(row("s-edit", base["prompt"].upper() + "?", " ".join(words) + ", indeed."))
    base2 = rows[50]
    rows.append(row("s-edit2", base2["prompt"], base2["completion"].replace(" ", "  ") + " ok"))
    # Another sample of a prompt (same prompt, different completion) and a shared answer to a new
    # prompt are not duplicates.
    rows.append(row("s-sample", rows[20]["prompt"], text(5000, 100)))
    rows.append(row("s-shared", "A brand new prompt about something different", rows[30]["completion"]))
    out, dropped = apply_filters(to_table(rows), cfg(dedup="minhash"))
    ids = set(kept_ids(out))
    assert dropped["exact_dup"] == 0
    assert dropped["near_dup"] == 2
    assert "s-edit" not in ids and "s-edit2" not in ids
    assert {"r010", "r050", "s-sample", "s-shared"} <= ids
    assert len(ids) == 202  # every distinct row survived


def test_near_dup_threshold_respected():
    a = text(1, 40)
    words = a.split()
    for i in range(0, 40, 4):  # change every 4th word: far below 0.85 similarity
        words[i] = "zz"
    rows = [row("a", "p", a), row("b", "p", " ".join(words))]
    _, dropped = apply_filters(to_table(rows), cfg(dedup="minhash", minhash_threshold=0.85))
    assert dropped["near_dup"] == 0


# ------------------------------------------------------------------ decontamination

EVAL_ITEMS = [
    {
        "question": "Janet has three ducks that lay sixteen eggs per day and she eats three for breakfast every morning",
        "answer": "18",
    },
    {
        "question": "A train leaves the station at noon travelling sixty miles per hour toward a city two hundred miles away",
        "answer": "about 3.3 hours",
    },
    {"question": "Name the capital city of the Republic of France please", "answer": "Paris"},  # 10 words
]


def write_jsonl(uri: str, items: list[dict]) -> None:
    storage.atomic_write_text(uri, "".join(json.dumps(x) + "\n" for x in items))


def contamination_rows() -> list[dict]:
    q0 = EVAL_ITEMS[0]["question"]
    q1_words = EVAL_ITEMS[1]["question"].split()
    return [
        # 13+ consecutive eval words inside a completion, with different case and punctuation.
        row("c-completion", "Tell me a story", "Sure! " + q0.upper().replace(" eggs ", ", eggs, ") + " The end."),
        # ... or inside the prompt.
        row("c-prompt", "Solve: " + " ".join(q1_words[:14]) + " quickly", text(3)),
        # The whole of a short (10-word) eval item.
        row("c-short", "Quiz time", "Q: Name the capital city of the Republic of France, please. A: Paris"),
        # Only 12 consecutive eval words: below the 13-gram, kept.
        row("k-partial", "Near miss", "intro " + " ".join(q1_words[:12]) + " then something else"),
        row("k-clean", "Unrelated", text(4)),
    ]


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "txt", "jsonl.gz"])
def test_decontamination_formats(tmp_path, fmt):
    uri = str(tmp_path / f"eval.{fmt}")
    if fmt == "jsonl":
        write_jsonl(uri, EVAL_ITEMS)
    elif fmt == "json":
        (tmp_path / "eval.json").write_text(json.dumps({"items": EVAL_ITEMS}))
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(EVAL_ITEMS + [{"question": None, "answer": "x"}]), uri)
    elif fmt == "csv":
        import csv

        with open(uri, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["question", "answer"])
            writer.writeheader()
            writer.writerows(EVAL_ITEMS)
    elif fmt == "txt":
        (tmp_path / "eval.txt").write_text("\n\n".join(x["question"] for x in EVAL_ITEMS) + "\n")
    else:
        import gzip

        (tmp_path / f"eval.{fmt}").write_bytes(
            gzip.compress("".join(json.dumps(x) + "\n" for x in EVAL_ITEMS).encode())
        )
    out, dropped = apply_filters(to_table(contamination_rows()), cfg(decontaminate=[uri]))
    assert kept_ids(out) == ["k-clean", "k-partial"]
    assert dropped["decontaminated"] == 3


def test_decontamination_memory_glob_and_messages():
    base = f"memory://evals-{uuid.uuid4().hex}"
    write_jsonl(f"{base}/gsm/part1.jsonl", EVAL_ITEMS[:1])
    write_jsonl(f"{base}/gsm/part2.jsonl", EVAL_ITEMS[1:])
    try:
        index = build_decontamination_index([f"{base}/gsm/*.jsonl"], ngram=13)
        assert len(index) == 3
        chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": EVAL_ITEMS[0]["question"]}]
        rows = [
            row("m-chat", None, text(1), messages=chat),
            row("m-ok", None, text(2), messages=[{"role": "user", "content": "hello there"}]),
        ]
        out, dropped = apply_filters(to_table(rows), cfg(decontaminate=[f"{base}/gsm"]))  # a folder works too
        assert kept_ids(out) == ["m-ok"] and dropped["decontaminated"] == 1
    finally:
        storage.remove(base, recursive=True)


def test_decontamination_ngram_size_and_short_items():
    index = DecontaminationIndex(ngram=5, min_tokens=3)
    index.add_text("one two three four five six")
    index.add_text("alpha beta gamma")  # short: must appear whole
    index.add_text("x y")  # too short: ignored
    assert len(index) == 2
    assert index.matches("zero two three four five six seven".split())
    assert not index.matches("two three four five".split())
    assert index.matches("say alpha beta gamma now".split())
    assert not index.matches("alpha beta delta".split())
    assert not index.matches("x y".split())


@pytest.mark.parametrize(
    "setup, match",
    [
        ("missing", "eval.jsonl"),
        ("empty", "holds no text"),
        ("noglob", "matches no file"),
        ("badjson", "line 2 is not valid JSON"),
    ],
)
def test_bad_eval_sets_raise_clear_errors(tmp_path, setup, match):
    uri = str(tmp_path / "eval.jsonl")
    if setup == "empty":
        (tmp_path / "eval.jsonl").write_text("")
    elif setup == "noglob":
        uri = str(tmp_path / "nothing" / "*.jsonl")
    elif setup == "badjson":
        (tmp_path / "eval.jsonl").write_text('{"q": "fine"}\n{broken\n')
    with pytest.raises(RaydistillError, match=match) as info:
        apply_filters(to_table([row("a", "p", "x")]), cfg(decontaminate=[uri]))
    assert "filter.decontaminate" in str(info.value)
    if setup != "noglob":
        assert str(tmp_path / "eval.jsonl") in str(info.value)


# ------------------------------------------------------------------ the stage


def stage_rows() -> list[dict]:
    rows = [
        row(
            prompt_id("test", f"prompt {i}", 0),
            f"prompt {i} {text(2000 + i, 8)}",
            text(i, 40),
            quality=float(3 + i % 8),
        )
        for i in range(60)
    ]
    # Exact copy of a row that passes every other filter (quality 8); "zz" sorts after the hex ids.
    rows.append(row("zz-dup-exact", rows[5]["prompt"], rows[5]["completion"], quality=9.0))
    rows.append(row("empty", "p", "", quality=9.0))
    rows.append(row("trunc", "p", text(70), finish="length", quality=9.0))
    rows.append(row("loop", "p", " ".join(["again and again we go"] * 12), quality=9.0))
    rows.append(row("contam", "p", "so " + EVAL_ITEMS[0]["question"], quality=9.0))
    return rows


def write_generate(run_dir: str, rows: list[dict], shards: int = 3, logprob_dtype: str = "float32") -> pa.Table:
    table = to_table(rows, logprob_dtype)
    gen = storage.join(run_dir, "data", "generate")
    size = -(-table.num_rows // shards)
    for s in range(shards):
        with storage.atomic_open(storage.join(gen, f"shard-{s}.parquet")) as handle:
            pq.write_table(table.slice(s * size, size), handle, compression="zstd")
    storage.atomic_write_json(storage.join(gen, "manifest.json"), {"rows": table.num_rows})
    return table


def read_output(run_dir: str) -> tuple[pa.Table, dict, list[str]]:
    out = storage.join(run_dir, "data", "filtered")
    manifest = storage.read_json(storage.join(out, "manifest.json"))
    fs, path = storage.filesystem(out)
    names = sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False))
    shards = [pq.read_table(storage.filesystem(storage.join(out, n))[1], filesystem=fs) for n in manifest["shards"]]
    return pa.concat_tables(shards), manifest, names


@pytest.fixture(params=["local", "memory"])
def run_dir(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "runs" / "quickstart" / "run-1")
        return
    uri = f"memory://runs-{uuid.uuid4().hex}/quickstart/run-1"
    yield uri
    storage.remove(uri.split("/quickstart")[0], recursive=True)


def test_stage_end_to_end(run_dir, tmp_path):
    eval_uri = str(tmp_path / "eval.jsonl")
    write_jsonl(eval_uri, EVAL_ITEMS)
    rows = stage_rows()
    table = write_generate(run_dir, rows)
    config = load_config(None, ["filter.dedup=minhash", "filter.min_quality=4", f"filter.decontaminate=[{eval_uri}]"])

    manifest = run_filter_stage(config, run_dir)
    out, on_disk, names = read_output(run_dir)

    n_low = sum(1 for r in rows[:60] if r["quality"] < 4)
    assert on_disk["dropped"] == {
        "duplicate_id": 0,
        "empty": 1,
        "truncated": 1,
        "length": 0,
        "repetitive": 1,
        "quality": n_low,
        "decontaminated": 1,
        "exact_dup": 1,
        "near_dup": 0,
    }
    assert (
        on_disk["filter_order"]
        == list(manifest["dropped"])
        == [
            "duplicate_id",
            "empty",
            "truncated",
            "length",
            "repetitive",
            "quality",
            "decontaminated",
            "exact_dup",
            "near_dup",
        ]
    )
    assert on_disk["input_rows"] == len(rows) == table.num_rows
    assert on_disk["output_rows"] == out.num_rows == 60 - n_low
    assert on_disk["dropped_total"] == len(rows) - out.num_rows
    assert on_disk["tokens"]["completion"] == sum(out.column("completion_len").to_pylist())
    assert on_disk["config_hash"] == config.section_hash("filter")
    assert on_disk["wall_time_s"] >= 0 and on_disk["input_shards"] == 3
    assert names == ["manifest.json", "part-00000.parquet"]  # no temp files, deterministic names
    assert out.schema.equals(schema())
    assert out.column("prompt_id").to_pylist() == sorted(out.column("prompt_id").to_pylist())
    assert set(out.column("prompt_id").to_pylist()) <= {r["prompt_id"] for r in rows[:60]}
    fs, path = storage.filesystem(storage.join(run_dir, "data", "filtered", "part-00000.parquet"))
    with fs.open(path, "rb") as handle:
        assert pq.ParquetFile(handle).metadata.row_group(0).column(0).compression == "ZSTD"


def test_stage_rerun_replaces_output(run_dir, monkeypatch):
    rows = [row(f"r{i:03d}", f"p{i}", text(i, 40)) for i in range(40)]
    write_generate(run_dir, rows, shards=2)
    monkeypatch.setattr(filter_stage, "TARGET_SHARD_BYTES", 2048)  # force several output shards
    first = run_filter_stage(load_config(None, ["filter.dedup=none"]), run_dir)
    assert len(first["shards"]) > 2 and first["output_rows"] == 40
    out_dir = storage.join(run_dir, "data", "filtered")
    # A stray temp file from a crashed writer, then a rerun that keeps fewer rows in fewer shards.
    fs, path = storage.filesystem(out_dir)
    with fs.open(f"{path}/{storage.TMP_PREFIX}dead-part-00000.parquet", "wb") as handle:
        handle.write(b"junk")
    monkeypatch.setattr(filter_stage, "TARGET_SHARD_BYTES", 10**9)
    second = run_filter_stage(load_config(None, ["filter.dedup=none", "filter.min_completion_tokens=41"]), run_dir)
    out, manifest, names = read_output(run_dir)
    assert names == ["manifest.json", "part-00000.parquet"]
    assert second["output_rows"] == 0 and out.num_rows == 0 and out.schema.equals(schema())
    assert manifest["dropped"]["length"] == 40
    # And back: the same rows exactly once, nothing duplicated from the earlier runs.
    run_filter_stage(load_config(None, ["filter.dedup=none"]), run_dir)
    out, manifest, names = read_output(run_dir)
    assert out.num_rows == 40 and len(set(out.column("prompt_id").to_pylist())) == 40
    assert names == ["manifest.json", "part-00000.parquet"]


def test_stage_keeps_float16_schema(run_dir):
    write_generate(run_dir, [row("a", "p", text(1)), row("b", "q", text(2))], shards=1, logprob_dtype="float16")
    run_filter_stage(load_config(None), run_dir)
    out, _, _ = read_output(run_dir)
    assert out.schema.equals(schema("float16")) and out.num_rows == 2


def test_stage_without_generate_data(run_dir):
    with pytest.raises(RaydistillError, match="raydistill generate"):
        run_filter_stage(load_config(None), run_dir)


def test_stage_bad_eval_set_fails_before_writing(run_dir, tmp_path):
    write_generate(run_dir, [row("a", "p", text(1))], shards=1)
    missing = str(tmp_path / "nope" / "eval.jsonl")
    with pytest.raises(RaydistillError, match="nope/eval.jsonl"):
        run_filter_stage(load_config(None, [f"filter.decontaminate={missing}"]), run_dir)
    assert not storage.exists(storage.join(run_dir, "data", "filtered", "manifest.json"))


def test_stage_resolves_relative_eval_path(tmp_path):
    (tmp_path / "evals").mkdir()
    write_jsonl(str(tmp_path / "evals" / "e.jsonl"), EVAL_ITEMS)
    cfg_file = tmp_path / "pipe.yaml"
    cfg_file.write_text("filter:\n  decontaminate: [evals/e.jsonl]\n")
    run_dir = str(tmp_path / "run")
    write_generate(run_dir, contamination_rows(), shards=1)
    manifest = run_filter_stage(load_config(cfg_file), run_dir)
    assert manifest["dropped"]["decontaminated"] == 3 and manifest["output_rows"] == 2
