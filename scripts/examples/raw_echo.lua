-- Echoes every message unchanged: text as text, binary as binary. For protocol test suites
-- (Autobahn and the like):  luaws --scripts scripts/examples/raw_echo.lua
return {
  on_message = function(conn, msg, kind)
    if kind == "binary" then conn:send_binary(msg) else conn:send(msg) end
  end,
}
