---@meta test
-- LuaLS (lua-language-server) definitions for plugin tests (`*_test.lua`, run by `luaws test`):
-- the `test` module, the one global a test file has beyond a plugin's sandbox.

---A client connection of a test, to the server's real pipeline (no socket). Fields are read
---live: `c.closed` becomes true once the server has closed the connection.
---@class luaws.TestConn
---@field status integer? 101 once upgraded, the refusal's status if refused, nil while on_upgrade waits.
---@field refused integer? The HTTP status of a refused handshake (on_upgrade, unknown path ...), else nil.
---@field body string The body of a refusal ("" otherwise).
---@field pending boolean The handshake waits for an answer (on_upgrade waits: advance the clock).
---@field open boolean Upgraded and not closed.
---@field closed boolean The connection is over (close frame from the server, or TCP closed).
---@field close_code integer? The code of the server's close frame (1006 if it closed without one).
---@field close_reason string? The reason of the server's close frame.
---@field protocol string? The negotiated sub-protocol.
local TestConn = {}

---Sends a text message (valid UTF-8) and runs what it causes at the current virtual time.
---@param text string
function TestConn:send(text) end

---Sends a binary message.
---@param bytes string
function TestConn:send_binary(bytes) end

---The next message the server sent, and its kind; nil if none is queued.
---@return string? message
---@return "text"|"binary"|nil kind
function TestConn:recv() end

---Every queued message, in order (an empty list if none).
---@return string[]
function TestConn:recv_all() end

---Closes from the client's side (the server answers, then on_close runs).
---@param code? integer 1000 by default.
---@param reason? string
function TestConn:close(code, reason) end

---@class luaws.HTTPStub
---@field status? integer 200 by default.
---@field headers? table<string, string>
---@field body? string
---@field delay? number Seconds of virtual time before the answer.
---@field error? string Fail the request with this message (`nil, error` in the plugin).

---@class luaws.TestModule
test = {}

---Declares a case. Every case runs against freshly loaded plugins, on a clock that starts at
---2025-01-01T00:00:00Z.
---@param name string
---@param fn fun()
function test.case(name, fn) end

---Opens a WebSocket connection (handshake, on_upgrade, on_open).
---@param path string With the query, e.g. "/ws?room=blue".
---@param opts? { headers?: table<string, string>, protocols?: string[], remote_addr?: string }
---@return luaws.TestConn
function test.connect(path, opts) end

---The answer to `test.request`; its fields are nil until the route has answered (a route that
---waits answers once the clock has advanced far enough).
---@class luaws.TestResponse
---@field status integer?
---@field headers table<string, string>? Names in lower case.
---@field body string?

---A plain HTTP request to the server (plugin routes), through the real HTTP handler.
---@param method "GET"|"HEAD"|"POST"|"PUT"|"PATCH"|"DELETE"|"OPTIONS"
---@param path string With the query.
---@param opts? { headers?: table<string, string>, body?: string, remote_addr?: string }
---@return luaws.TestResponse
function test.request(method, path, opts) end

---Moves the virtual clock: idle hooks, timers, sleeps, the server's pings and timeouts fire in
---time order; then everything that can run at the new time runs.
---@param seconds number
function test.advance(seconds) end

---The virtual clock, in seconds since the epoch (what plugins get from luaws.now()).
---@return number
function test.now() end

---Fails unless `actual` equals `expected` (tables compared deeply).
---@param actual any
---@param expected any
---@param message? string
function test.expect(actual, expected, message) end

---Fails unless `actual` is a string matching the Lua pattern.
---@param actual any
---@param pattern string
---@param message? string
function test.match(actual, pattern, message) end

---Fails unless `value` is neither nil nor false.
---@param value any
---@param message? string
function test.ok(value, message) end

---Runs `fn` and expects an error: raised by `fn`, or a plugin hook failing while it runs (a
---hook error outside `fails` fails the case). Returns the message.
---@param fn fun()
---@param pattern? string A Lua pattern the message must match.
---@return string
function test.fails(fn, pattern) end

---Only these plugins (by file name, without .lua) of the scripts under test.
---@param names string[]
function test.plugins(names) end

---Tests another scripts folder or file, relative to the test file (e.g. "../examples/chat.lua").
---@param path string
function test.scripts(path) end

---What luaws.var(name) returns (like --var). Before the case's first connect.
---@param name string
---@param value string|number|boolean
function test.set_var(name, value) end

---What luaws.http.request gets for `url` (a trailing `*` matches any rest). Requests without a
---stub fail the case: tests never reach the network.
---@param url string
---@param response string|luaws.HTTPStub A body, or the whole answer.
function test.http_stub(url, response) end

---The HTTP requests plugins made in this case.
---@return { method: string, url: string, headers: table<string, string>, body: string }[]
function test.http_requests() end

---A command to the in-process Redis plugins use (GET SET SETEX DEL EXISTS INCR INCRBY DECR
---DECRBY EXPIRE TTL SADD SREM SMEMBERS SISMEMBER SCARD PING).
---@param command string
---@param ... string|number
---@return any reply
---@return string? error
function test.redis(command, ...) end

---Reloads the plugins as the server does (on_reload runs for every connection): nothing re-reads
---them; a list of names picks some; `{ ["x.lua"] = source }` replaces them; a string is a path.
---@param scripts? string|string[]|table<string, string>
function test.reload(scripts) end

---What plugins logged in this case ("info: [echo] ...", script errors included).
---@return string[]
function test.logs() end
