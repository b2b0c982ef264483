-- A chat room with nicknames. Run it alone:  luaws --scripts scripts/examples/chat.lua
--
--   /nick NAME   choose a nickname (default: guest-<id>)
--   /who         list who is here
--   anything else is said to the room
--
-- Every event loop (and, with --cluster, every process) has its own Lua state, so the room is a
-- channel (luaws.publish reaches subscribers everywhere) and the member list is a set in the
-- shared store: sadd and srem are atomic, so /who is exact with any number of threads or
-- processes. Each member is stored as "<member number> <nick>" (numbers from a shared counter,
-- unique across processes, unlike conn.id), so two people may share a nick.

local ROOM = "chat:lobby"
local MEMBERS = "chat:members"

local function say(text) luaws.publish(ROOM, text) end

local function entry(conn) return conn.data.member .. " " .. conn.data.nick end

local function who()
  local list = luaws.shared:smembers(MEMBERS) or {}
  local nicks = {}
  for i, e in ipairs(list) do nicks[i] = e:match("^%S+ (.*)$") end
  table.sort(nicks)
  return nicks
end

return {
  name = "chat",

  on_open = function(conn)
    conn.data.member = luaws.shared:incr("chat:next-member")
    conn.data.nick = "guest-" .. conn.data.member
    conn:subscribe(ROOM)
    luaws.shared:sadd(MEMBERS, entry(conn))
    conn:send("welcome, " .. conn.data.nick .. " (/nick NAME to change, /who to list)")
    say("* " .. conn.data.nick .. " joined")
  end,

  on_message = function(conn, msg, kind)
    if kind ~= "text" then return end
    local nick = msg:match("^/nick%s+(%S+)$")
    if nick then
      local old = conn.data.nick
      luaws.shared:srem(MEMBERS, entry(conn))
      conn.data.nick = nick
      luaws.shared:sadd(MEMBERS, entry(conn))
      say("* " .. old .. " is now " .. nick)
    elseif msg == "/who" then
      conn:send("here: " .. table.concat(who(), ", "))
    else
      say(conn.data.nick .. ": " .. msg)
    end
  end,

  on_close = function(conn)
    luaws.shared:srem(MEMBERS, entry(conn))
    say("* " .. conn.data.nick .. " left")
  end,
}
