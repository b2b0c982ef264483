-- After `idle` seconds without a message (and again every `idle` seconds while none comes),
-- pushes the UTC time, as the reference's send_time does. `--var time_interval=SECONDS`
-- shortens the wait (tests use it); 10 seconds otherwise, as in the reference.
return {
  idle = luaws.var("time_interval", 10),
  on_idle = function(conn)
    conn:send("It is: " .. luaws.utcnow_iso())
  end,
}
