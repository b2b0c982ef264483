"""--config FILE (TOML or YAML), LUAWS_* environment variables and their precedence
(command line > environment > file > default), `luaws config`, and --log-format."""
import json
import os
import re
import subprocess

import websockets.sync.client

from conftest import BINARY, ROOT

TIMESTAMP_TEXT = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d{4}"
TIMESTAMP_JSON = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


def clean_env(**extra):
    """The test runner's environment without LUAWS_* (LUAWS_BIN included: the binary must not
    see what a developer happens to have set), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUAWS_")}
    env.update(extra)
    return env


def run_luaws(*args, env=None, timeout=30):
    return subprocess.run([str(BINARY), *args], capture_output=True, text=True, timeout=timeout,
                          env=clean_env(**(env or {})))


def effective(*args, env=None):
    """`luaws config ARGS` as {option: (value, source)}."""
    done = run_luaws("config", *args, env=env)
    assert done.returncode == 0, done.stderr
    table = {}
    for line in done.stdout.splitlines():
        if line.startswith("#"):
            continue
        match = re.fullmatch(r"(\S+) = (.*?)\s+# (\S+)", line)
        assert match, line
        table[match.group(1)] = (match.group(2), match.group(3))
    return table, done.stdout


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


# MARK: precedence

def test_file_env_and_flags_override_each_other_in_order(tmp_path):
    config = write(tmp_path, "luaws.toml", """
port = 1111
max-connections = 5
idle_timeout = 7        # the snake_case spelling is accepted too
ping-interval = 8
ws-path = ["/a", "/b"]
compression = false
reuse-port = true
allow-origin = ["https://file.example"]
""")
    table, _ = effective(
        "--config", str(config), "--idle-timeout", "10", "--allow-origin", "https://flag.example",
        env={"LUAWS_MAX_CONNECTIONS": "6", "LUAWS_IDLE_TIMEOUT": "9", "LUAWS_WS_PATH": "/c, /d",
             "LUAWS_REUSE_PORT": "false"})
    assert table["port"] == ("1111", "file")                    # file only
    assert table["ping-interval"] == ("8", "file")
    assert table["max-connections"] == ("6", "env")             # env beats file
    assert table["idle-timeout"] == ("10", "flag")            # flag beats env and file
    assert table["pong-timeout"] == ("30.0", "default")
    assert table["ws-path"] == ('["/c", "/d"]', "env")          # a list is replaced whole
    assert table["allow-origin"] == ('["https://flag.example"]', "flag")
    assert table["compression"] == ("false", "file")            # flags from booleans
    assert table["reuse-port"] == ("false", "env")              # env false beats file true


def test_flag_inversion_and_env_booleans(tmp_path):
    config = write(tmp_path, "luaws.toml", "compression = false\n")
    table, _ = effective("--config", str(config), env={"LUAWS_COMPRESSION": "yes"})
    assert table["compression"] == ("true", "env")
    table, _ = effective("--config", str(config), "--compression", env={"LUAWS_COMPRESSION": "0"})
    assert table["compression"] == ("true", "flag")
    table, _ = effective(env={"LUAWS_CONFIG": str(config)})       # the file named by the environment
    assert table["compression"] == ("false", "file")


def test_vars_merge_by_name_across_sources(tmp_path):
    config = write(tmp_path, "luaws.toml", """
[var]
a = "file"
b = "file"
""")
    table, _ = effective("--config", str(config), "--var", "a=flag", env={"LUAWS_VAR": "b=env,c=env"})
    value, source = table["var"]
    assert source == "file+env+flag"
    # Later wins per NAME, as luaws reads them: a=flag, b=env, c=env.
    items = json.loads(value)
    merged = dict(item.split("=", 1) for item in items)
    assert merged == {"a": "flag", "b": "env", "c": "env"}


def test_the_server_runs_with_what_the_file_says(tmp_path, start_server):
    # The idle push interval comes from the file's [var] table, the log format from the
    # environment-free file; the fixture's own --host/--port flags win over the file's port.
    config = write(tmp_path, "luaws.toml", f"""
scripts = "{ROOT / 'scripts'}"
port = 1
log-format = "json"
[var]
time_interval = 0.5
""")
    server = start_server("--config", str(config), "--public", str(ROOT / "public"))
    with websockets.sync.client.connect(server.url, open_timeout=5) as ws:
        assert ws.recv(timeout=3).startswith("It is: ")
        ws.send("hi")
        for _ in range(5):
            if ws.recv(timeout=3) == "Message received: hi":
                break
        else:
            raise AssertionError("no echo")
    assert server.wait_for_log(r'"message":"access id=')
    assert server.port != 1


# MARK: formats

def test_yaml_and_toml_give_the_same_configuration(tmp_path):
    toml = write(tmp_path, "luaws.toml", """
