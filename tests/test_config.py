"""Settings from flags, environment and TOML file: precedence, parsing, validation messages."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bridge.config import (
    ENV_VARS,
    ApiSettings,
    DeliverySettings,
    HttpSettings,
    KafkaSettings,
    LogSettings,
    Settings,
    ShutdownSettings,
    config_table_markdown,
    env_token,
    load_settings,
)
from bridge.errors import ConfigError
from bridge.secrets import Secret

TOKEN = "pt-config-test-token-0001"
PASSWORD = "sasl-password-never-shown"


def load(env: dict[str, str] | None = None, **kwargs: object) -> Settings:
    kwargs.setdefault("stderr_isatty", False)
    return load_settings(env or {}, **kwargs)  # type: ignore[arg-type]


def config_error(env: dict[str, str] | None = None, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as info:
        load(env, **kwargs)
    return str(info.value)


def test_empty_environment_gives_the_documented_defaults() -> None:
    """No configuration at all: every default from the design notes (the demo setup)."""
    settings = load()
    assert settings == Settings()
    assert settings.api.url == "https://api.qoder.com/api/v1/cloud"
    assert settings.api.uses_simulator
    assert settings.kafka.alerts_topic == "qoder.alerts"
    assert settings.delivery.mode == "exactly_once"
    assert settings.http.port == 8080
    assert settings.log == LogSettings(format="json", level="info")


def test_log_format_follows_the_tty_only_when_unset() -> None:
    """console on a TTY unless BRIDGE_LOG_FORMAT says otherwise; json off a TTY."""
    assert load(stderr_isatty=True).log.format == "console"
    assert load(stderr_isatty=False).log.format == "json"
    assert load({"BRIDGE_LOG_FORMAT": "json"}, stderr_isatty=True).log.format == "json"
    assert load({"BRIDGE_LOG_FORMAT": "console"}).log.format == "console"


@pytest.mark.parametrize(
    ("flag", "env", "file", "expected"),
    [
        (None, None, None, "qoder.events"),
        (None, None, "from-file", "from-file"),
        (None, "from-env", "from-file", "from-env"),
        ("from-flag", "from-env", "from-file", "from-flag"),
        ("from-flag", None, None, "from-flag"),
    ],
)
def test_precedence_flag_env_file_default(
    tmp_path: Path, flag: str | None, env: str | None, file: str | None, expected: str
) -> None:
    """A flag beats the environment, which beats the config file, which beats the default."""
    config = tmp_path / "bridge.toml"
    config.write_text(f'bridge_topic = "{file}"\n' if file else "")
    settings = load(
        {"BRIDGE_TOPIC": env} if env else {},
        config_file=config,
        overrides={"BRIDGE_TOPIC": flag} if flag else None,
    )
    assert settings.kafka.topic == expected


def test_empty_environment_value_counts_as_unset(tmp_path: Path) -> None:
    """FOO= in a compose file does not override the config file."""
    config = tmp_path / "bridge.toml"
    config.write_text("bridge_http_port = 9000\n")
    assert load({"BRIDGE_HTTP_PORT": ""}, config_file=config).http.port == 9000


def test_empty_alerts_topic_disables_alerts() -> None:
    """BRIDGE_ALERTS_TOPIC= means no alerts topic (an empty value that means something)."""
    assert load({"BRIDGE_ALERTS_TOPIC": ""}).kafka.alerts_topic is None


def test_config_file_takes_native_toml_types(tmp_path: Path) -> None:
    """Integers, booleans and lists are accepted as TOML values, not only strings."""
    config = tmp_path / "bridge.toml"
    config.write_text(
        "bridge_http_port = 9100\n"
        "bridge_publish_deltas = true\n"
        'bridge_sessions = ["sess_a1", "sess_b2"]\n'
        "bridge_api_timeout_s = 2.5\n"
        'qoder_access_token = "pt-from-file"\n'
    )
    settings = load(config_file=config)
    assert settings.http.port == 9100
    assert settings.delivery.publish_deltas is True
    assert settings.api.sessions == ("sess_a1", "sess_b2")
    assert settings.api.request_timeout_s == 2.5
    assert settings.api.token == Secret("pt-from-file")


def test_unknown_config_file_key_is_named_with_a_suggestion(tmp_path: Path) -> None:
    """A typo in the config file fails start-up instead of being silently ignored."""
    config = tmp_path / "bridge.toml"
    config.write_text('bridge_topik = "x"\n')
    message = config_error(config_file=config)
    assert "bridge_topik" in message
    assert "bridge_topic" in message


def test_missing_or_broken_config_file(tmp_path: Path) -> None:
    """A config file that does not exist or is not TOML names --config."""
    assert "--config" in config_error(config_file=tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("bridge_topic = \n")
    assert "not valid TOML" in config_error(config_file=broken)


def test_qoder_pat_is_an_alias_of_qoder_access_token() -> None:
    """Docs of older API generations call it QODER_PAT; both work, conflicting values do not."""
    assert load({"QODER_PAT": TOKEN}).api.token == Secret(TOKEN)
    assert load({"QODER_PAT": TOKEN, "QODER_ACCESS_TOKEN": TOKEN}).api.token == Secret(TOKEN)
    message = config_error({"QODER_PAT": TOKEN, "QODER_ACCESS_TOKEN": TOKEN + "2"})
    assert "QODER_ACCESS_TOKEN" in message and "QODER_PAT" in message
    assert TOKEN not in message


def test_token_and_token_file_together_are_rejected(tmp_path: Path) -> None:
    """Two token sources would be ambiguous."""
    message = config_error(
        {"QODER_ACCESS_TOKEN": TOKEN, "QODER_ACCESS_TOKEN_FILE": str(tmp_path / "t")}
    )
    assert "QODER_ACCESS_TOKEN_FILE" in message
    assert TOKEN not in message


@pytest.mark.parametrize(
    ("env", "names", "accepted"),
    [
        ({"BRIDGE_MAX_STREAMS": "many"}, "BRIDGE_MAX_STREAMS", "an integer >= 1"),
        ({"BRIDGE_MAX_STREAMS": "0"}, "BRIDGE_MAX_STREAMS", "an integer >= 1"),
        ({"BRIDGE_STALL_TIMEOUT_S": "-5"}, "BRIDGE_STALL_TIMEOUT_S", "seconds > 0"),
        ({"BRIDGE_DRAIN_TIMEOUT_S": "nan"}, "BRIDGE_DRAIN_TIMEOUT_S", "seconds > 0"),
        ({"BRIDGE_DELIVERY": "maybe_once"}, "BRIDGE_DELIVERY", "exactly_once, at_least_once"),
        ({"BRIDGE_SESSIONS": "sess_ok,thr_bad"}, "BRIDGE_SESSIONS", "'thr_bad'"),
        ({"BRIDGE_SESSIONS": "sess_x/../y"}, "BRIDGE_SESSIONS", "starting with sess_"),
        ({"BRIDGE_HTTP_PORT": "70000"}, "BRIDGE_HTTP_PORT", "from 0 to 65535"),
        ({"BRIDGE_HTTP_PORT": "-1"}, "BRIDGE_HTTP_PORT", "from 0 to 65535"),
        ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL", "SASL_SSL"),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "GSSAPI"},
            "KAFKA_SASL_MECHANISM",
            "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512",
        ),
        ({"KAFKA_COMPRESSION": "brotli"}, "KAFKA_COMPRESSION", "gzip, lz4, zstd, snappy, none"),
        ({"BRIDGE_PUBLISH_DELTAS": "perhaps"}, "BRIDGE_PUBLISH_DELTAS", "true or false"),
        ({"BRIDGE_LOG_LEVEL": "loud"}, "BRIDGE_LOG_LEVEL", "debug, info, warning"),
        ({"BRIDGE_LOG_FORMAT": "xml"}, "BRIDGE_LOG_FORMAT", "json, console"),
        ({"QODER_API_URL": "ftp://x"}, "QODER_API_URL", "http:// or https://"),
        ({"QODER_API_URL": "https://u:p@x/api"}, "QODER_API_URL", "without credentials"),
        ({"BRIDGE_TOPIC": "bad topic"}, "BRIDGE_TOPIC", "Kafka topic name"),
        ({"KAFKA_BOOTSTRAP_SERVERS": "k:99999"}, "KAFKA_BOOTSTRAP_SERVERS", "host:port"),
        ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"}, "KAFKA_SASL_USERNAME", "required"),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_USERNAME": "u"},
            "KAFKA_SASL_PASSWORD",
            "required when KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT",
        ),
        (
            {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": "/nonexistent/ca.pem"},
            "KAFKA_SSL_CAFILE",
            "does not exist",
        ),
        ({"KAFKA_SSL_CAFILE": "/etc/hostname"}, "KAFKA_SSL_CAFILE", "does not use TLS"),
        ({"BRIDGE_BACKOFF_MAX_S": "0.1"}, "BRIDGE_BACKOFF_MAX_S", "BRIDGE_BACKOFF_INITIAL_S"),
        ({"BRIDGE_DLQ_TOPIC": "qoder.events"}, "BRIDGE_DLQ_TOPIC", "own topic"),
        (
            {"BRIDGE_MAX_IN_FLIGHT_BYTES": "1000"},
            "BRIDGE_MAX_IN_FLIGHT_BYTES",
            "KAFKA_MAX_REQUEST_BYTES",
        ),
        (
            {"BRIDGE_TRANSACTION_TIMEOUT_MS": "1000", "BRIDGE_COMMIT_INTERVAL_MS": "5000"},
            "BRIDGE_TRANSACTION_TIMEOUT_MS",
            "BRIDGE_COMMIT_INTERVAL_MS",
        ),
    ],
)
def test_bad_values_name_the_setting_and_what_it_accepts(
    env: dict[str, str], names: str, accepted: str
) -> None:
    """Each kind of bad value fails start-up with the variable's name and the accepted values."""
    message = config_error(env)
    assert names in message
    assert accepted in message


