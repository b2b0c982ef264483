"""Hot reload keeps watching: the scripts folder deleted and recreated, folders made after start
(lib/, lib/sub/), files deep below. Every wait is bounded by a few seconds."""
import asyncio
import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
import websockets
from conftest import status, wait_until

ROOT = Path(__file__).resolve().parents[2]


def ask(server, text):
    """One message on a fresh connection; the first reply that is not the time push."""
    async def go():
        async with websockets.connect(server.url) as ws:
            await ws.send(text)
            while True:
                reply = await asyncio.wait_for(ws.recv(), 5)
                if not reply.startswith("It is: "):
                    return reply
    return asyncio.run(go())


@pytest.fixture
def scripts(tmp_path):
    folder = tmp_path / "scripts"
    shutil.copytree(ROOT / "scripts", folder, ignore=shutil.ignore_patterns("examples"))
    return folder


def test_scripts_folder_deleted_and_recreated_is_watched_again(scripts, start_server):
    server = start_server("--scripts", str(scripts))
    assert ask(server, "a") == "Message received: a"

    shutil.rmtree(scripts)
    assert server.wait_for_log(r"warning.*deleted or moved: hot reload paused")
    scripts.mkdir()
    (scripts / "echo.lua").write_text('return { on_message = function(conn, msg) conn:send("new: " .. msg) end }\n')

    assert server.wait_for_log(r"watching .* again: hot reload resumed")
    assert wait_until(lambda: status(server)["plugins"] == ["echo"] and status(server)["last_reload"]["ok"])
    assert ask(server, "b") == "new: b"

    # And the new folder is watched like the first one: an edit is served.
    version = status(server)["version"]
    tmp = scripts / ".echo.lua.tmp"
    tmp.write_text('return { on_message = function(conn, msg) conn:send("newer: " .. msg) end }\n')
    os.replace(tmp, scripts / "echo.lua")
    assert wait_until(lambda: status(server)["version"] > version)
    assert ask(server, "c") == "newer: c"


def test_scripts_folder_moved_away_and_back(scripts, tmp_path, start_server):
    server = start_server("--scripts", str(scripts))
    aside = tmp_path / "aside"
    scripts.rename(aside)
    assert server.wait_for_log(r"warning.*deleted or moved: hot reload paused")
    # Changes in the moved folder are not the scripts' any more: no reload for them.
    (aside / "echo.lua").write_text('return { on_message = function(conn, msg) conn:send("back: " .. msg) end }\n')
    aside.rename(scripts)
    assert server.wait_for_log(r"hot reload resumed")
    assert wait_until(lambda: ask(server, "x") == "back: x")


def test_lib_created_after_start_and_a_module_in_a_subfolder(scripts, start_server):
    assert not (scripts / "lib").exists()
    server = start_server("--scripts", str(scripts))
    version = status(server)["version"]

    (scripts / "lib" / "sub").mkdir(parents=True)
    (scripts / "lib" / "sub" / "m.lua").write_text('return { word = "one" }\n')
    (scripts / "echo.lua").write_text(
        'local m = require("sub.m")\n'
        'return { on_message = function(conn, msg) conn:send(m.word .. ": " .. msg) end }\n')
    assert wait_until(lambda: status(server)["version"] > version and status(server)["last_reload"]["ok"])
    assert wait_until(lambda: ask(server, "a") == "one: a")

    # Only the module changes: its folder, made after start, is watched.
    version = status(server)["version"]
    (scripts / "lib" / "sub" / "m.lua").write_text('return { word = "two" }\n')
    assert wait_until(lambda: status(server)["version"] > version)
    assert server.wait_for_log(r"reloaded \(lib/sub/m\.lua changed\)")
    assert ask(server, "b") == "two: b"


def test_folder_moved_in_with_modules_is_watched(scripts, tmp_path, start_server):
    (scripts / "lib").mkdir()
    (scripts / "echo.lua").write_text(
        'return { on_message = function(conn, msg)\n'
        '  local ok, m = pcall(require, "deep.er.m")\n'
        '  conn:send((ok and m.word or "none") .. ": " .. msg)\n'
        'end }\n')
    server = start_server("--scripts", str(scripts))
    assert ask(server, "a") == "none: a"

    # A whole tree made elsewhere and moved in at once: no event for its inner folders.
    made = tmp_path / "deep"
    (made / "er").mkdir(parents=True)
    (made / "er" / "m.lua").write_text('return { word = "moved" }\n')
    version = status(server)["version"]
    made.rename(scripts / "lib" / "deep")
    assert wait_until(lambda: status(server)["version"] > version)
    assert ask(server, "b") == "moved: b"

    version = status(server)["version"]
    (scripts / "lib" / "deep" / "er" / "m.lua").write_text('return { word = "edited" }\n')
    assert wait_until(lambda: status(server)["version"] > version)
    assert ask(server, "c") == "edited: c"
