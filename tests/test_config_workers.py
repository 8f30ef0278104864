"""``[workers.NAME]`` tables of a config file: what loads, and what is refused naming file, worker, field and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from fabric.config import FieldError, WorkerConfig, WorkerSpec, load_config
from fabric.errors import ConfigError
from fabric.keys import Priority

GOOD = 'handler = "handlers.quotes:mid_price"\ngroup = "indicators"\ntopics = ["tick"]\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    return path


def test_a_workers_table_loads_with_its_handler_processes_and_worker_settings(tmp_path) -> None:
    # given a table setting the handler, the processes and a few worker settings
    path = write(tmp_path, "[workers.indicators]\n" + GOOD + 'processes = 3\nconcurrency = 8\nprefetch = 64\n'
                 'priority_weights = [1, 1, 2, 4]\noutput_priority = "high"\n')
    # when the file is loaded
    spec = load_config(path).workers["indicators"]
    # then every field is there, and the rest keep WorkerConfig's defaults
    assert (spec.handler, spec.processes, spec.group, spec.topics) == ("handlers.quotes:mid_price", 3, "indicators",
                                                                       ["tick"])
    assert (spec.concurrency, spec.prefetch, spec.priority_weights) == (8, 64, (1, 1, 2, 4))
    assert spec.output_priority is Priority.HIGH
    assert spec.max_deliveries == WorkerConfig(group="g", topics=["t"]).max_deliveries


def test_tables_keep_the_files_order(tmp_path) -> None:
    path = write(tmp_path, "".join(f"[workers.{n}]\n{GOOD}" for n in ("zeta", "alpha", "mid")))
    assert list(load_config(path).workers) == ["zeta", "alpha", "mid"]


def test_a_file_without_workers_tables_has_none(tmp_path) -> None:
    assert load_config(write(tmp_path, 'namespace = "x"\n')).workers == {}


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("concurrency = 0", "workers.w.concurrency: must be at least 1"),
        ("processes = 0", "workers.w.processes: must be at least 1"),
        ("concurency = 8", "workers.w.concurency: unknown field: did you mean concurrency?"),
        ("breakers = 3", "workers.w.breakers: a list of [breakers.NAME] names"),
        ('breakers = ["nope"]', "workers.w.breakers: no [breakers.nope] table"),
        ('concurrency = "many"', "workers.w.concurrency: expected `int`, got `str`"),
        ("priority_weights = [1, 2, 3]", "workers.w.priority_weights: expected `array` of length 4"),
        ("backoff_base_ms = 500\nbackoff_max_ms = 100", "workers.w.backoff_max_ms: is below backoff_base_ms"),
        ('consumer = "fixed"', "workers.w.consumer: each process gets a name of its own"),
        ("[workers.w.retention.tick]\nmax_len = 10", "workers.w.retention: retention is per topic"),
        ('output_priority = "urgent"', "workers.w.output_priority: unknown priority 'urgent': use one of low"),
    ],
    ids=["concurrency-0", "processes-0", "misspelt", "breakers", "unknown-breaker", "wrong-type", "weights", "backoff",
         "consumer",
         "retention", "priority"],
)
def test_a_bad_field_is_refused_naming_file_worker_field_and_reason(tmp_path, line, error) -> None:
    # given a table with one bad field
    path = write(tmp_path, f"[workers.w]\n{GOOD}{line}\n")
    # when the file is loaded
    with pytest.raises(ConfigError) as info:
        load_config(path)
    # then the error starts with the file, the table and the field, then says why
    assert str(info.value).startswith(f"{path}: {error}"), str(info.value)


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ('group = "g"\ntopics = ["tick"]\n', "workers.w.handler: required"),
        ('handler = "handlers.quotes"\ngroup = "g"\ntopics = ["tick"]\n', "workers.w.handler: 'handlers.quotes' is "
                                                                          "not MODULE:FUNCTION"),
        ('handler = "a:b"\ngroup = "g"\n', "workers.w.topics: required"),
        ('handler = "a:b"\ngroup = "g"\ntopics = []\n', "workers.w.topics: name at least one topic"),
        ('handler = "a:b"\ngroup = "bad group"\ntopics = ["tick"]\n', "workers.w.group: invalid group 'bad group'"),
        ('handler = "a:b"\ngroup = "g"\ntopics = ["a:b"]\n', "workers.w.topics: invalid topic 'a:b'"),
    ],
    ids=["no-handler", "handler-shape", "no-topics", "empty-topics", "group-name", "topic-name"],
)
def test_a_missing_or_malformed_name_is_refused_naming_the_field(tmp_path, table, error) -> None:
    path = write(tmp_path, f"[workers.w]\n{table}")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {error}"), str(info.value)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (f'[workers."a b"]\n{GOOD}', "workers.a b: invalid worker name 'a b'"),
        (f"[workers.{'w' * 41}]\n{GOOD}", f"workers.{'w' * 41}: name longer than 40 characters"),
        ("workers = 3\n", "workers: give each worker a table of its own"),
    ],
    ids=["bad-name", "long-name", "not-tables"],
)
def test_a_bad_workers_name_or_shape_is_refused(tmp_path, text, error) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {error}"), str(info.value)


def test_worker_config_of_a_spec_applies_changes_and_checks_them() -> None:
    # given a spec
    spec = WorkerSpec(handler="a:b", group="g", topics=["tick"], concurrency=8, processes=2)
    # when the settings of one of its processes are asked for, with a consumer and an override
    config = spec.worker_config(consumer="host-1-w-0-0", max_deliveries=9)
    # then they are a plain WorkerConfig with the spec's fields and the changes
    assert type(config) is WorkerConfig
    assert (config.group, config.concurrency, config.consumer, config.max_deliveries) == ("g", 8, "host-1-w-0-0", 9)
    # and a bad override is refused naming its field
    with pytest.raises(FieldError) as info:
        spec.worker_config(concurrency=0)
    assert info.value.field == "concurrency"


def test_select_workers_returns_the_named_tables_or_says_which_exist(tmp_path) -> None:
    config = load_config(write(tmp_path, "".join(f"[workers.{n}]\n{GOOD}" for n in ("a", "b", "c"))))
    assert list(config.select_workers()) == ["a", "b", "c"]
    assert list(config.select_workers(["c", "a"])) == ["a", "c"]
    with pytest.raises(ConfigError, match=r"no \[workers.d\] table: the file has a, b, c"):
        config.select_workers(["d"])


def test_select_workers_of_a_file_without_tables_says_how_to_add_one(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no \\[workers.NAME\\] tables"):
        load_config(write(tmp_path, "")).select_workers()
