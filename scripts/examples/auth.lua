-- Checks a token with your backend before accepting a WebSocket, and keeps who it is.
--
--   luaws --scripts scripts/examples/auth.lua --var auth_url=http://127.0.0.1:9000/check
--   (the backend answers GET /check?token=T with 200 and {"user": "..."}, or anything else)
--
-- The handshake waits for the backend (luaws.http does not block the server); a refusal is a
-- real HTTP status the client sees. Whatever on_upgrade puts in req.data is conn.data.

local AUTH_URL = luaws.var("auth_url", "http://127.0.0.1:9000/check")

local function escape(s)
  return (s:gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", c:byte()) end))
end

return {
  name = "auth",

  on_upgrade = function(req)
    local token = req.query.token
    if not token or token == "" then return 401, "token required" end
    local res, err = luaws.http.request{ url = AUTH_URL .. "?token=" .. escape(token), timeout = 3 }
    if not res then
      luaws.log("warn", "auth backend unreachable:", err)
      return 503, "try again later"
    end
    if res.status ~= 200 then return 401, "bad token" end
    local ok, who = pcall(luaws.json.decode, res.body)
    if not ok or type(who) ~= "table" or type(who.user) ~= "string" then return 502, "bad answer from the auth backend" end
    req.data.user = who.user
  end,

  on_open = function(conn)
    conn:send("welcome, " .. conn.data.user)
  end,

  on_message = function(conn, msg, kind)
    if kind == "text" then conn:send(conn.data.user .. ": " .. msg) end
  end,
}
