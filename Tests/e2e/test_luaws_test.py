"""`luaws test`: plugin tests in-process, on a virtual clock, without sockets (issue 12)."""
import re
import subprocess
import time
from pathlib import Path

from conftest import BINARY, ROOT

ECHO = 'return { on_message = function(conn, msg) conn:send("Message received: " .. msg) end }\n'
WEATHER = '''return {
  on_message = function(conn, msg)
    local res, err = luaws.http.request{ url = "https://weather.example/today" }
    conn:send(res and res.body or ("no weather: " .. err))
  end,
}
'''


def luaws_test(*args, cwd=ROOT, timeout=60):
    return subprocess.run([str(BINARY), "test", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def project(tmp_path, plugins, tests):
    """A scripts folder with `plugins` ({file: source}) and tests/ with `tests` ({file: source})."""
    scripts = tmp_path / "scripts"
    (scripts / "tests").mkdir(parents=True)
    for name, source in plugins.items():
        (scripts / name).write_text(source)
    for name, source in tests.items():
        (scripts / "tests" / name).write_text(source)
    return scripts


def test_the_shipped_scripts_pass():
    done = luaws_test("--scripts", "scripts", "scripts/tests")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert re.fullmatch(r"\d+ passed, 0 failed", lines[-1]), lines[-1]
    assert "# scripts/tests/echo_test.lua" in lines and "# scripts/tests/chat_test.lua" in lines
    assert "ok - echo answers a text message" in lines
    assert not any(line.startswith("FAIL") for line in lines)


def test_defaults_to_the_tests_folder_of_the_scripts(tmp_path):
    scripts = project(tmp_path, {"echo.lua": ECHO}, {"echo_test.lua": '''
local t = test
t.case("echo", function()
  local c = t.connect("/ws")
  c:send("hi")
  t.expect(c:recv(), "Message received: hi")
end)
'''})
    done = luaws_test(cwd=scripts.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-2:] == ["ok - echo", "1 passed, 0 failed"]


def test_a_failing_case_shows_file_line_expected_and_actual_and_exits_1(tmp_path):
    scripts = project(tmp_path, {"echo.lua": ECHO}, {"echo_test.lua": '''local t = test
t.case("passes", function()
  local c = t.connect("/ws")
  c:send("a")
  t.expect(c:recv(), "Message received: a")
end)
t.case("fails on purpose", function()
  local c = t.connect("/ws")
  c:send("hi")
  t.expect(c:recv(), "Message received: ho")
end)
'''})
    done = luaws_test("--scripts", str(scripts), str(scripts / "tests"))
    assert done.returncode == 1
    out = done.stdout
    assert "ok - passes" in out
    assert "FAIL - fails on purpose" in out
    assert re.search(r"echo_test\.lua:10: expect failed", out), out
    assert 'expected: "Message received: ho"' in out
    assert 'actual:   "Message received: hi"' in out
    assert out.splitlines()[-1] == "1 passed, 1 failed"


def test_an_hour_of_virtual_time_takes_well_under_a_second(tmp_path):
    scripts = project(tmp_path, {"time.lua": (ROOT / "scripts" / "time.lua").read_text()}, {"hour_test.lua": '''
local t = test
t.case("an hour", function()
  local c = t.connect("/ws")
  t.advance(3600)
  local pushes = c:recv_all()
  t.expect(#pushes, 360)
  t.expect(pushes[360], "It is: 2025-01-01T01:00:00")
end)
'''})
    started = time.monotonic()
    done = luaws_test("--scripts", str(scripts))
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    # The whole process (start, load, an hour of idle pushes, pings and pongs) in under 1 s.
    assert elapsed < 1.0, elapsed


def test_an_unstubbed_http_call_fails_clearly_and_reaches_no_network(tmp_path):
    scripts = project(tmp_path, {"weather.lua": WEATHER}, {"weather_test.lua": '''local t = test
t.case("without a stub", function()
  local c = t.connect("/ws")
  c:send("today?")
end)
t.case("with a stub", function()
  t.http_stub("https://weather.example/today", { status = 200, body = "sunny" })
  local c = t.connect("/ws")
  c:send("today?")
  t.expect(c:recv(), "sunny")
end)
'''})
    done = luaws_test("--scripts", str(scripts))
    assert done.returncode == 1
    out = done.stdout
    assert "FAIL - without a stub" in out
    assert re.search(r"weather_test\.lua:4: .*luaws\.http\.request GET https://weather\.example/today: no stub", out), out
    assert "tests never reach the network" in out
    assert "ok - with a stub" in out


def test_a_syntax_error_is_reported_with_file_and_line_and_counted(tmp_path):
    scripts = project(tmp_path, {"echo.lua": ECHO}, {
        "broken_test.lua": 'local t = test\nt.case("x", function()\n  t.expect(1, 1\nend)\n',
        "good_test.lua": 'test.case("fine", function() test.expect(1, 1) end)\n',
    })
    done = luaws_test("--scripts", str(scripts))
    assert done.returncode == 1
    out = done.stdout
    assert re.search(r"FAIL - .*broken_test\.lua does not load", out), out
    assert re.search(r"broken_test\.lua:4: .*expected", out), out
    assert "ok - fine" in out
    assert out.splitlines()[-1] == "1 passed, 1 failed"


def test_an_unknown_test_function_is_an_error_at_its_line(tmp_path):
    scripts = project(tmp_path, {"echo.lua": ECHO}, {"typo_test.lua": '''local t = test
t.case("typo", function()
  local c = t.connect("/ws")
  t.expekt(c:recv(), nil)
end)
'''})
    done = luaws_test("--scripts", str(scripts))
    assert done.returncode == 1
    assert re.search(r"typo_test\.lua:4: test\.expekt does not exist", done.stdout), done.stdout
