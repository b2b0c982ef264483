"""The reference's behaviour, end to end, with Python's websockets client (not ours)."""
import asyncio
import datetime
import time

import websockets


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def echo_roundtrip(url, messages):
    async with websockets.connect(url, max_size=None) as ws:
        replies = []
        for m in messages:
            await ws.send(m)
            replies.append(await ws.recv())
        return replies


def test_echo_ascii_utf8_empty_and_large(server):
    big = "0123456789abcdef" * (1 << 16)  # 1 MiB
    messages = ["hello", "héllo wörld ✓ 你好 🎉", "", big]
    replies = run(echo_roundtrip(server.url, messages))
    assert replies == [f"Message received: {m}" for m in messages]


def test_echo_many_in_order(server):
    async def go():
        async with websockets.connect(server.url) as ws:
            for i in range(200):
                await ws.send(str(i))
            return [await ws.recv() for _ in range(200)]
    assert run(go()) == [f"Message received: {i}" for i in range(200)]


def parse_push(text):
    assert text.startswith("It is: "), text
    stamp = text[len("It is: "):]
    # datetime.utcnow().isoformat(): no offset, microseconds unless zero.
    parsed = datetime.datetime.fromisoformat(stamp)
    assert parsed.tzinfo is None
    return parsed


def test_idle_push_arrives_repeats_and_is_now(server):
    async def go():
        async with websockets.connect(server.url) as ws:
            start = time.monotonic()
            first = await ws.recv()
            t1 = time.monotonic() - start
            second = await ws.recv()
            t2 = time.monotonic() - start
            return first, t1, second, t2
    first, t1, second, t2 = run(go())
    for push in (first, second):
        when = parse_push(push)
        now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
        assert abs((now - when).total_seconds()) < 1.0
    assert 0.4 <= t1 <= 1.5, t1
    assert 0.4 <= t2 - t1 <= 1.5, (t1, t2)


def test_message_restarts_the_wait(server):
    async def go():
        async with websockets.connect(server.url) as ws:
            received = []
            # A message every 0.3 s keeps the 0.5 s idle push from ever firing.
            for i in range(6):
                await ws.send(f"m{i}")
                received.append(await ws.recv())
                await asyncio.sleep(0.3)
            start = time.monotonic()
            push = await ws.recv()
            return received, push, time.monotonic() - start
    received, push, waited = run(go())
    assert received == [f"Message received: m{i}" for i in range(6)]
    parse_push(push)
    assert waited <= 0.5


def test_two_clients_are_independent(server):
    async def go():
        async with websockets.connect(server.url) as a, websockets.connect(server.url) as b:
            await a.send("from a")
            await b.send("from b")
            return await a.recv(), await b.recv()
    assert run(go()) == ("Message received: from a", "Message received: from b")
