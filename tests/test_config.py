"""Settings: bad values are refused at construction with a ConfigError naming the field; files load or explain."""

from __future__ import annotations

import msgspec
import pytest

from fabric.config import FabricConfig, PublisherConfig, Retention, WorkerConfig, load_config
from fabric.errors import ConfigError
from fabric.keys import Priority

# ---- WorkerConfig ------------------------------------------------------------------------------------


def test_worker_config_defaults_are_valid():
    config = WorkerConfig(group="g", topics=["tick"])
    assert config.concurrency >= 1
    assert config.heartbeat_ms == config.reclaim_idle_ms // 3


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"topics": []}, "topics"),
        ({"concurrency": 0}, "concurrency"),
        ({"prefetch": 0}, "prefetch"),
        ({"commit_batch": 0}, "commit_batch"),
        ({"max_deliveries": 0}, "max_deliveries"),
        ({"block_ms": 0}, "block_ms"),
        ({"backoff_base_ms": 500, "backoff_max_ms": 100}, "backoff_max_ms"),
        ({"reclaim_idle_ms": 10}, "reclaim_idle_ms"),
    ],
)
def test_worker_config_refuses_bad_values_naming_the_field(kwargs, field):
    # given settings with one bad value
    settings = {"group": "g", "topics": ["tick"], **kwargs}
    # when a WorkerConfig is built
    with pytest.raises(ConfigError) as info:
        WorkerConfig(**settings)
    # then the error names the class and the field
    assert f"WorkerConfig.{field}" in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "kind"),
    [
        ({"group": "bad group"}, "group"),
        ({"group": ""}, "group"),
        ({"topics": ["tick", "a:b"]}, "topic"),
        ({"consumer": "c{1}"}, "consumer"),
    ],
)
def test_worker_config_refuses_invalid_names_saying_which(kwargs, kind):
    settings = {"group": "g", "topics": ["tick"], **kwargs}
    with pytest.raises(ConfigError) as info:
        WorkerConfig(**settings)
    message = str(info.value)
    assert message.startswith("WorkerConfig:")
    assert f"invalid {kind}" in message


def test_worker_config_refuses_non_positive_priority_weights():
    # given a weight of 0 for the low lane (Lanes refuses it when the worker starts)
    # when a WorkerConfig is built
    # then the config refuses it at construction, naming the field
    with pytest.raises(ConfigError, match="priority_weights"):
        WorkerConfig(group="g", topics=["tick"], priority_weights=(0, 1, 1, 1))


def test_worker_config_is_frozen():
    config = WorkerConfig(group="g", topics=["tick"])
    with pytest.raises(AttributeError):
        config.group = "other"  # type: ignore[misc]


# ---- PublisherConfig ---------------------------------------------------------------------------------


def test_publisher_config_defaults_are_valid():
    config = PublisherConfig()
    assert config.max_buffer >= config.max_batch >= 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_batch": 0}, "max_batch"),
        ({"max_batch": 10, "max_buffer": 5}, "max_buffer"),
        ({"linger_ms": -1.0}, "linger_ms"),
        ({"dedup_window_ms": -1}, "dedup_window_ms"),
        ({"retries": -1}, "retries"),
    ],
)
def test_publisher_config_refuses_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        PublisherConfig(**kwargs)
    message = str(info.value)
    assert message.startswith("PublisherConfig.")
    assert field in message


def test_publisher_config_resends_without_the_dedup_window_by_default():
    # sequence numbers, not the event_id window, make a resend safe
    config = PublisherConfig()
    assert (config.dedup_window_ms, config.retries) == (0, 3)


# ---- Retention ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["max_len", "max_age_ms", "hard_max_len"])
def test_retention_refuses_a_negative_limit_naming_the_field(field):
    # given one negative retention limit
    # when a Retention is built
    with pytest.raises(ConfigError) as info:
        Retention(**{field: -1})
    # then the error names that field
    assert f"Retention.{field}" in str(info.value)


