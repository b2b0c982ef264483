-- Every message makes one HTTP request and the answer is the response body. The backend
-- (Benchmarks/compare.py starts nginx with `return 200 "Message received: $arg_m"`) puts the
-- message back into the body, so wsbench checks that each reply went through the backend.
--   luaws --scripts Benchmarks/peers/luaws/http_echo.lua --var backend=http://127.0.0.1:PORT/echo
local BACKEND = luaws.var("backend")
if not BACKEND or BACKEND == "" then error("http_echo needs --var backend=http://127.0.0.1:PORT/PATH") end

return {
  on_message = function(conn, msg, kind)
    if kind ~= "text" then return end
    local res, err = luaws.http.request{ url = BACKEND .. "?m=" .. msg }
    if not res then
      conn:send("error: " .. tostring(err))
    elseif res.status ~= 200 then
      conn:send("error: status " .. res.status)
    else
      conn:send(res.body)
    end
  end,
}