def test_error_names_where_the_value_came_from(tmp_path: Path) -> None:
    """The same bad value from a flag, the environment or the file says which one it was."""
    config = tmp_path / "bridge.toml"
    config.write_text('bridge_http_port = "http"\n')
    assert "(from --http-port)" in config_error(overrides={"BRIDGE_HTTP_PORT": "x"})
    assert "(from the environment)" in config_error({"BRIDGE_HTTP_PORT": "x"})
    assert "bridge_http_port" in config_error(config_file=config)


def test_kubernetes_service_link_variable_gets_a_hint() -> None:
    """A Service named bridge-http injects BRIDGE_HTTP_PORT=tcp://...: say so."""
    assert "enableServiceLinks" in config_error({"BRIDGE_HTTP_PORT": "tcp://10.0.0.1:8080"})


def test_every_bad_setting_is_reported_at_once() -> None:
    """Several mistakes: one message listing all of them."""
    message = config_error({"BRIDGE_HTTP_PORT": "x", "BRIDGE_DELIVERY": "y"})
    assert "BRIDGE_HTTP_PORT" in message and "BRIDGE_DELIVERY" in message


def test_secrets_never_appear_in_errors_or_repr() -> None:
    """A SASL password set with the wrong protocol, or a token that fails validation:
    the message names the variable, never the value."""
    message = config_error({"KAFKA_SASL_PASSWORD": PASSWORD, "QODER_ACCESS_TOKEN": TOKEN})
    assert "KAFKA_SASL_PASSWORD" in message
    assert PASSWORD not in message and TOKEN not in message

    settings = load(
        {
            "QODER_ACCESS_TOKEN": TOKEN,
            "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "KAFKA_SASL_USERNAME": "bridge",
            "KAFKA_SASL_PASSWORD": PASSWORD,
        }
    )
    assert TOKEN not in repr(settings) and PASSWORD not in repr(settings)
    assert settings.kafka.sasl_password == Secret(PASSWORD)
    assert settings.kafka.sasl_mechanism == "PLAIN"  # the default once SASL is on