port = 2222
ws-path = ["/x"]
access-log = "off"
compression = false
trust-proxy = ["127.0.0.1", "10.0.0.0/8"]
var = ["x=1"]
hook-timeout = 2.5
""")
    yaml = write(tmp_path, "luaws.yaml", """
port: 2222
ws_path: [/x]
access-log: off        # plain off: text for an option, although YAML 1.1 calls it false
compression: false
trust-proxy:
  - 127.0.0.1
  - 10.0.0.0/8
var:
  x: 1
hook-timeout: 2.5
""")
    from_toml, _ = effective("--config", str(toml))
    from_yaml, _ = effective("--config", str(yaml))
    assert from_toml == from_yaml
    assert from_yaml["access-log"] == ('"off"', "file")
    assert from_yaml["trust-proxy"] == ('["127.0.0.1", "10.0.0.0/8"]', "file")
    assert from_yaml["hook-timeout"] == ("2.5", "file")


def test_the_example_in_deploy_is_valid():
    table, _ = effective("--config", str(ROOT / "deploy" / "luaws.toml"))
    assert table["trust-proxy"] == ('["127.0.0.1"]', "file")
    assert table["log-format"] == ('"json"', "file")


# MARK: mistakes stop start-up, naming the file, the key and the reason

def start_fails(*args, env=None):
    done = run_luaws(*args, "--port", "0", env=env)
    assert done.returncode != 0, done.stdout
    assert "listening" not in done.stdout
    return done.stderr


def test_unknown_key_stops_start_up_with_its_name(tmp_path):
    for name, text in [("luaws.toml", "port = 0\nmax-conections = 5\n"),
                       ("luaws.yml", "port: 0\nmax-conections: 5\n")]:
        config = write(tmp_path, name, text)
        stderr = start_fails("--config", str(config))
        assert f"{config}: key 'max-conections': unknown key" in stderr, stderr


def test_bad_values_stop_start_up_with_key_and_reason(tmp_path):
    cases = [
        ('max-connections = "lots"', "max-connections", r"The value 'lots' is invalid for '--max-connections"),
        ('log-format = "xml"', "log-format", r"'xml' is invalid for '--log-format"),
        ("handshake-timeout = -1", "handshake-timeout", r"timeouts and intervals must be positive"),
        ('ws-path = "chat"', "ws-path", r"--ws-path must start with /"),
        ("port = [1, 2]", "port", r"takes one value, not a list"),
        ('compression = "no"', "compression", r"takes true or false"),
        ("cluster = true", "cluster", r"--cluster needs --redis"),
    ]
    for text, key, reason in cases:
        config = write(tmp_path, "luaws.toml", text + "\n")
        stderr = start_fails("--config", str(config))
        assert f"{config}: key '{key}': " in stderr, (text, stderr)
        assert re.search(reason, stderr), (text, stderr)


def test_bad_environment_value_names_the_variable():
    stderr = start_fails(env={"LUAWS_MAX_MESSAGE_SIZE": "big"})
    assert "environment variable LUAWS_MAX_MESSAGE_SIZE: " in stderr and "'big'" in stderr, stderr
    stderr = start_fails(env={"LUAWS_CLUSTER": "maybe"})
    assert "environment variable LUAWS_CLUSTER: takes true or false" in stderr, stderr


def test_file_errors(tmp_path):
    stderr = start_fails("--config", str(tmp_path / "missing.toml"))
    assert "missing.toml: cannot read" in stderr
    broken = write(tmp_path, "broken.toml", "port = \n")
    assert re.search(r"broken\.toml:1:\d+: ", start_fails("--config", str(broken)))
    ini = write(tmp_path, "luaws.ini", "port=1\n")
    assert "ends in .toml, .yaml or .yml" in start_fails("--config", str(ini))
    both = write(tmp_path, "both.toml", "max-connections = 1\nmax_connections = 2\n")
    assert "the same option as key" in start_fails("--config", str(both))


def test_help_works_with_a_broken_file(tmp_path):
    broken = write(tmp_path, "broken.toml", "nonsense = 1\n")
    done = run_luaws("serve", "--help", env={"LUAWS_CONFIG": str(broken)})
    assert done.returncode == 0 and "--config" in done.stdout and "--log-format" in done.stdout


# MARK: luaws config

def test_config_masks_secrets(tmp_path):
    config = write(tmp_path, "luaws.toml", """
