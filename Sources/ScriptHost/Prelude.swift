/// The Lua side of the plugin API, run once in every new Lua state with the C `core` table as
/// its argument. It builds the sandbox each plugin runs in, the `luaws` module, the connection
/// objects and the plugin loader, and returns the functions ScriptHost calls (see `LuaVM`).
///
/// Kept in Lua because this is where Lua is the clearer language: tables, environments,
/// metatables. Everything that touches the engine goes through `core`, written in C.
let luaPrelude = #"""
local core = ...
local LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR = 0, 1, 2, 3
local log_levels = { debug = LOG_DEBUG, info = LOG_INFO, warn = LOG_WARN, warning = LOG_WARN, error = LOG_ERROR }

-- Private copies: scripts never see these.
local io_open, load, loadfile, setmetatable, rawget, rawset, type, pairs, tostring, select, error =
      io.open, load, loadfile, setmetatable, rawget, rawset, type, pairs, tostring, select, error
local concat, gsub, gmatch, lower, find = table.concat, string.gsub, string.gmatch, string.lower, string.find

-- Strings share one metatable: lock it so no plugin can change `("x"):upper()` for the others.
getmetatable("").__metatable = false

-- Most garbage here is short-lived (one message's strings): the generational collector
-- suits that better than the incremental default.
collectgarbage("generational")

local vars = {}

-- Operations of core.command; ScriptHost's `Command` enum has the same numbers.
local OP_TIMER_START, OP_TIMER_CANCEL, OP_SUBSCRIBE, OP_UNSUBSCRIBE, OP_PUBLISH, OP_BROADCAST,
      OP_SHARED_GET, OP_SHARED_SET, OP_SHARED_INCR = 1, 2, 3, 4, 5, 6, 7, 8, 9
local command = core.command

local function tostrings(...)
  local n = select("#", ...)
  local parts = {}
  for i = 1, n do parts[i] = tostring((select(i, ...))) end
  return concat(parts, " ")
end

------------------------------------------------------------------------ luaws module
local luaws = {
  version = "0.1.0",
  utcnow_iso = core.utcnow_iso,
  now = core.now,
}

function luaws.log(level, ...)
  local l = log_levels[level]
  if l == nil then error("luaws.log: level must be debug, info, warn or error", 2) end
  core.log(l, tostrings(...))
end

--- The value of a `--var NAME=VALUE` given on the command line, or `default`.
--- With a number default the value is converted to a number.
function luaws.var(name, default)
  local v = vars[name]
  if v == nil then return default end
  if type(default) == "number" then
    local n = tonumber(v)
    if n == nil then error("--var " .. name .. "=" .. v .. " is not a number", 2) end
    return n
  end
  return v
end

------------------------------------------------------------------------ timers
-- Every timer of this state, by id: { fn = f, conn = conn or nil, every = bool }.
local timers = {}
local next_timer = 0
local Timer = { __index = {}, __metatable = "luaws.timer" }

-- Forgets timer `id`; a connection's timers are also listed in its `_timers` set.
local function forget_timer(id)
  local t = timers[id]
  if t == nil then return end
  timers[id] = nil
  if t.conn then rawget(t.conn, "_timers")[id] = nil end
end

function Timer.__index:cancel()
  if timers[self.id] then
    forget_timer(self.id)
    command(OP_TIMER_CANCEL, self.id)
  end
end

local function start_timer(conn, seconds, fn, every, level)
  if type(seconds) ~= "number" or seconds ~= seconds or seconds < 0.001 or seconds == math.huge then
    error("timer interval must be a number of seconds >= 0.001", level)
  end
  if type(fn) ~= "function" then error("timer callback must be a function", level) end
  next_timer = next_timer + 1
  local id = next_timer
  timers[id] = { fn = fn, conn = conn, every = every }
  if conn then
    local owned = rawget(conn, "_timers")
    if owned == nil then owned = {}; rawset(conn, "_timers", owned) end
    owned[id] = true
  end
  command(OP_TIMER_START, conn and rawget(conn, "id") or 0, id, seconds, every)
  return setmetatable({ id = id }, Timer)
end

--- Calls fn() once after `seconds`. Returns a timer with :cancel().
function luaws.after(seconds, fn) return start_timer(nil, seconds, fn, false, 3) end
--- Calls fn() every `seconds` until cancelled.
function luaws.every(seconds, fn) return start_timer(nil, seconds, fn, true, 3) end

------------------------------------------------------------------------ channels, broadcast
--- Sends `text` to every connection subscribed to `channel`, on every event loop.
function luaws.publish(channel, text)
  if type(channel) ~= "string" then error("publish: channel must be a string", 2) end
  command(OP_PUBLISH, channel, tostring(text))
end

--- Sends `text` to every connection whose path is `path`, on every event loop.
function luaws.broadcast(path, text)
  if type(path) ~= "string" then error("broadcast: path must be a string", 2) end
  command(OP_BROADCAST, path, tostring(text))
end

------------------------------------------------------------------------ shared store
-- One store for the whole process (every Lua state sees it); values are strings, numbers, booleans.
local shared = {}
local function check_key(key)
  if type(key) ~= "string" then error("shared: key must be a string", 3) end
end
function shared:get(key) check_key(key) return command(OP_SHARED_GET, key) end
function shared:set(key, value)
  check_key(key)
  local t = type(value)
  if t ~= "string" and t ~= "number" and t ~= "boolean" and t ~= "nil" then
    error("shared:set: values are strings, numbers or booleans (nil deletes)", 2)
  end
  command(OP_SHARED_SET, key, value)
end
function shared:delete(key) check_key(key) command(OP_SHARED_SET, key, nil) end
--- Adds `by` (default 1) to a number (missing counts as 0), atomically; returns the new value.
function shared:incr(key, by)
  check_key(key)
  by = by or 1
  if type(by) ~= "number" then error("shared:incr: increment must be a number", 2) end
  return command(OP_SHARED_INCR, key, by)
end
luaws.shared = setmetatable({}, { __index = shared, __newindex = function() error("luaws.shared: use :set(key, value)", 2) end, __metatable = false })

------------------------------------------------------------------------ json
luaws.json = {
  encode = core.json_encode,
  decode = core.json_decode,
  --- JSON null, as decoded (and as encoded: nil in an array would be a hole).
  null = core.null,
  --- Encodes as []: an empty array (an empty table encodes as {}).
  empty_array = core.json_empty_array,
  --- json.array(t) marks t (a new table without t) as an array, so that it encodes as [] when
  --- empty; decoded arrays are marked. Returns t.
  array = core.json_array,
}

------------------------------------------------------------------------ connections
local Conn = {}
local conn_methods = {}

-- conn:send(text) and conn:send_binary(bytes) are C functions (the hot path).
conn_methods.send = core.conn_send
conn_methods.send_binary = core.conn_send_binary

function conn_methods:close(code, reason)
  return core.close(rawget(self, "id"), code, reason)
end

function conn_methods:after(seconds, fn) return start_timer(self, seconds, fn, false, 3) end
function conn_methods:every(seconds, fn) return start_timer(self, seconds, fn, true, 3) end

function conn_methods:subscribe(channel)
  if type(channel) ~= "string" then error("subscribe: channel must be a string", 2) end
  command(OP_SUBSCRIBE, rawget(self, "id"), channel)
end

function conn_methods:unsubscribe(channel)
  if type(channel) ~= "string" then error("unsubscribe: channel must be a string", 2) end
  command(OP_UNSUBSCRIBE, rawget(self, "id"), channel)
end

local function parse_query(qs)
  local q = {}
  if qs == nil or qs == "" then return q end
  for pair in gmatch(qs, "[^&]+") do
    local k, v = pair:match("^([^=]*)=?(.*)$")
    local function unescape(s)
      s = gsub(s, "+", " ")
      return (gsub(s, "%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
    end
    k, v = unescape(k), unescape(v)
    if q[k] == nil then q[k] = v end
  end
  return q
end

local function parse_headers(raw)
  local h = {}
  for line in gmatch(raw or "", "[^\n]+") do
    local k, v = line:match("^([^:]+):%s*(.*)$")
    if k then
      k = lower(k)
      if h[k] then h[k] = h[k] .. ", " .. v else h[k] = v end
    end
  end
  return h
end

-- `headers`, `query` and `data` are made on first use: most connections never ask for them.
local lazy_fields = {
  headers = function(self) return parse_headers(rawget(self, "_raw_headers")) end,
  query = function(self) return parse_query(rawget(self, "_raw_query")) end,
  data = function() return {} end,
}
-- __index looks in conn_methods first (in C: the hot path), then makes a lazy field.
Conn.__index = core.conn_index(conn_methods, function(self, key)
  local make = lazy_fields[key]
  if make == nil then return nil end
  local value = make(self)
  rawset(self, key, value)
  return value
end)
Conn.__tostring = function(self) return "luaws.conn(" .. rawget(self, "id") .. ")" end
Conn.__metatable = "luaws.conn"

local function new_conn(id, path, query, headers, protocol)
  return setmetatable({ id = id, path = path, protocol = protocol, _raw_query = query, _raw_headers = headers }, Conn)
end

------------------------------------------------------------------------ sandbox
local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

local function sandbox_base(plugin_name, require_fn)
  local env = {
    assert = assert, error = error, ipairs = ipairs, next = next, pairs = pairs,
    pcall = pcall, xpcall = xpcall, rawequal = rawequal, rawget = rawget, rawlen = rawlen,
    rawset = rawset, select = select, setmetatable = setmetatable, getmetatable = getmetatable,
    tonumber = tonumber, tostring = tostring, type = type, _VERSION = _VERSION,
    string = copy(string), table = copy(table), math = copy(math), utf8 = copy(utf8),
    coroutine = copy(coroutine),
    os = { time = os.time, clock = os.clock, date = os.date, difftime = os.difftime },
    luaws = luaws,
    require = require_fn,
  }
  env.print = function(...) core.log(LOG_INFO, "[" .. plugin_name .. "] " .. tostrings(...)) end
  env.collectgarbage = function(opt, ...)
    opt = opt or "collect"
    if opt == "count" or opt == "collect" or opt == "step" then return collectgarbage(opt, ...) end
    error("collectgarbage('" .. tostring(opt) .. "') is not available to plugins", 2)
  end
  -- Text chunks only (bytecode can crash the VM), in the plugin's sandbox unless told otherwise.
  env.load = function(chunk, name, mode, chunk_env)
    return load(chunk, name, "t", chunk_env or env)
  end
  env._G = env
  return env
end

-- require("name") loads <lib dir>/name.lua (dots become slashes), once per plugin set.
local function make_require(lib_dir, cache)
  local function require_fn(name)
    if type(name) ~= "string" or not name:match("^[%w_]+[%w_%.]*$") or find(name, "..", 1, true) then
      error("require: bad module name " .. tostring(name), 2)
    end
    local cached = cache[name]
    if cached ~= nil then return cached end
    local path = lib_dir .. "/" .. gsub(name, "%.", "/") .. ".lua"
    local f = io_open(path, "r")
    if f == nil then error("require: module '" .. name .. "' not found (looked for " .. path .. ")", 2) end
    local src = f:read("a")
    f:close()
    local fn, err = load(src, "@" .. path, "t", sandbox_base(name, require_fn))
    if fn == nil then error(err, 0) end
    local result = fn(name)
    if result == nil then result = true end
    cache[name] = result
    return result
  end
  return require_fn
end

------------------------------------------------------------------------ plugins
local HOOKS = { on_open = true, on_message = true, on_close = true, on_idle = true, on_reload = true }

-- Compiles and runs one plugin's source; checks the table it returns.
local function load_plugin(set, name, chunkname, src)
  local env = sandbox_base(name, set.require)
  local fn, err = load(src, "@" .. chunkname, "t", env)
  if fn == nil then error(err, 0) end
  local plugin = fn()
  local where = chunkname .. ": "
  if type(plugin) ~= "table" then
    error(where .. "a plugin must return a table of hooks (got " .. type(plugin) .. ")", 0)
  end
  for k, v in pairs(plugin) do
    if HOOKS[k] then
      if type(v) ~= "function" then error(where .. k .. " must be a function (got " .. type(v) .. ")", 0) end
    elseif k == "idle" then
      if type(v) ~= "number" or v ~= v or v < 0.001 or v == math.huge then
        error(where .. "idle must be a positive number of seconds, at least 0.001 (got " .. tostring(v) .. ")", 0)
      end
    elseif k == "protocols" then
      if type(v) ~= "table" then error(where .. "protocols must be a list of strings", 0) end
      for _, p in ipairs(v) do
        if type(p) ~= "string" or not p:match("^[!#$%%&'*+%-.^_`|~%w]+$") then
          error(where .. "protocols must be a list of sub-protocol names (tokens), got " .. tostring(p), 0)
        end
      end
    elseif k ~= "name" then
      error(where .. "unknown field '" .. tostring(k) .. "' (hooks are on_open, on_message, on_close, on_idle, on_reload; settings are idle, protocols, name)", 0)
    end
  end
  if plugin.on_idle and not plugin.idle then error(where .. "on_idle needs idle = <seconds>", 0) end
  if plugin.idle and not plugin.on_idle then error(where .. "idle is set but there is no on_idle hook", 0) end
  return plugin
end

local api = {}

-- A plugin set: every plugin of one load, in order. All-or-nothing.
function api.new_set(lib_dir)
  local set = { plugins = {} }
  set.require = make_require(lib_dir, {})
  return set
end

function api.add_plugin(set, name, chunkname, src)
  set.plugins[#set.plugins + 1] = load_plugin(set, name, chunkname, src)
end


function api.plugin_field(set, index, field)
  return set.plugins[index][field]
end

function api.set_var(name, value) vars[name] = value end

-- Every sub-protocol the set's plugins declare, in order, as one comma-separated string.
function api.protocols(set)
  local all, seen = {}, {}
  for _, plugin in ipairs(set.plugins) do
    for _, p in ipairs(plugin.protocols or {}) do
      if not seen[p] then seen[p] = true; all[#all + 1] = p end
    end
  end
  return table.concat(all, ",")
end

api.new_conn = new_conn

-- A timer fired (Swift scheduled it). A one-shot timer is forgotten before its callback runs.
function api.fire_timer(id)
  local t = timers[id]
  if t == nil then return end
  if not t.every then forget_timer(id) end
  if t.conn then t.fn(t.conn) else t.fn() end
end

-- The connection is gone: forget its timers (Swift has cancelled them).
function api.drop_conn(conn)
  local owned = rawget(conn, "_timers")
  if owned == nil then return end
  for id in pairs(owned) do timers[id] = nil end
  rawset(conn, "_timers", nil)
end

return api
"""#
