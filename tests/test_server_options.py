"""The server's two command lines, `promptcache serve` (typer) and `python -m promptcache.server`
(argparse), are made from ServerSettings: every field is an option of both, parsed alike, without
starting a server. Also the settings file and environment under them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from promptcache.cli import app as cli_app
from promptcache.cli import serve_settings
from promptcache.errors import ConfigError
from promptcache.files import user_cache_dir
from promptcache.server.__main__ import main as server_main
from promptcache.server.__main__ import parse_settings
from promptcache.server.settings import ServerSettings, command_line_options

# field -> (the option's arguments, the value they set); every value differs from the default.
NON_DEFAULT: dict[str, tuple[list[str], Any]] = {
    "model": (["--model", "my.gguf"], Path("my.gguf")),
    "host": (["--host", "0.0.0.0"], "0.0.0.0"),
    "port": (["--port", "8123"], 8123),
    "api_key": (["--api-key", "s3cret"], "s3cret"),
    "workers": (["--workers", "2"], 2),
    "threads": (["--threads", "3"], 3),
    "parallel": (["--parallel", "4"], 4),
    "prefill_budget": (["--prefill-budget", "64"], 64),
    "exact_chunk": (["--exact-chunk", "32"], 32),
    "max_kv_bytes": (["--max-kv-bytes", "1048576"], 1 << 20),
    "max_streams_per_client": (["--max-streams-per-client", "2"], 2),
    "max_queue": (["--max-queue", "0"], 0),
    "n_ctx": (["--n-ctx", "512"], 512),
    "max_tokens": (["--max-tokens", "64"], 64),
    "max_body_bytes": (["--max-body-bytes", "65536"], 65536),
    "config": (["--config", "{config}"], "{config}"),
    "cache": (["--cache", "disk"], "disk"),
    "cache_bytes": (["--cache-bytes", "1048576"], 1 << 20),
    "cache_dir": (["--cache-dir", "/tmp/pc-kv"], Path("/tmp/pc-kv")),
    "session_dir": (["--session-dir", "/tmp/pc-sessions"], Path("/tmp/pc-sessions")),
    "exact": (["--no-exact"], False),
    "kv_events": (["--kv-events", "tcp://*:5557"], "tcp://*:5557"),
    "kv_events_block_size": (["--kv-events-block-size", "8"], 8),
    "kv_events_layout": (["--kv-events-layout", "array"], "array"),
    "kv_events_topic": (["--kv-events-topic", "kv@pod-1@SmolLM2"], "kv@pod-1@SmolLM2"),
    "kv_events_replay": (["--kv-events-replay", "tcp://*:5567"], "tcp://*:5567"),
    "log_level": (["--log-level", "debug"], "debug"),
}

PARSERS = {"promptcache serve": serve_settings, "python -m promptcache.server": parse_settings}


@pytest.fixture(autouse=True)
def _no_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("PROMPTCACHE_"):
            monkeypatch.delenv(name)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "promptcache.toml"
    path.write_text('[cache]\nmemory_size = "64MB"\n\n[server]\nport = 9001\n')
    return path


def _fill(args: list[str], config_file: Path) -> list[str]:
    return [a.format(config=config_file) for a in args]


def test_the_table_covers_every_setting() -> None:
    # A new ServerSettings field must get a row above, so the tests below reach it.
    assert set(NON_DEFAULT) == set(ServerSettings.model_fields)
    assert [o.field for o in command_line_options()] == list(ServerSettings.model_fields)


@pytest.mark.parametrize("command", PARSERS)
@pytest.mark.parametrize("field", list(NON_DEFAULT))
def test_every_setting_is_an_option(command: str, field: str, config_file: Path) -> None:
    args, value = NON_DEFAULT[field]
    if value == "{config}":
        value = config_file
    default = ServerSettings.load()
    settings = PARSERS[command](_fill(args, config_file))
    assert getattr(settings, field) == value != getattr(default, field)
    changed = {k for k, v in settings.model_dump().items() if v != getattr(default, k)}
    # The config file sets the port too; every other option sets only its own field.
    assert changed == ({field, "port"} if field == "config" else {field})


def test_both_commands_parse_every_option_at_once_alike(config_file: Path) -> None:
    argv = [a for args, _ in NON_DEFAULT.values() for a in _fill(args, config_file)]
    typer_settings, argparse_settings = (parse(argv) for parse in PARSERS.values())
    assert typer_settings == argparse_settings
    assert typer_settings.port == 8123  # the command line outranks the file's port = 9001


@pytest.mark.parametrize("parse", PARSERS.values(), ids=list(PARSERS))
def test_bool_options_and_what_is_not_given(parse: Any, tmp_path: Path, monkeypatch) -> None:
    assert parse([]) == ServerSettings.load()
    assert parse(["--exact"]).exact is True
    assert parse(["--no-exact"]).exact is False
    # An option not given leaves the file's value (and below it the environment's) in place:
    # neither command line may turn "not given" into a default.
    config = tmp_path / "server.yaml"
    config.write_text("exact: false\nworkers: 3\n")
    monkeypatch.setenv("PROMPTCACHE_WORKERS", "5")
    monkeypatch.setenv("PROMPTCACHE_MAX_QUEUE", "4")
    from_file = parse(["--config", str(config)])
    assert (from_file.exact, from_file.workers, from_file.max_queue) == (False, 3, 4)
    assert parse(["--config", str(config), "--exact", "--workers", "2"]).exact is True
    assert parse(["--config", str(config), "--workers", "2"]).workers == 2


@pytest.mark.parametrize("parse", PARSERS.values(), ids=list(PARSERS))
def test_readme_server_commands(parse: Any, tmp_path: Path) -> None:
    assert parse(["--port", "8000"]).port == 8000
    assert parse(["--no-exact"]).exact is False
    keyed = parse("--model my.gguf --workers 2 --api-key s3cret --cache disk".split())
    assert (keyed.model, keyed.workers, keyed.api_key, keyed.cache) == (
        Path("my.gguf"),
        2,
        "s3cret",
        "disk",
    )
    config = tmp_path / "promptcache.toml"
    config.write_text('[cache]\ndisk_size = "512MB"\n\n[server]\nworkers = 2\n')
    tiered = parse(["--cache", "tiered", "--config", str(config)])
    assert (tiered.cache, tiered.config, tiered.workers) == ("tiered", config, 2)


@pytest.mark.parametrize("parse", PARSERS.values(), ids=list(PARSERS))
def test_bad_values_are_config_errors(parse: Any) -> None:
    with pytest.raises(ConfigError, match="workers"):
        parse(["--workers", "0"])
    with pytest.raises(ConfigError, match="max_body_bytes"):
        parse(["--max-body-bytes", "10"])


def test_unknown_options_and_choices_are_usage_errors() -> None:
    for argv in (["--cache", "bogus"], ["--no-such-option"], ["--port", "eighty"]):
        # click's UsageError (typer may vendor its own click, so it is matched by name)
        with pytest.raises(Exception) as exc_info:  # noqa: B017 - checked below
            serve_settings(argv)
        assert "UsageError" in [c.__name__ for c in type(exc_info.value).__mro__]
        with pytest.raises(SystemExit) as exit_info:
            parse_settings(argv)
        assert exit_info.value.code == 2


def test_bad_settings_exit_2_with_the_reason(capsys: pytest.CaptureFixture[str]) -> None:
    assert server_main(["--workers", "0"]) == 2
    assert "workers" in capsys.readouterr().err
    result = CliRunner().invoke(cli_app, ["serve", "--workers", "0"])
    assert result.exit_code == 2
    assert "workers" in result.output


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "promptcache.cli", "serve", "--help"],
        [sys.executable, "-m", "promptcache.server", "--help"],
    ],
    ids=["promptcache serve", "python -m promptcache.server"],
)
def test_help_lists_every_option(command: list[str]) -> None:
    proc = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200", "TERMINAL_WIDTH": "200"},
    )
    assert proc.returncode == 0, proc.stderr
    for option in command_line_options():
        assert option.flag in proc.stdout
        if option.kind is bool:
            assert option.negative_flag in proc.stdout
    assert "OpenAI-compatible" in proc.stdout
    assert "(default: 8000)" in proc.stdout


# ------------------------------------------------------------------------------------ settings


def test_settings_file_sections_and_default_session_dir(tmp_path: Path) -> None:
    assert ServerSettings.load().sessions_path == user_cache_dir("sessions")
    top_level = tmp_path / "top.toml"
    top_level.write_text('port = 8111\nmax-queue = 2\n\n[cache]\nmemory_size = "64MB"\n')
    assert (ServerSettings.load(top_level).port, ServerSettings.load(top_level).max_queue) == (
        8111,
        2,
    )
    under_serve = tmp_path / "serve.yml"
    under_serve.write_text("serve:\n  port: 8222\ncache:\n  memory_size: 64MB\n")
    assert ServerSettings.load(under_serve).port == 8222
    broken = tmp_path / "broken.toml"
    broken.write_text("port = \n")
    with pytest.raises(ConfigError, match="broken.toml"):
        ServerSettings.load(broken)
    with pytest.raises(ConfigError, match="cannot read"):
        ServerSettings.load(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="no_such_setting"):
        ServerSettings.load(None, no_such_setting=1)