def test_values_are_normalised() -> None:
    """Case-insensitive choices, trimmed lists, de-duplicated session ids."""
    settings = load(
        {
            "KAFKA_SECURITY_PROTOCOL": "sasl_ssl",
            "KAFKA_SASL_MECHANISM": "scram-sha-512",
            "KAFKA_SASL_USERNAME": "u",
            "KAFKA_SASL_PASSWORD": PASSWORD,
            "BRIDGE_SESSIONS": " sess_a , sess_b,sess_a,, ",
            "KAFKA_BOOTSTRAP_SERVERS": "k0:9092, k1:9092",
            "KAFKA_COMPRESSION": "none",
            "BRIDGE_DELIVERY": "AT_LEAST_ONCE",
            "BRIDGE_LOG_LEVEL": "WARN",
            "QODER_API_URL": "http://127.0.0.1:8000/api/v1/cloud/",
        }
    )
    assert settings.kafka.security_protocol == "SASL_SSL"
    assert settings.kafka.sasl_mechanism == "SCRAM-SHA-512"
    assert settings.api.sessions == ("sess_a", "sess_b")
    assert settings.kafka.bootstrap_servers == "k0:9092,k1:9092"
    assert settings.kafka.compression is None
    assert settings.delivery.mode == "at_least_once"
    assert settings.log.level == "warning"
    assert settings.api.url == "http://127.0.0.1:8000/api/v1/cloud"


