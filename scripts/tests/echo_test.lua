-- Tests for echo.lua (run with: luaws test). Each case gets fresh plugins; the clock is
-- virtual and starts at 2025-01-01T00:00:00Z.
local t = test
t.plugins{ "echo" }

t.case("echo answers a text message", function()
  local c = t.connect("/ws?room=blue", { headers = { ["user-agent"] = "x" } })
  c:send("hi")
  local reply, kind = c:recv()
  t.expect(reply, "Message received: hi")
  t.expect(kind, "text")
  t.expect(c:recv(), nil)
end)

t.case("answers in order, one reply per message", function()
  local c = t.connect("/ws")
  for i = 1, 5 do c:send("m" .. i) end
  t.expect(c:recv_all(), {
    "Message received: m1", "Message received: m2", "Message received: m3",
    "Message received: m4", "Message received: m5",
  })
end)

t.case("keeps UTF-8 and empty messages as they are", function()
  local c = t.connect("/ws")
  c:send("héllo ✓")
  t.expect(c:recv(), "Message received: héllo ✓")
  c:send("")
  t.expect(c:recv(), "Message received: ")
end)

t.case("ignores binary messages", function()
  local c = t.connect("/ws")
  c:send_binary("\0\1\2")
  t.expect(c:recv(), nil)
  t.expect(c.open, true)
end)

t.case("each connection hears only its own echo", function()
  local a, b = t.connect("/ws"), t.connect("/ws")
  a:send("from a")
  t.expect(a:recv(), "Message received: from a")
  t.expect(b:recv(), nil)
end)

t.case("a client's close ends the connection cleanly", function()
  local c = t.connect("/ws")
  c:close(1000, "bye")
  t.expect(c.closed, true)
  t.expect(c.close_code, 1000)
end)

t.case("only /ws upgrades", function()
  local c = t.connect("/other")
  t.expect(c.open, false)
  t.expect(c.refused, 404)
end)
