-- scripts/echo.lua with one luaws.sleep(0) before the answer: every message suspends its hook's
-- coroutine and resumes it from the event loop, so the difference in server CPU per message
-- against the plain echo is the price of one wait round trip.
return {
  on_message = function(conn, msg, kind)
    if kind == "text" then
      luaws.sleep(0)
      conn:send("Message received: " .. msg)
    end
  end,
}
