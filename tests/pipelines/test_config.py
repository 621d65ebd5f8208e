"""pipelines.config: YAML + --set overrides, validation errors with dotted paths and allowed values."""

from __future__ import annotations

import uuid

import pytest
from pydantic import ValidationError

from cluster import storage
from cluster.errors import ConfigError, RaydistillError
from distill.data.section import DedupMode, PromptSource
from pipelines.config import PipelineConfig, apply_overrides, load_config, parse_override

ISSUE_SHAPE = """\
name: quickstart
workdir: ./runs
ray: {address: null}
teacher: {model: smollm2-135m-instruct, backend: hf, replicas: 1, num_gpus: 0, base_url: null, api_key_env: null}
prompts: {source: file, path: prompts.jsonl, count: 256, samples_per_prompt: 1}
generate: {max_new_tokens: 128, temperature: 0.7, top_p: 1.0, logprobs: 20, judge: false}
filter: {dedup: minhash, min_quality: null, decontaminate: [], ngram: 13}
student: {}
train: {}
eval: {}
serve: {}
schedule: {}
"""


@pytest.fixture
def cfg_file(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(ISSUE_SHAPE)
    return path


def test_defaults_without_file():
    cfg = load_config(None)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.name == "quickstart" and cfg.workdir == "./runs"
    assert cfg.ray.address is None
    assert cfg.filter.dedup is DedupMode.minhash and cfg.filter.ngram == 13


def test_issue_config_shape_loads(cfg_file):
    cfg = load_config(cfg_file)
    assert cfg.teacher.backend == "hf" and cfg.teacher.replicas == 1
    assert cfg.prompts.source is PromptSource.file and cfg.prompts.count == 256
    assert cfg.generate.logprobs == 20 and cfg.filter.decontaminate == []
    assert cfg.source_dir == str(cfg_file.parent.resolve())


@pytest.mark.parametrize(
    "item, keys, value",
    [
        ("prompts.count=8", ["prompts", "count"], 8),
        ("generate.temperature=0.0", ["generate", "temperature"], 0.0),
        ("prompts.count=null", ["prompts", "count"], None),
        ("generate.judge=true", ["generate", "judge"], True),
        ("prompts.path=[a.jsonl, 's3://b/*.jsonl']", ["prompts", "path"], ["a.jsonl", "s3://b/*.jsonl"]),
        ("filter.decontaminate=[]", ["filter", "decontaminate"], []),
        ("teacher.base_url=http://h:8000/v1", ["teacher", "base_url"], "http://h:8000/v1"),
        ("ray.address=ray://host:10001", ["ray", "address"], "ray://host:10001"),
        ("prompts.system_prompt=Be brief: answer", ["prompts", "system_prompt"], "Be brief: answer"),
        ("prompts.system_prompt=Use #tags", ["prompts", "system_prompt"], "Use #tags"),
        ("teacher.model='null'", ["teacher", "model"], "null"),
        ("student={hidden: 64}", ["student"], {"hidden": 64}),
        ("name=", ["name"], ""),
    ],
)
def test_parse_override_values(item, keys, value):
    assert parse_override(item) == (keys, value)


@pytest.mark.parametrize("item", ["prompts.count", "=3"])
def test_parse_override_malformed(item):
    with pytest.raises(ConfigError, match="--set"):
        parse_override(item)


def test_overrides_apply_to_file_and_create_sections(cfg_file):
    cfg = load_config(
        cfg_file,
        [
            "prompts.count=8",
            "teacher.replicas=2",
            "prompts.count=null",
            "train.stages=[{name: sft, steps: 3}, {name: kd, tokens: 500}]",
            "filter.min_quality=7",
            "filter.dedup=exact",
        ],
    )
    assert cfg.prompts.count is None  # later --set wins
    assert cfg.teacher.replicas == 2
    assert [(s.name, s.steps, s.tokens) for s in cfg.train.stages] == [("sft", 3, None), ("kd", None, 500)]
    assert cfg.filter.min_quality == 7 and cfg.filter.dedup is DedupMode.exact


def test_numbers_for_string_fields_are_accepted():
    cfg = load_config(None, ["name=2024", "teacher.revision=1234567"])
    assert cfg.name == "2024" and cfg.teacher.revision == "1234567"


def test_override_into_scalar_is_an_error():
    data = {"name": "x"}
    with pytest.raises(ConfigError, match="name is not a section"):
        apply_overrides(data, ["name.sub=1"])


def test_unknown_key_names_dotted_path():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["teacher.bakend=hf"])
    assert "teacher.bakend" in str(info.value) and "unknown key" in str(info.value)


