"""Configuration: flag > environment > config file > default, seen by real
processes (a broker binds the port that wins, `health` and `generate` dial the
GEOMGEN_BROKER address), `geomgen config show`, one-line errors naming the file,
the key and the value, and the example file in deploy/ loading as it is."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from geomgen import config
from geomgen.cli import cli
from tests.conftest import REPO, free_base_port, wait_for

EXAMPLE = REPO / "deploy" / "geomgen.example.toml"
SAMPLES = REPO / "src" / "geomgen" / "samples"


def geomgen(*args: str, env: dict | None = None, timeout_s: float = 60) -> subprocess.CompletedProcess:
    """``python -m geomgen ARGS`` with no GEOMGEN_* settings inherited but those in ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GEOMGEN_") or k == "GEOMGEN_CACHE_DIR"}
    return subprocess.run([sys.executable, "-m", "geomgen", *args], capture_output=True, text=True,
                          timeout=timeout_s, env={**clean, "PYTHONUNBUFFERED": "1", **(env or {})})


def health_ok(address: str, env: dict | None = None) -> bool:
    return geomgen("health", "--json", "--timeout", "1", env={**(env or {}), "GEOMGEN_BROKER": address}).returncode == 0


def show(*args: str, env: dict | None = None) -> dict[str, dict]:
    result = geomgen(*args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return {row["key"]: row for row in json.loads(result.stdout)["settings"]}


def test_a_real_broker_binds_the_port_that_wins(procs, tmp_path):
    """file [broker] port < GEOMGEN_BROKER_PORT < --port; health finds each through GEOMGEN_BROKER."""
    file_port, env_port, flag_port = (free_base_port() for _ in range(3))
    site = tmp_path / "site.toml"
    site.write_text(f"[broker]\nport = {file_port}\n")
    by_file = procs.start("--config", str(site), "broker", name="by-file")
    by_env = procs.start("broker", env={"GEOMGEN_CONFIG": str(site), "GEOMGEN_BROKER_PORT": str(env_port)},
                         name="by-env")
    by_flag = procs.start("--config", str(site), "broker", "--port", str(flag_port),
                          env={"GEOMGEN_BROKER_PORT": str(env_port + 10)}, name="by-flag")
    for proc, port in ((by_file, file_port), (by_env, env_port), (by_flag, flag_port)):
        wait_for(lambda: health_ok(f"127.0.0.1:{port}") or proc.poll() is not None, timeout_s=60,
                 what=f"a broker on {port}")
        assert proc.poll() is None, proc.log_path.read_text()
    assert not health_ok(f"127.0.0.1:{env_port + 10}")  # the flag beat that environment variable


def test_health_dials_the_broker_of_the_file_unless_the_environment_names_another(procs, tmp_path):
    port, other = free_base_port(), free_base_port()
    procs.start("broker", "--port", str(port))
    site = tmp_path / "site.toml"
    site.write_text(f'[all]\nbroker = "tcp://127.0.0.1:{port}"\n')
    wait_for(lambda: health_ok(f"127.0.0.1:{port}"), timeout_s=60, what="the broker")
    assert geomgen("--config", str(site), "health", "--timeout", "5").returncode == 0
    missed = geomgen("--config", str(site), "health", "--timeout", "0.5",
                     env={"GEOMGEN_BROKER": f"127.0.0.1:{other}"})
    assert missed.returncode == 2 and f"tcp://127.0.0.1:{other}" in missed.stderr


def test_generate_sends_to_GEOMGEN_BROKER_instead_of_starting_a_stack(tmp_path):
    port = free_base_port()
    result = geomgen("generate", str(SAMPLES / "mug.png"), "--out", str(tmp_path), "--height", "0.1", "--json",
                     "--timeout", "1", env={"GEOMGEN_BROKER": f"127.0.0.1:{port}"})
    assert result.returncode == 1, result.stderr
    row = json.loads(result.stdout.splitlines()[0])
    assert row["stage"] == "transport" and f"tcp://127.0.0.1:{port}" in row["error"]
    assert "embedded stack" not in result.stderr


def test_config_show_names_each_source(tmp_path):
    site = tmp_path / "site.toml"
    site.write_text('[all]\nlog_level = "debug"\n\n[broker]\nmax_jobs = 10\nmax_client_jobs = 20\n'
                    'heartbeat_interval = 2\n')
    rows = show("--config", str(site), "config", "show", "broker", "--max-jobs", "12",
                env={"GEOMGEN_BROKER_MAX_JOBS": "11", "GEOMGEN_BROKER_MAX_BYTES": "4096",
                     "GEOMGEN_BROKER_MAX_CLIENT_BYTES": ""})
    assert (rows["max_jobs"]["value"], rows["max_jobs"]["source"], rows["max_jobs"]["from"]) == (12, "flag", "--max-jobs")
    assert (rows["max_bytes"]["value"], rows["max_bytes"]["source"]) == (4096, "env")
    assert rows["max_bytes"]["from"] == "GEOMGEN_BROKER_MAX_BYTES"
    assert (rows["max_client_jobs"]["value"], rows["max_client_jobs"]["source"]) == (20, "file")
    assert rows["max_client_jobs"]["from"] == f"{site.resolve()} [broker] max_client_jobs"
    assert (rows["log_level"]["value"], rows["log_level"]["from"]) == ("debug", f"{site.resolve()} [all] log_level")
    assert rows["heartbeat_interval"]["value"] == 2.0
    assert (rows["max_client_bytes"]["source"], rows["port"]["source"], rows["port"]["value"]) == ("default", "default",
                                                                                                    5555)
    assert rows["keys"]["env"] == ["GEOMGEN_KEYS"]
    text = geomgen("--config", str(site), "config", "show", "broker", env={"GEOMGEN_BROKER_MAX_JOBS": "11"})
    assert text.returncode == 0, text.stderr
    lines = {line.split("=")[0].strip(): line for line in text.stdout.splitlines() if "=" in line}
    assert "max_jobs = 11" in lines["max_jobs"] and "# env GEOMGEN_BROKER_MAX_JOBS" in lines["max_jobs"]
    assert f"# file {site.resolve()} [broker] max_client_jobs" in lines["max_client_jobs"]


def test_a_command_table_beats_the_shared_table(tmp_path):
    site = tmp_path / "site.toml"
    site.write_text('[all]\nlog_format = "json"\nbroker = "hub:7000"\n\n[sdf-worker]\nlog_format = "text"\n')
    sdf = show("--config", str(site), "config", "show", "sdf-worker")
    gpu = show("--config", str(site), "config", "show", "gpu-worker", "--backend", "mesh")
    assert (sdf["log_format"]["value"], gpu["log_format"]["value"]) == ("text", "json")
    assert sdf["broker"]["value"] == gpu["broker"]["value"] == "hub:7000"


def test_a_group_table_applies_to_its_subcommands(tmp_path):
    site = tmp_path / "site.toml"
    site.write_text('[keys]\nkeys = "/srv/keys"\n\n[keys.add]\nkeys = "/srv/other-keys"\n')
    listed = show("--config", str(site), "config", "show", "keys", "list")["keys"]
    added = show("--config", str(site), "config", "show", "keys", "add")["keys"]
    assert (listed["value"], listed["from"]) == ("/srv/keys", f"{site.resolve()} [keys] keys")
    assert (added["value"], added["from"]) == ("/srv/other-keys", f"{site.resolve()} [keys.add] keys")


BAD_FILES = {
    "unknown key": ("[broker]\nmax_job = 5\n", ["[broker]", "max_job = 5", "unknown key", "did you mean max_jobs"]),
    "wrong type": ('[broker]\nmax_jobs = "lots"\n', ["[broker]", 'max_jobs = "lots"', "integer"]),
    "bad value": ("[broker]\nmax_bytes = 0\n", ["[broker]", "max_bytes = 0", "range"]),
    "bad choice": ('[all]\nlog_level = "loud"\n', ["[all]", 'log_level = "loud"', "debug"]),
    "bad address": ('[gpu-worker]\nbroker = "tcp://"\n', ["[gpu-worker]", 'broker = "tcp://"', "HOST:PORT"]),
    "unknown table": ("[brokr]\nport = 1\n", ["[brokr]", "unknown table", "did you mean broker"]),
    "key outside a table": ("port = 5555\n", ["top level", "port = 5555", "[broker]"]),
    "per-command key in [all]": ("[all]\nport = 5555\n", ["[all]", "port = 5555", "not a shared key"]),
    "invalid TOML": ("[broker\nport = 1\n", ["not valid TOML", "line 1"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_bad_file_is_one_line_naming_the_file_key_and_value(tmp_path, case):
    content, expected = BAD_FILES[case]
    site = tmp_path / "site.toml"
    site.write_text(content)
    result = geomgen("--config", str(site), "health", "--timeout", "0.5")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"geomgen: error: config file {site}"), result.stderr
    for fragment in expected:
        assert fragment in lines[0], (fragment, lines[0])


def test_a_missing_file_names_where_it_was_given(tmp_path):
    missing = tmp_path / "nowhere.toml"
    for args, env, given_by in ((["--config", str(missing)], {}, "--config"),
                                ([], {"GEOMGEN_CONFIG": str(missing)}, "GEOMGEN_CONFIG")):
        result = geomgen(*args, "config", "show", "broker", env=env)
        assert result.returncode == 2
        assert result.stderr.strip() == f"geomgen: error: config file {missing} (from {given_by}) does not exist"


def test_a_bad_environment_value_names_the_variable():
    result = geomgen("config", "show", "broker", env={"GEOMGEN_BROKER_PORT": "five"})
    assert result.returncode == 0  # show reports what it reads...
    started = geomgen("broker", env={"GEOMGEN_BROKER_PORT": "five"})  # ...the command refuses it
    assert started.returncode == 2 and "GEOMGEN_BROKER_PORT" in started.stderr and "five" in started.stderr
    flagged = geomgen("broker", "--port", "five")  # a flag's bad value names the flag alone
    assert flagged.returncode == 2 and "'--port': 'five'" in flagged.stderr and "GEOMGEN" not in flagged.stderr


def test_the_example_file_loads_and_sets_what_it_says(tmp_path):
    """Every uncommented key of deploy/geomgen.example.toml validates and reaches its command."""
    import tomllib

    document = tomllib.loads(EXAMPLE.read_text())
    assert {"all", "broker", "gpu-worker", "sdf-worker", "serve", "generate"} <= set(document)
    for table, keys in document.items():
        command = "gpu-worker" if table == "all" else table
        extra = ["--backend", "mesh"] if command == "gpu-worker" else []
        rows = show("--config", str(EXAMPLE), "config", "show", command, *extra)
        for key, value in keys.items():
            row = rows[key]
            assert row["source"] == "file" and row["from"].endswith(f"[{table}] {key}"), row
            assert row["value"] == value or str(row["value"]) == str(value), (row, value)


def test_every_option_has_one_environment_variable_of_its_own():
    config.attach_envvars(cli)
    owners: dict[str, set] = {}
    for path, command in config.commands(cli):
        assert "all" not in path, "a command named 'all' would collide with the [all] table"
        for key, param in config.options(command):
            assert param.envvar, (path, key)
            owners.setdefault(param.envvar, set()).add(key)
    for name, keys in owners.items():
        assert name not in config.RESERVED_ENV, name
        assert len(keys) == 1, f"{name} stands for {keys}"
    assert owners["GEOMGEN_BROKER"] == {"broker"} and owners["GEOMGEN_LOG_LEVEL"] == {"log_level"}
    for name in ("GEOMGEN_KEY", "GEOMGEN_BROKER_KEY", "GEOMGEN_KEYS", "GEOMGEN_LOG_FORMAT", "GEOMGEN_BROKER_PORT",
                 "GEOMGEN_SERVE_PORT", "GEOMGEN_GATEWAY_PORT", "GEOMGEN_SDF_WORKER_PROCS"):
        assert name in owners, name


def test_config_show_of_an_unknown_command_names_the_commands():
    result = geomgen("config", "show", "brokr")
    assert result.returncode == 2
    assert "geomgen has no command 'brokr'; name a command of geomgen: broker," in result.stderr