def test_retention_refuses_hard_cap_below_max_len():
    with pytest.raises(ConfigError, match=r"Retention\.hard_max_len: 5 is below max_len 10"):
        Retention(max_len=10, hard_max_len=5)


def test_retention_accepts_zero_as_no_limit():
    assert Retention() == Retention(max_len=0, max_age_ms=0, hard_max_len=0)


def test_retention_accepts_hard_cap_without_max_len():
    assert Retention(hard_max_len=5).hard_max_len == 5


# ---- load_config -------------------------------------------------------------------------------------

GOOD_TOML = """
redis_url = "redis://127.0.0.1:6379/0"
namespace = "prod"

[publisher]
max_batch = 64
max_buffer = 1000
encoding = "json"

[retention.tick]
max_len = 100000
max_age_ms = 3600000
"""


def test_load_config_reads_a_valid_file(tmp_path):
    # given a valid TOML file
    path = tmp_path / "fabric.toml"
    path.write_text(GOOD_TOML)
    # when it is loaded
    config = load_config(path)
    # then every setting is taken, and the rest are defaults
    assert config == FabricConfig(
        redis_url="redis://127.0.0.1:6379/0",
        namespace="prod",
        publisher=PublisherConfig(max_batch=64, max_buffer=1000, encoding="json"),
        retention={"tick": Retention(max_len=100_000, max_age_ms=3_600_000)},
    )


def test_load_config_accepts_a_str_path(tmp_path):
    path = tmp_path / "fabric.toml"
    path.write_text('namespace = "x"\n')
    assert load_config(str(path)).namespace == "x"


def test_load_config_of_an_empty_file_gives_defaults(tmp_path):
    path = tmp_path / "empty.toml"
    path.write_text("")
    assert load_config(path) == FabricConfig()


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('namepsace = "typo"\n', "namepsace"),
        ("[publisher]\nmax_bach = 5\n", "max_bach"),
        ("[retention.tick]\nmaxlen = 5\n", "maxlen"),
    ],
)
def test_load_config_refuses_an_unknown_field_naming_file_and_field(tmp_path, text, field):
    # given a file with a misspelt setting
    path = tmp_path / "typo.toml"
    path.write_text(text)
    # when it is loaded
    with pytest.raises(ConfigError) as info:
        load_config(path)
    # then the error names the file and the unknown field
    assert str(path) in str(info.value)
    assert field in str(info.value)


def test_load_config_refuses_bad_toml_naming_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[publisher\nmax_batch = = 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "not valid TOML" in str(info.value)


def test_load_config_refuses_a_missing_file_naming_it(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"cannot read config {path}" in str(info.value)
    assert "No such file" in str(info.value)


def test_load_config_refuses_a_wrong_type_naming_file_and_field(tmp_path):
    path = tmp_path / "types.toml"
    path.write_text('[publisher]\nmax_batch = "many"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "max_batch" in str(info.value)


def test_load_config_refuses_an_invalid_value_naming_file_and_field(tmp_path):
    # given a file whose value breaks a rule checked at construction
    path = tmp_path / "rules.toml"
    path.write_text("[publisher]\nmax_batch = 0\n")
    # when it is loaded
    with pytest.raises(ConfigError) as info:
        load_config(path)
    # then the error names the file as well as the field
    assert "max_batch" in str(info.value)
    assert str(path) in str(info.value)


def test_load_config_refuses_an_invalid_namespace(tmp_path):
    # given a namespace Keys() would refuse later
    path = tmp_path / "ns.toml"
    path.write_text('namespace = "has space"\n')
    # when it is loaded
    # then it is refused now, with a ConfigError naming the field
    with pytest.raises(ConfigError, match="namespace"):
        load_config(path)


def test_worker_config_output_priority_decodes_from_its_number():
    config = msgspec.convert({"group": "g", "topics": ["t"], "output_priority": 2}, WorkerConfig)
    assert config.output_priority is Priority.HIGH
