---@meta luaws
-- LuaLS (lua-language-server) definitions for luaws plugins: autocompletion and type checks.
-- Point the language server at this folder, e.g. in .luarc.json beside your scripts:
--   { "runtime.version": "Lua 5.4", "workspace.library": ["path/to/luaws/types"] }

---A WebSocket connection, as every hook receives it.
---@class luaws.Conn
---@field id integer Unique in the process.
---@field path string The request path, e.g. "/ws".
---@field query table<string, string> The query string, parsed (`?room=blue` -> `query.room`).
---@field headers table<string, string> Request headers, names in lower case.
---@field data table Your own per-connection table; lives as long as the connection, across reloads.
local Conn = {}

---Sends a text message. Returns false if the connection is closing or closed.
---@param text string
---@return boolean
function Conn:send(text) end

---Sends a binary message. Returns false if the connection is closing or closed.
---@param bytes string
---@return boolean
function Conn:send_binary(bytes) end

---Starts the closing handshake. `code` defaults to 1000; use 3000-4999 for your own codes.
---@param code? integer
---@param reason? string At most 123 bytes.
---@return boolean
function Conn:close(code, reason) end

---Calls `fn(conn)` once after `seconds`. Cancelled when the connection closes.
---@param seconds number
---@param fn fun(conn: luaws.Conn)
---@return luaws.Timer
function Conn:after(seconds, fn) end

---Calls `fn(conn)` every `seconds` until cancelled or the connection closes.
---@param seconds number
---@param fn fun(conn: luaws.Conn)
---@return luaws.Timer
function Conn:every(seconds, fn) end

---Receives every `luaws.publish(channel, ...)`, from any event loop.
---@param channel string
function Conn:subscribe(channel) end

---@param channel string
function Conn:unsubscribe(channel) end

---@class luaws.Timer
local Timer = {}
---Stops the timer; harmless if it already fired or was cancelled.
function Timer:cancel() end

---The process-wide store, shared by every Lua state.
---@class luaws.Shared
local Shared = {}
---@param key string
---@return string|number|boolean|nil
function Shared:get(key) end
---@param key string
---@param value string|number|boolean|nil nil deletes.
function Shared:set(key, value) end
---@param key string
function Shared:delete(key) end
---Adds `by` (default 1) atomically; a missing key counts as 0. Returns the new value.
---@param key string
---@param by? number
---@return number
function Shared:incr(key, by) end

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
luaws = {}

---The current UTC time like Python's `datetime.utcnow().isoformat()`.
---@return string
function luaws.utcnow_iso() end

---Seconds since the Unix epoch, with a fraction.
---@return number
function luaws.now() end

---Logs at "debug", "info", "warn" or "error".
---@param level "debug"|"info"|"warn"|"error"
---@param ... any
function luaws.log(level, ...) end

---A `--var NAME=VALUE` from the command line, or `default`; a number when `default` is one.
---@generic T
---@param name string
---@param default? T
---@return T|string
function luaws.var(name, default) end

---Calls `fn()` once after `seconds` (a plugin timer, not tied to a connection).
---@param seconds number
---@param fn fun()
---@return luaws.Timer
function luaws.after(seconds, fn) end

---Calls `fn()` every `seconds` until cancelled.
---@param seconds number
---@param fn fun()
---@return luaws.Timer
function luaws.every(seconds, fn) end

---Sends `text` to every subscriber of `channel`, on every event loop.
---@param channel string
---@param text string
function luaws.publish(channel, text) end

---Sends `text` to every connection whose path is `path`, on every event loop.
---@param path string
---@param text string
function luaws.broadcast(path, text) end

---What a plugin file returns. Every field is optional.
---@class luaws.Plugin
---@field name? string For logs.
---@field idle? number Seconds without a message before `on_idle` (needs `on_idle`).
---@field on_open? fun(conn: luaws.Conn): boolean?
---@field on_message? fun(conn: luaws.Conn, msg: string, kind: "text"|"binary"): boolean?
---@field on_close? fun(conn: luaws.Conn, code: integer, reason: string): boolean?
---@field on_idle? fun(conn: luaws.Conn): boolean?
---@field on_reload? fun(conn: luaws.Conn): boolean? After a reload, once per open connection.