def test_unknown_key_in_file_names_dotted_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("generate:\n  max_new_token: 64\n")
    with pytest.raises(ConfigError, match=r"generate\.max_new_token: unknown key"):
        load_config(path)


def test_unknown_top_level_and_nested_sections():
    with pytest.raises(ConfigError, match=r"(?m)^\s*tokenizer: unknown key"):
        load_config(None, ["tokenizer.name=x"])
    # A nested unknown path is reported at the first key that does not exist.
    with pytest.raises(ConfigError, match=r"teacher\.sampling: unknown key"):
        load_config(None, ["teacher.sampling.top_k=5"])


@pytest.mark.parametrize(
    "item, path, allowed",
    [
        ("prompts.source=files", "prompts.source", ["file", "self_instruct", "magpie", "served_prompts"]),
        ("filter.dedup=fuzzy", "filter.dedup", ["none", "exact", "minhash"]),
        ("generate.logprob_dtype=int8", "generate.logprob_dtype", ["float32", "float16"]),
        ("teacher.backend=tgi", "teacher.backend", ["hf", "vllm", "openai"]),
    ],
)
def test_bad_enum_lists_allowed_values(item, path, allowed):
    with pytest.raises(ConfigError) as info:
        load_config(None, [item])
    msg = str(info.value)
    assert path in msg
    for value in allowed:
        assert value in msg


def test_bad_values_name_path_and_value():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["generate.logprobs=0", "teacher.replicas=many"])
    msg = str(info.value)
    assert "generate.logprobs" in msg and "teacher.replicas" in msg and "'many'" in msg


def test_custom_backend_class_is_allowed():
    assert load_config(None, ["teacher.backend=my.pkg:Teacher"]).teacher.backend == "my.pkg:Teacher"


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)
    assert issubclass(ConfigError, RaydistillError)


def test_load_from_memory_uri():
    uri = f"memory://cfg-{uuid.uuid4().hex}/c.yaml"
    storage.atomic_write_text(uri, "name: mem\nprompts: {count: 4}\n")
    try:
        cfg = load_config(uri, ["prompts.samples_per_prompt=2"])
    finally:
        storage.remove(uri)
    assert cfg.name == "mem" and cfg.prompts.count == 4 and cfg.prompts.samples_per_prompt == 2
    assert cfg.source_dir is None


def test_section_hash_is_stable_and_scoped():
    a = load_config(None)
    b = load_config(None, ["prompts.count=8"])
    assert a.section_hash("filter") == b.section_hash("filter")
    assert a.section_hash("prompts") != b.section_hash("prompts")
    assert a.section_hash() != b.section_hash()
    assert a.section_hash("filter") != load_config(None, ["filter.ngram=8"]).section_hash("filter")
    assert len(a.section_hash()) == 16


def test_resolve_path(tmp_path, cfg_file):
    (tmp_path / "prompts.jsonl").write_text("{}\n")
    cfg = load_config(cfg_file)
    assert cfg.resolve_path("prompts.jsonl") == str(tmp_path.resolve() / "prompts.jsonl")
    assert cfg.resolve_path("s3://b/p.jsonl") == "s3://b/p.jsonl"
    assert cfg.resolve_path("/abs/p.jsonl") == "/abs/p.jsonl"


def test_assignment_is_validated():
    cfg = load_config(None)
    with pytest.raises(ValidationError, match="replicas"):
        cfg.teacher.replicas = 0