redis = "redis://:hunter2@127.0.0.1:6379/0"
var = ["API_KEY=k3y", "db_password=pw1", "plain=visible"]
""")
    table, out = effective("--config", str(config), env={"LUAWS_VAR": "SESSION_TOKEN=t0k"})
    for secret in ("hunter2", "k3y", "pw1", "t0k"):
        assert secret not in out, out
    assert table["redis"] == ('"redis://:****@127.0.0.1:6379/0"', "file")
    assert '"API_KEY=****"' in table["var"][0] and '"db_password=****"' in table["var"][0]
    assert '"SESSION_TOKEN=****"' in table["var"][0] and '"plain=visible"' in table["var"][0]
    # A password may hold "/" and "@": the user information ends at the last "@".
    table, out = effective(env={"LUAWS_REDIS": "redis://:a/b@c@127.0.0.1:6379"})
    assert table["redis"] == ('"redis://:****@127.0.0.1:6379"', "env") and "a/b" not in out
    # A user name stays, the password goes.
    table, out = effective(env={"LUAWS_REDIS": "redis://app:s3cret@127.0.0.1:6379"})
    assert table["redis"] == ('"redis://app:****@127.0.0.1:6379"', "env") and "s3cret" not in out


def test_config_lists_every_option_with_its_source():
    table, out = effective("--port", "9")
    help_text = run_luaws("serve", "--help").stdout
    options = set(re.findall(r"^\s+--(?:\[no-\])?([a-z][a-z0-9-]+)", help_text, re.M)) - {"help", "version", "config"}
    shown = set(table) | set(re.findall(r"^# (\S+) \(not set\)$", out, re.M))
    assert options <= shown, options - shown
    assert table["port"] == ("9", "flag")
    assert table["host"] == ('"127.0.0.1"', "default")
    assert "# redis (not set)" in out


# MARK: logs

def test_json_logs_parse_and_have_millisecond_timestamps(tmp_path, start_server):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    # A log message with a quote, a backslash, a newline and a control character: still one line
    # of valid JSON.
    (scripts / "echo.lua").write_text(
        'return { on_message = function(conn, msg) luaws.log("info", "say \\"" .. msg .. "\\"\\\\\\n\\1") conn:send(msg) end }\n')
    server = start_server("--scripts", str(scripts), "--log-format", "json")
    with websockets.sync.client.connect(server.url, open_timeout=5) as ws:
        ws.send("x")
        assert ws.recv(timeout=3) == "x"
    assert server.wait_for_log(r"access id=")
    server.stop()
    lines = [line for line in server.stderr.splitlines() if line.strip()]
    assert lines
    for line in lines:
        entry = json.loads(line)
        assert set(entry) == {"ts", "level", "label", "message", "metadata"}, entry
        assert re.fullmatch(TIMESTAMP_JSON, entry["ts"]), entry
        assert isinstance(entry["metadata"], dict)
    said = [json.loads(line)["message"] for line in lines if "say " in line]
    assert len(said) == 1 and said[0].endswith('say "x"\\\n\x01'), said
    access = [json.loads(line) for line in lines if "access id=" in line]
    assert access[0]["level"] == "info" and access[0]["label"] == "luaws"


def test_text_logs_have_millisecond_timestamps(tmp_path, start_server):
    server = start_server("--scripts", str(ROOT / "scripts"))
    assert server.wait_for_log(r"plugins: ")
    line = next(line for line in server.stderr.splitlines() if "plugins: " in line)
    assert re.match(TIMESTAMP_TEXT + r" info luaws: \[\w+\] plugins: ", line), line


def test_config_shows_misspelt_variables():
    _, out = effective(env={"LUAWS_MAX_CONECTIONS": "5"})
    assert "# ignored, no such option: LUAWS_MAX_CONECTIONS" in out


def test_config_output_is_a_config_file(tmp_path):
    """What `luaws config` prints reads back (TOML) to the same values."""
    import tomllib
    config = write(tmp_path, "luaws.yaml", "port: 3333\nws-path: [/a, /b]\ncompression: false\nvar: {x: 1}\n")
    table, out = effective("--config", str(config), "--idle-timeout", "4")
    assert tomllib.loads(out)["port"] == 3333
    again = write(tmp_path, "again.toml", out)
    table_again, _ = effective("--config", str(again))
    assert {k: v for k, (v, _) in table.items()} == {k: v for k, (v, _) in table_again.items()}
    assert {source for _, source in table_again.values()} == {"file"}