def test_ssl_files_that_exist_are_accepted(tmp_path: Path) -> None:
    """SSL with an existing CA file, client certificate and key."""
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("-----BEGIN CERTIFICATE-----\n")
    settings = load(
        {
            "KAFKA_SECURITY_PROTOCOL": "SSL",
            "KAFKA_SSL_CAFILE": str(tmp_path / "ca.pem"),
            "KAFKA_SSL_CERTFILE": str(tmp_path / "cert.pem"),
            "KAFKA_SSL_KEYFILE": str(tmp_path / "key.pem"),
        }
    )
    assert settings.kafka.ssl_cafile == tmp_path / "ca.pem"


def test_unknown_override_is_a_config_error() -> None:
    """The CLI can only pass settings the table knows."""
    assert "NOT_A_SETTING" in config_error(overrides={"NOT_A_SETTING": "1"})


def test_env_vars_table_covers_every_field_exactly_once() -> None:
    """ENV_VARS is the single table: each Settings field has exactly one variable, each
    variable one unique flag and config-file key."""
    groups = {
        "api": ApiSettings,
        "kafka": KafkaSettings,
        "delivery": DeliverySettings,
        "http": HttpSettings,
        "shutdown": ShutdownSettings,
        "log": LogSettings,
    }
    fields = {f"{g}.{f.name}" for g, cls in groups.items() for f in dataclasses.fields(cls)}
    # The one open-ended family, KAFKA_PRODUCER_<PROPERTY>, has a row of its own.
    fields.remove("kafka.producer_overrides")
    assert sorted(v.field for v in ENV_VARS) == sorted(fields)
    assert len({v.flag for v in ENV_VARS}) == len(ENV_VARS)
    assert len({v.config_key for v in ENV_VARS}) == len(ENV_VARS)
    assert next(v for v in ENV_VARS if v.name == "BRIDGE_HTTP_PORT").flag == "--http-port"


