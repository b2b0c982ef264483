-- A chat room with nicknames. Run it alone:  luaws --scripts scripts/examples/chat.lua
--
--   /nick NAME   choose a nickname (default: guest-<id>)
--   /who         list who is here
--   anything else is said to the room
--
-- Every event loop has its own Lua state, so the room is a channel (luaws.publish reaches
-- subscribers on every loop) and the member list lives in the shared store.

local ROOM = "chat:lobby"

local function say(text) luaws.publish(ROOM, text) end

local function members()
  local list = luaws.json.decode(luaws.shared:get("chat:members") or "[]")
  table.sort(list)
  return list
end

local function set_member(old, new)
  -- The shared store holds strings, numbers and booleans: keep the list as JSON.
  local list = members()
  for i = #list, 1, -1 do
    if list[i] == old then table.remove(list, i) end
  end
  if new then list[#list + 1] = new end
  luaws.shared:set("chat:members", luaws.json.encode(list))
end

return {
  name = "chat",

  on_open = function(conn)
    conn.data.nick = "guest-" .. conn.id
    conn:subscribe(ROOM)
    set_member(nil, conn.data.nick)
    conn:send("welcome, " .. conn.data.nick .. " (/nick NAME to change, /who to list)")
    say("* " .. conn.data.nick .. " joined")
  end,

  on_message = function(conn, msg, kind)
    if kind ~= "text" then return end
    local nick = msg:match("^/nick%s+(%S+)$")
    if nick then
      local old = conn.data.nick
      conn.data.nick = nick
      set_member(old, nick)
      say("* " .. old .. " is now " .. nick)
    elseif msg == "/who" then
      conn:send("here: " .. table.concat(members(), ", "))
    else
      say(conn.data.nick .. ": " .. msg)
    end
  end,

  on_close = function(conn)
    set_member(conn.data.nick, nil)
    say("* " .. conn.data.nick .. " left")
  end,
}
