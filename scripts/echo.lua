-- Answers every text message, as the reference's echo_message does.
return {
  on_message = function(conn, msg, kind)
    if kind == "text" then
      conn:send("Message received: " .. msg)
    end
  end,
}