def test_config_table_markdown_lists_every_variable() -> None:
    """The README table is generated from ENV_VARS, defaults included."""
    table = config_table_markdown()
    for var in ENV_VARS:
        assert f"`{var.name}`" in table
        assert f"`{var.flag}`" in table
    assert "(alias `QODER_PAT`)" in table
    assert "| `BRIDGE_HTTP_PORT` | `--http-port` | `8080` |" in table


def test_env_token_reads_either_name() -> None:
    """`simulate` takes its default token from QODER_ACCESS_TOKEN or QODER_PAT."""
    assert env_token({}) is None
    assert env_token({"QODER_PAT": f" {TOKEN} "}) == Secret(TOKEN)
    assert env_token({"QODER_ACCESS_TOKEN": TOKEN, "QODER_PAT": "other"}) == Secret(TOKEN)


def test_producer_properties_pass_through_from_env_flag_and_file(tmp_path: Path) -> None:
    """KAFKA_PRODUCER_<PROPERTY> in the environment, ``--kafka-producer property=value``
    (overrides) and a ``[kafka_producer]`` table with Kafka's dotted names: typed, with the
    usual precedence (flag, environment, file)."""
    config = tmp_path / "bridge.toml"
    config.write_text(
        "kafka_producer_retry_backoff_ms = 300\n"
        "[kafka_producer]\n"
        'client.id = "from-file"\n'
        '"request.timeout.ms" = 20000\n'
        "metadata.max.age.ms = 60000\n"
    )
    settings = load(
        {"KAFKA_PRODUCER_CLIENT_ID": "from-env", "KAFKA_PRODUCER_BATCH_SIZE": "32768"},
        config_file=config,
        overrides={"KAFKA_PRODUCER_REQUEST_TIMEOUT_MS": "9000"},
    )
    assert dict(settings.kafka.producer_overrides) == {
        "client.id": "from-env",
        "request.timeout.ms": 9000,
        "metadata.max.age.ms": 60000,
        "batch.size": 32768,
        "retry.backoff.ms": 300,
    }
    flat = tmp_path / "flat.toml"
    flat.write_text('kafka_producer_client_id = "flat"\n')
    assert load(config_file=flat).kafka.producer_overrides == (("client.id", "flat"),)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"KAFKA_PRODUCER_ACKS": "1"}, "KAFKA_PRODUCER_ACKS: acks is not for the operator"),
        (
            {"KAFKA_PRODUCER_ENABLE_IDEMPOTENCE": "false"},
            "KAFKA_PRODUCER_ENABLE_IDEMPOTENCE: enable.idempotence is not for the operator",
        ),
        (
            {"KAFKA_PRODUCER_TRANSACTIONAL_ID": "x"},
            "KAFKA_PRODUCER_TRANSACTIONAL_ID: transactional.id is not for the operator to "
            "override: set BRIDGE_TRANSACTIONAL_ID",
        ),
        (
            {"KAFKA_PRODUCER_TRANSACTION_TIMEOUT_MS": "1000"},
            "set BRIDGE_TRANSACTION_TIMEOUT_MS",
        ),
        ({"KAFKA_PRODUCER_ISOLATION_LEVEL": "read_committed"}, "a consumer setting"),
        (
            {"KAFKA_PRODUCER_BUFFER_MEMORY": "1"},
            "KAFKA_PRODUCER_BUFFER_MEMORY: buffer.memory is a Java client property",
        ),
        (
            {"KAFKA_PRODUCER_CLIENT_IDD": "x"},
            "unknown Kafka producer property 'client.idd' (did you mean 'client.id'?)",
        ),
        ({"KAFKA_PRODUCER_REQUEST_TIMEOUT_MS": "soon"}, "expected an integer >= 1, got 'soon'"),
        (
            {"KAFKA_PRODUCER_LINGER_MS": "9", "KAFKA_LINGER_MS": "8"},
            "both KAFKA_LINGER_MS and KAFKA_PRODUCER_LINGER_MS are set",
        ),
        (
            {"KAFKA_PRODUCER_SERVICE_HOST": "10.0.0.7"},
            "Kubernetes service link variable",
        ),
    ],
)
def test_producer_properties_the_bridge_controls_or_cannot_use_are_refused(
    env: dict[str, str], message: str
) -> None:
    """The properties that would break a delivery guarantee, Java-only ones and typos fail
    start-up, naming the variable."""
    assert message in config_error(env)


