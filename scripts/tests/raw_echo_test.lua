-- Tests for examples/raw_echo.lua: every message back unchanged, text as text, binary as binary.
local t = test
t.scripts("../examples/raw_echo.lua")

t.case("text comes back as text", function()
  local c = t.connect("/ws")
  c:send("hello")
  local data, kind = c:recv()
  t.expect(data, "hello")
  t.expect(kind, "text")
end)

t.case("binary comes back as binary, byte for byte", function()
  local c = t.connect("/ws")
  local bytes = "\0\1\127\128\255 not UTF-8: \192"
  c:send_binary(bytes)
  local data, kind = c:recv()
  t.expect(data, bytes)
  t.expect(kind, "binary")
end)

t.case("large messages (over 64 KiB) come back whole", function()
  local c = t.connect("/ws")
  local big = string.rep("0123456789abcdef", 8192)
  c:send(big)
  t.expect(c:recv() == big, true)
end)

t.case("empty messages come back", function()
  local c = t.connect("/ws")
  c:send("")
  t.expect(c:recv(), "")
  c:send_binary("")
  local data, kind = c:recv()
  t.expect(data, "")
  t.expect(kind, "binary")
end)
