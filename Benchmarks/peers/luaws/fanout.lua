-- Fan-out for wsbench -m fanout: /ws?role=sub subscribes to one channel and says "ready" once
-- subscribed (with --cluster, once Redis acknowledged it); every message from /ws?role=pub is
-- published to that channel as it is.
local CHANNEL = "bench:fanout"

return {
  on_open = function(conn)
    if conn.query.role == "sub" then
      local ok, err = conn:subscribe(CHANNEL)
      conn:send(ok and "ready" or ("not subscribed: " .. tostring(err)))
    end
  end,
  on_message = function(conn, msg, kind)
    if kind == "text" and conn.query.role == "pub" then
      luaws.publish(CHANNEL, msg)
    end
  end,
}