def test_producer_property_flag_names_its_origin() -> None:
    assert "(from --kafka-producer batch.size)" in config_error(
        overrides={"KAFKA_PRODUCER_BATCH_SIZE": "big"}
    )


def test_topic_settings_per_topic() -> None:
    """BRIDGE_TOPIC_PARTITIONS is the events topic's only (the README said so); each topic has
    its own partitions and ``name=value`` configs, list values included."""
    default = load().kafka
    assert (default.topic_partitions, default.alerts_topic_partitions) == (6, 1)
    assert default.dlq_topic_partitions == 1  # the checkpoint topic's are the 32 shards
    kafka = load(
        {
            "BRIDGE_TOPIC_PARTITIONS": "12",
            "BRIDGE_ALERTS_TOPIC_PARTITIONS": "3",
            "BRIDGE_TOPIC_CONFIG": " retention.ms=604800000 , cleanup.policy=compact,delete",
            "BRIDGE_DLQ_TOPIC_CONFIG": "retention.ms=-1",
        }
    ).kafka
    assert (kafka.topic_partitions, kafka.alerts_topic_partitions) == (12, 3)
    assert kafka.dlq_topic_partitions == 1
    assert kafka.topic_config == (
        ("retention.ms", "604800000"),
        ("cleanup.policy", "compact,delete"),
    )
    assert kafka.dlq_topic_config == (("retention.ms", "-1"),)


def test_topic_configs_from_a_toml_table(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text("[bridge_topic_config]\nretention.ms = 604800000\nmin.insync.replicas = 1\n")
    assert load(config_file=config).kafka.topic_config == (
        ("retention.ms", "604800000"),
        ("min.insync.replicas", "1"),
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"BRIDGE_TOPIC_CONFIG": "retention"}, "BRIDGE_TOPIC_CONFIG: expected a comma-separated"),
        ({"BRIDGE_TOPIC_CONFIG": "Retention.MS=1"}, "'Retention.MS=1' is not one"),
        ({"BRIDGE_TOPIC_CONFIG": "retention.ms=1,retention.ms=2"}, "retention.ms is given twice"),
        ({"BRIDGE_DLQ_TOPIC_PARTITIONS": "0"}, "BRIDGE_DLQ_TOPIC_PARTITIONS: expected an integer"),
        (
            {"BRIDGE_CHECKPOINT_TOPIC_CONFIG": "cleanup.policy=delete"},
            "BRIDGE_CHECKPOINT_TOPIC_CONFIG: cleanup.policy must include compact",
        ),
        (
            {"BRIDGE_ALERTS_TOPIC_CONFIG": "min.insync.replicas=2"},
            "BRIDGE_ALERTS_TOPIC_CONFIG: min.insync.replicas=2 is more than "
            "BRIDGE_REPLICATION_FACTOR=1",
        ),
    ],
)
def test_bad_topic_settings_name_the_setting(env: dict[str, str], message: str) -> None:
    assert message in config_error(env)


def test_summary_interval_can_be_turned_off() -> None:
    assert load().log.summary_interval_s == 60.0
    assert load({"BRIDGE_LOG_SUMMARY_INTERVAL_S": "0"}).log.summary_interval_s == 0.0
    assert "seconds >= 0" in config_error({"BRIDGE_LOG_SUMMARY_INTERVAL_S": "-1"})
