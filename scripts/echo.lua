-- Answers every text message, as the reference's echo_message does.
return {
  on_message = function(conn, msg, kind)
    if kind == "text" then
      -- Two parts, one message: the same bytes as "Message received: " .. msg, without
      -- making (and later collecting) a new string per message.
      conn:send("Message received: ", msg)
    end
  end,
}
