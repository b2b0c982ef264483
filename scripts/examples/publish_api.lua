-- Lets your backend push to connected clients: it POSTs {"channel": "...", "data": ...} to
-- /api/publish with "Authorization: Bearer <api_key>"; every socket subscribed to that channel
-- gets `data` as JSON. Clients subscribe by connecting to /ws?channel=NAME.
--
-- Keep the key off the command line (ps shows it):
--   echo 'api_key=s3cr3t' > secrets.env
--   luaws --scripts scripts/examples/publish_api.lua --var-file secrets.env
--   curl -H 'Authorization: Bearer s3cr3t' -d '{"channel":"news","data":{"n":1}}' \
--        http://127.0.0.1:8000/api/publish

local API_KEY = luaws.var("api_key")
if not API_KEY or API_KEY == "" then error("publish_api needs api_key (--var-file FILE with api_key=...)") end

return {
  name = "publish_api",

  routes = {
    ["POST /api/publish"] = function(req)
      if req.headers["authorization"] ~= "Bearer " .. API_KEY then
        return 401, { ["www-authenticate"] = "Bearer" }, "unauthorized\n"
      end
      local ok, msg = pcall(luaws.json.decode, req.body)
      if not ok or type(msg) ~= "table" or type(msg.channel) ~= "string" or msg.data == nil then
        return 400, nil, 'expected {"channel": "...", "data": ...}\n'
      end
      luaws.publish(msg.channel, luaws.json.encode(msg.data))
      return 202, { ["content-type"] = "application/json" }, '{"published":true}'
    end,
  },

  on_open = function(conn)
    local channel = conn.query.channel
    if channel and channel ~= "" then conn:subscribe(channel) end
  end,
}
