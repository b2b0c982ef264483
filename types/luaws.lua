---@meta luaws
-- LuaLS (lua-language-server) definitions for luaws plugins: autocompletion and type checks.
-- Point the language server at this folder, e.g. in .luarc.json beside your scripts:
--   { "runtime.version": "Lua 5.4", "workspace.library": ["path/to/luaws/types"] }

---A WebSocket connection, as every hook receives it. `id`, `path`, `protocol`, `query` and
---`headers` are read-only; other fields you set are kept on the connection (prefer `data`).
---@class luaws.Conn
---@field id integer Unique in the process.
---@field path string The request path, e.g. "/ws".
---@field protocol string? The negotiated sub-protocol (one of the plugins' `protocols`), or nil.
---@field remote_addr string? The client's IP address (no port); behind `--trust-proxy` proxies, the address they forwarded.
---@field query table<string, string> The query string, parsed (`?room=blue` -> `query.room`).
---@field headers table<string, string> Request headers, names in lower case, without the handshake's own (connection, upgrade, sec-websocket-key/-version/-extensions).
---@field data table Your own per-connection table; lives as long as the connection, across reloads.
local Conn = {}

---Sends a text message. Returns false if the connection is closing or closed.
---The text must be valid UTF-8 (an error otherwise: use `send_binary` for bytes).
---Several arguments make one message of their bytes in order, without building a Lua string:
---`conn:send("Message received: ", msg)` sends what `conn:send("Message received: " .. msg)` does.
---@param text string|number
---@param ... string|number
---@return boolean
function Conn:send(text, ...) end

---Sends a binary message. Returns false if the connection is closing or closed.
---Several arguments make one message, as for `send`.
---@param bytes string
---@param ... string
---@return boolean
function Conn:send_binary(bytes, ...) end

---Starts the closing handshake. `code` defaults to 1000; use 3000-4999 for your own codes.
---@param code? integer
---@param reason? string At most 123 bytes of UTF-8.
---@return boolean
function Conn:close(code, reason) end

---Calls `fn(conn)` once after `seconds` (0.001 to 1e9). Cancelled when the connection closes;
---survives reloads. At most 64 timers per connection.
---@param seconds number
---@param fn fun(conn: luaws.Conn)
---@return luaws.Timer
function Conn:after(seconds, fn) end

---Calls `fn(conn)` every `seconds` (0.001 to 1e9) until cancelled or the connection closes.
---@param seconds number
---@param fn fun(conn: luaws.Conn)
---@return luaws.Timer
function Conn:every(seconds, fn) end

---Receives every `luaws.publish(channel, ...)`, from any event loop. False if the connection is gone.
---@param channel string
---@return boolean
function Conn:subscribe(channel) end

---@param channel string
---@return boolean
function Conn:unsubscribe(channel) end

---@class luaws.Timer
local Timer = {}
---Stops the timer; harmless if it already fired or was cancelled.
function Timer:cancel() end

---The shared store: one per process, or with `--cluster` one for every process on the same
---Redis (keys prefixed with `--redis-prefix`). Keys and values are strings (numbers are stored
---in their string form; booleans and tables are refused); a key holds a string or a set. Every
---operation is atomic. In-process the calls return at once; over Redis they wait, so there
---they work only where a hook may wait (see `luaws.sleep`). Failures (Redis down, a key of the
---other kind) are `nil, err`; bad arguments are errors. In-process it holds at most
---`--shared-memory-mb` (default 64 MiB), 1 MiB for one key and value: past that a call raises.
---@class luaws.Shared
local Shared = {}
---@param key string
---@return string? value
---@return string? err
function Shared:get(key) end
---Stores `value` (nil deletes), for `ttl` seconds if given.
---@param key string
---@param value string|number|nil
---@param ttl? number
---@return true? ok
---@return string? err
function Shared:set(key, value, ttl) end
---Stores `value` only if `key` is absent: true if it did, false if the key exists.
---@param key string
---@param value string|number
---@param ttl? number
---@return boolean? added
---@return string? err
function Shared:add(key, value, ttl) end
---Compare-and-set: stores `new` only if the value is `old` (nil: the key is absent).
---@param key string
---@param old string|number|nil
---@param new string|number
---@return boolean? swapped
---@return string? err
function Shared:cas(key, old, new) end
---Adds `by` (default 1) atomically; a missing key counts as 0. Returns the new value.
---@param key string
---@param by? number
---@return number? value
---@return string? err
function Shared:incr(key, by) end
---Removes `key`: true if it existed.
---@param key string
---@return boolean? existed
---@return string? err
function Shared:delete(key) end
---Makes `key` expire in `ttl` seconds: true if it exists.
---@param key string
---@param ttl number
---@return boolean? exists
---@return string? err
function Shared:expire(key, ttl) end
---The keys that start with `prefix` (all: ""), sorted in-process, unordered over Redis.
---@param prefix? string
---@return string[]? keys
---@return string? err
function Shared:keys(prefix) end
---Adds `member` to the set at `key`: true if it was not there.
---@param key string
---@param member string|number
---@return boolean? added
---@return string? err
function Shared:sadd(key, member) end
---Removes `member` from the set at `key`: true if it was there.
---@param key string
---@param member string|number
---@return boolean? removed
---@return string? err
function Shared:srem(key, member) end
---The members of the set at `key` (empty if none), sorted in-process.
---@param key string
---@return string[]? members
---@return string? err
function Shared:smembers(key) end
---How many members the set at `key` has.
---@param key string
---@return integer? count
---@return string? err
function Shared:scard(key) end

---@class luaws.JSON
---@field null lightuserdata JSON null (decoded as this; encode it to write null).
---@field empty_array userdata Encodes as `[]` (an empty table encodes as `{}`).
local JSON = {}
---Encodes a value. Tables with keys 1..n (or marked with `json.array`) become arrays, tables
---with string keys objects (keys sorted); holes, mixed keys and other key types are errors.
---Strings must be valid UTF-8.
---@param value any
---@return string
function JSON.encode(value) end
---Decodes JSON text; raises an error with the line and column if it is not valid JSON.
---Arrays come back marked with `json.array`, null as `json.null`.
---@param text string
---@return any
function JSON.decode(text) end
---Marks `t` (or a new table) as an array, so that it encodes as `[]` when empty. Returns it.
---@generic T: table
---@param t? T
---@return T
function JSON.array(t) end

---@class luaws
---@field version string
---@field shared luaws.Shared
---@field json luaws.JSON
---@field http luaws.HTTP
---@field null lightuserdata JSON null, and a nil inside a Redis array (same value as `luaws.json.null`).
luaws = {}

---The current UTC time like Python's `datetime.utcnow().isoformat()`.
---@return string
function luaws.utcnow_iso() end

---Seconds since the Unix epoch, with a fraction.
---@return number
function luaws.now() end

---Logs at "debug", "info", "warn" or "error"; the line names the plugin.
---@param level "debug"|"info"|"warn"|"error"
---@param ... any
function luaws.log(level, ...) end

---A `--var NAME=VALUE` from the command line, or `default`; a number when `default` is one.
---@generic T
---@param name string
---@param default? T
---@return T|string
function luaws.var(name, default) end

---Calls `fn()` once after `seconds` (0.001 to 1e9): a plugin timer, not tied to a connection.
---It ends when its plugin is reloaded or removed; at most 1024 per plugin per event loop.
---Started at the top level of a plugin (while it loads), it runs once per process (on the first
---event loop); started from a hook, it runs on that hook's event loop.
---@param seconds number
---@param fn fun()
---@return luaws.Timer
function luaws.after(seconds, fn) end

---Calls `fn()` every `seconds` (0.001 to 1e9) until cancelled or its plugin is reloaded.
---Same rules as `luaws.after`.
---@param seconds number
---@param fn fun()
---@return luaws.Timer
function luaws.every(seconds, fn) end

---Suspends the running hook for `seconds` (0 to 1e9) and returns true. The event loop serves
---other connections meanwhile; this connection's later events wait their turn (in order).
---Only in hooks, routes and timer callbacks: not at a plugin's top level, nor inside a
---coroutine the script created.
---@param seconds number
---@return true
function luaws.sleep(seconds) end

---Sends `text` (valid UTF-8) to every subscriber of `channel`, on every event loop. Raises an
---error while more than 64 MiB of messages wait to reach the event loops.
---With `--cluster` it reaches every process on the same Redis; while Redis is down it reaches
---this process's subscribers only and returns nil, "redis unavailable: ...".
---@param channel string
---@param text string
---@return true? ok
---@return string? err
function luaws.publish(channel, text) end

---Sends `text` (valid UTF-8) to every connection whose path is `path`, on every event loop.
---@param path string
---@param text string
---@return true? ok
---@return string? err
function luaws.broadcast(path, text) end

---Sends a command to Redis (`--redis URL`) and waits for the reply, without blocking the server.
---Returns the reply: a string for bulk and status replies ("OK"), an integer, a table for an
---array (a nil inside it is `luaws.null`; an error inside it is `{ err = "..." }`), or nil for a
---nil reply. A Redis error reply, an outage or no `--redis` gives `nil, message`
---("ERR ...", "redis unavailable: ...", "redis not configured"). Numbers are sent as strings.
---Only where a hook may wait (see `luaws.sleep`).
---@param command string
---@param ... string|number
---@return any reply
---@return string? err
function luaws.redis(command, ...) end

---HTTP requests from hooks, routes and timer callbacks (they wait without blocking the server).
---@class luaws.HTTP
local HTTP = {}

---@class luaws.HTTPResponse
---@field status integer
---@field headers table<string, string> Names in lower case; repeated headers joined with ", ".
---@field body string

---Sends an HTTP or HTTPS request and waits for the answer. Any status is a response (a 500
---included); `nil, err` means no answer: "connection refused", "timeout", "response body
---larger than N bytes" (`--http-max-response`), ... Redirects are followed only with
---`redirects = true` (at most 5). `timeout` defaults to `--http-timeout` (10 s).
---@param options { method?: "GET"|"HEAD"|"POST"|"PUT"|"PATCH"|"DELETE"|"OPTIONS", url: string, headers?: table<string, string>, body?: string, timeout?: number, redirects?: boolean }
---@return luaws.HTTPResponse? res
---@return string? err
function HTTP.request(options) end

---What `on_upgrade` and routes receive.
---@class luaws.Request
---@field method string "GET", "POST", ...
---@field path string
---@field query table<string, string>
---@field headers table<string, string> Names in lower case.
---@field remote_addr string? The client's IP address (see `conn.remote_addr`).
---@field body string A route's request body (at most `--max-body-size`); empty for on_upgrade.
---@field data table? on_upgrade only: becomes `conn.data` if the upgrade is accepted.

---What a plugin file returns. Every field is optional; an unknown field is a load error.
---@class luaws.Plugin
---@field name? string For logs and /luaws/status (letters, digits, _ - .); default: the file name.
---@field idle? number Seconds (0.001 to 1e9) without a message before `on_idle` (needs `on_idle`).
---@field protocols? string[] Sub-protocols this plugin speaks; the server picks the client's first one that some plugin lists.
---@field paths? string[] The WebSocket paths whose connections this plugin sees (default: every path).
---@field routes? table<string, fun(req: luaws.Request): (integer?, table<string, string>?, string?)> `["POST /api/x"] = function(req) return status, headers, body end`; may wait; an error answers 500.
---@field on_upgrade? fun(req: luaws.Request): (integer?, string?) Before the handshake answer; may wait. Return nothing to accept, or a status 400-599 and a reason to refuse (later plugins do not run). An error refuses with 500.
---@field on_open? fun(conn: luaws.Conn): boolean?
---@field on_message? fun(conn: luaws.Conn, msg: string, kind: "text"|"binary"): boolean?
---@field on_close? fun(conn: luaws.Conn, code: integer, reason: string): boolean?
---@field on_idle? fun(conn: luaws.Conn): boolean?
---@field on_reload? fun(conn: luaws.Conn): boolean? After a reload, once per open connection.
