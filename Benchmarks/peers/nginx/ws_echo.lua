-- A WebSocket echo loop for nginx + ngx_lua (what lua-resty-websocket does, written out: it is
-- not packaged by Debian). Echoes "Message received: <text>"; pushes the time after 10 s idle.
local bit = require "bit"
local band, bor, bxor, rshift, lshift = bit.band, bit.bor, bit.bxor, bit.rshift, bit.lshift
local char, byte, concat = string.char, string.byte, table.concat

local key = ngx.var.http_sec_websocket_key
if not key then return ngx.exit(400) end
local accept = ngx.encode_base64(ngx.sha1_bin(key .. "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"))
ngx.status = 101
ngx.header["Upgrade"] = "websocket"
ngx.header["Connection"] = "Upgrade"
ngx.header["Sec-WebSocket-Accept"] = accept
ngx.send_headers()
ngx.flush(true)
local sock = assert(ngx.req.socket(true))
sock:settimeouts(10000, 10000, 10000)

local function frame(opcode, payload)
  local n = #payload
  if n < 126 then return char(bor(0x80, opcode), n) .. payload end
  if n < 65536 then return char(bor(0x80, opcode), 126, rshift(n, 8), band(n, 0xff)) .. payload end
  local parts = { char(bor(0x80, opcode), 127, 0, 0, 0, 0) }
  for i = 3, 0, -1 do parts[#parts + 1] = char(band(rshift(n, 8 * i), 0xff)) end
  return concat(parts) .. payload
end

while true do
  local head, err = sock:receive(2)
  if not head then
    if err == "timeout" then
      sock:send(frame(1, "It is: " .. os.date("!%Y-%m-%dT%H:%M:%S")))
      goto continue
    end
    return
  end
  do
    local b0, b1 = byte(head, 1, 2)
    local opcode, len = band(b0, 0x0f), band(b1, 0x7f)
    if len == 126 then
      local ext = sock:receive(2); local x1, x2 = byte(ext, 1, 2); len = lshift(x1, 8) + x2
    elseif len == 127 then
      local ext = sock:receive(8); len = 0
      for i = 1, 8 do len = len * 256 + byte(ext, i) end
    end
    local mask = sock:receive(4)
    local data = len > 0 and sock:receive(len) or ""
    local m1, m2, m3, m4 = byte(mask, 1, 4)
    local keys = { m1, m2, m3, m4 }
    local out = {}
    for i = 1, len do out[i] = char(bxor(byte(data, i), keys[(i - 1) % 4 + 1])) end
    local payload = concat(out)
    if opcode == 8 then sock:send(frame(8, payload:sub(1, 2))); return
    elseif opcode == 9 then sock:send(frame(10, payload))
    elseif opcode == 1 then sock:send(frame(1, "Message received: " .. payload))
    end
  end
  ::continue::
end
