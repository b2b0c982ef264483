/// The Lua side of the plugin API, run once in every new Lua state with the C `core` table as
/// its argument. It builds the sandbox each plugin runs in, the `luaws` module, the connection
/// objects and the plugin loader, and returns the functions ScriptHost calls (see `LuaVM`).
///
/// Kept in Lua because this is where Lua is the clearer language: tables, environments,
/// metatables. Everything that touches the engine goes through `core`, written in C.
let luaPreludeBody = #"""
local core = ...
local LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERROR = 0, 1, 2, 3
local log_levels = { debug = LOG_DEBUG, info = LOG_INFO, warn = LOG_WARN, warning = LOG_WARN, error = LOG_ERROR }

-- Private copies: scripts never see these.
local io_open, load, loadfile, setmetatable, getmetatable, rawget, rawset, type, pairs, next, tostring, select, error =
      io.open, load, loadfile, setmetatable, getmetatable, rawget, rawset, type, pairs, next, tostring, select, error
local concat, gsub, gmatch, lower, find = table.concat, string.gsub, string.gmatch, string.lower, string.find
local getinfo = debug.getinfo
local conn_id, conn_fields, utf8_valid = core.conn_id, core.conn_fields, core.utf8_valid

-- Strings share one metatable whose __index is the real `string` table: lock it so no plugin
-- can change `("x"):upper()` for the others, and take `dump` out of the real table (bytecode
-- is refused by `load` anyway; `("").dump` would otherwise reach it).
getmetatable("").__metatable = false
string.dump = nil

-- Most garbage here is short-lived (one message's strings): the generational collector
-- suits that better than the incremental default.
collectgarbage("generational")

local vars = {}

-- Operations of core.command; ScriptHost's `Command` enum has the same numbers.
local OP_TIMER_START, OP_TIMER_CANCEL, OP_SUBSCRIBE, OP_UNSUBSCRIBE, OP_PUBLISH, OP_BROADCAST, OP_STORE =
      1, 2, 3, 4, 5, 6, 7
local command = core.command

-- Limits on what scripts may hold (README: sandbox and limits).
local MAX_CONN_TIMERS, MAX_PLUGIN_TIMERS = 64, 1024
local MIN_INTERVAL, MAX_INTERVAL = 0.001, 1e9

local function tostrings(...)
  local n = select("#", ...)
  local parts = {}
  for i = 1, n do parts[i] = tostring((select(i, ...))) end
  return concat(parts, " ")
end

-- Raises `msg` at the script's line: the innermost running function that is not the
-- prelude's. (error(msg, level) would miscount across tail calls and prelude helpers.)
local function fail(msg)
  for level = 2, 50 do
    local info = getinfo(level, "Sl")
    if info == nil then break end
    if info.currentline > 0 and info.source ~= "=luaws-prelude" then
      error(info.short_src .. ":" .. info.currentline .. ": " .. msg, 0)
    end
  end
  error(msg, 0)
end

-- "Name: value" lines into a table of lower-case names (repeated names joined with ", ").
local function parse_headers_block(raw)
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

------------------------------------------------------------------------ read-only tables
-- Tables every plugin shares (its `luaws`, `luaws.json`, `luaws.shared`) are proxies: writes
-- fail, and the sandbox's rawset refuses them, so no plugin can change them for another.
local frozen = setmetatable({}, { __mode = "k" })
local function readonly(t, what)
  local proxy = setmetatable({}, {
    __index = t,
    __newindex = function(_, k) fail(what .. " is read-only (cannot set '" .. tostring(k) .. "')") end,
    __pairs = function() return next, t, nil end,
    __len = function() return #t end,
    __metatable = false,
  })
  frozen[proxy] = true
  return proxy
end

------------------------------------------------------------------------ timers
-- Every timer of this state, by id: { fn = f, conn = conn or nil, every = bool, owner = plugin }.
-- A plugin record (`owner`) is { name =, set =, count = its timers without a connection }.
local timers = {}
local next_timer = 0
local timer_ids = setmetatable({}, { __mode = "k" })   -- timer object -> id, out of scripts' reach
local Timer = { __index = {}, __metatable = "luaws.timer" }

-- Forgets timer `id` (Swift's books are kept by Swift).
local function forget_timer(id)
  local t = timers[id]
  if t == nil then return end
  timers[id] = nil
  if t.conn then
    local fields = conn_fields(t.conn)
    local owned = fields._timers
    if owned and owned[id] then owned[id] = nil; fields._ntimers = fields._ntimers - 1 end
  else
    t.owner.count = t.owner.count - 1
  end
end

function Timer.__index:cancel()
  local id = timer_ids[self]
  if id and timers[id] then
    forget_timer(id)
    command(OP_TIMER_CANCEL, id)
  end
end

local function start_timer(owner, conn, seconds, fn, every)
  if type(seconds) ~= "number" or seconds ~= seconds or seconds < MIN_INTERVAL or seconds > MAX_INTERVAL then
    fail("timer interval must be a number of seconds from 0.001 to 1e9 (got " .. tostring(seconds) .. ")")
  end
  if type(fn) ~= "function" then fail("timer callback must be a function") end
  local fields
  if conn then
    fields = conn_fields(conn)
    if (fields._ntimers or 0) >= MAX_CONN_TIMERS then
      fail("a connection may have at most " .. MAX_CONN_TIMERS .. " timers")
    end
  elseif owner.count >= MAX_PLUGIN_TIMERS then
    fail(owner.name .. " has " .. MAX_PLUGIN_TIMERS .. " timers already (the most a plugin may have per event loop)")
  end
  next_timer = next_timer + 1
  local id = next_timer
  -- Swift first: it refuses a timer on a closed connection (an error at the caller's line),
  -- and nothing is recorded here unless it accepted.
  command(OP_TIMER_START, conn and conn_id(conn) or 0, id, seconds, every, owner.set.generation)
  timers[id] = { fn = fn, conn = conn, every = every, owner = owner }
  if conn then
    local owned = fields._timers
    if owned == nil then owned = {}; fields._timers = owned; fields._ntimers = 0 end
    owned[id] = true
    fields._ntimers = fields._ntimers + 1
  else
    owner.count = owner.count + 1
  end
  local timer = setmetatable({}, Timer)
  timer_ids[timer] = id
  return timer
end

------------------------------------------------------------------------ the luaws module
-- What every plugin's `luaws` shares; each plugin gets its own read-only view (make_luaws)
-- whose timers and log lines are its own.
local base = {
  version = "0.1.0",
  utcnow_iso = core.utcnow_iso,
  now = core.now,
}

--- The value of a `--var NAME=VALUE` given on the command line, or `default`.
--- With a number default the value is converted to a number.
function base.var(name, default)
  local v = vars[name]
  if v == nil then return default end
  if type(default) == "number" then
    local n = tonumber(v)
    if n == nil then fail("--var " .. name .. "=" .. v .. " is not a number") end
    return n
  end
  return v
end

------------------------------------------------------------------------ waiting
-- What a hook may wait for (core.wait's first argument); ScriptHost's WaitOperation has the
-- same numbers.
local WAIT_SLEEP, WAIT_HTTP, WAIT_REDIS, WAIT_STORE, WAIT_SUBSCRIBE = 1, 2, 3, 4, 5
local wait = core.wait
local unpack_bytes, pack_bytes = string.unpack, string.pack

--- Suspends the hook for `seconds` (0 to 1e9): the event loop serves others meanwhile, and this
--- connection's later events wait their turn. Returns true.
function base.sleep(seconds)
  if type(seconds) ~= "number" or seconds ~= seconds or seconds < 0 or seconds > MAX_INTERVAL then
    fail("sleep: seconds must be a number from 0 to 1e9 (got " .. tostring(seconds) .. ")")
  end
  return wait(WAIT_SLEEP, seconds)
end

--- JSON null, and a nil inside a Redis array.
base.null = core.null

local HTTP_METHODS = { GET = true, HEAD = true, POST = true, PUT = true, PATCH = true, DELETE = true, OPTIONS = true }

--- luaws.http.request{ method =, url =, headers =, body =, timeout =, redirects = }
--- -> res ({ status =, headers = (lower-case names), body = }) or nil, err
local function http_request(opts)
  if type(opts) ~= "table" then fail("http.request: expected a table of options") end
  local method = opts.method or "GET"
  if type(method) ~= "string" or not HTTP_METHODS[method] then
    fail("http.request: method must be one of GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS (got " .. tostring(method) .. ")")
  end
  local url = opts.url
  if type(url) ~= "string" or not (url:match("^https?://[^/%s]+") ) or url:find("[%s%c]") then
    fail("http.request: url must be an http:// or https:// URL (got " .. tostring(url) .. ")")
  end
  local lines = {}
  if opts.headers ~= nil then
    if type(opts.headers) ~= "table" then fail("http.request: headers must be a table of name = value") end
    for k, v in pairs(opts.headers) do
      if type(k) ~= "string" or not k:match("^[!#$%%&'*+%-.^_`|~%w]+$") then fail("http.request: bad header name " .. tostring(k)) end
      v = tostring(v)
      if v:find("[\r\n%z]") then fail("http.request: header " .. k .. " has a line break or NUL in its value") end
      lines[#lines + 1] = k .. ": " .. v
    end
  end
  local body = opts.body
  if body ~= nil and type(body) ~= "string" then fail("http.request: body must be a string") end
  local timeout = opts.timeout
  if timeout ~= nil and (type(timeout) ~= "number" or timeout ~= timeout or timeout <= 0 or timeout > 86400) then
    fail("http.request: timeout must be a number of seconds, more than 0 and at most 86400")
  end
  local status, headers, res_body = wait(WAIT_HTTP, method, url, concat(lines, "\n"), body or "", timeout, opts.redirects == true)
  if not status then return nil, headers end
  return { status = status, headers = parse_headers_block(headers), body = res_body }
end
base.http = readonly({ request = http_request }, "luaws.http")

-- Unpacks ScriptRedisReply.packed: tag byte, payload; arrays in pre-order.
local function unpack_reply(s, at)
  local tag = s:sub(at, at)
  if tag == "s" or tag == "t" then
    local n; n, at = unpack_bytes("<I4", s, at + 1)
    return s:sub(at, at + n - 1), at + n
  elseif tag == "e" then
    local n; n, at = unpack_bytes("<I4", s, at + 1)
    return { err = s:sub(at, at + n - 1) }, at + n
  elseif tag == "i" then
    local v; v, at = unpack_bytes("<i8", s, at + 1)
    return v, at
  elseif tag == "n" then
    return core.null, at + 1
  elseif tag == "a" then
    local n; n, at = unpack_bytes("<I4", s, at + 1)
    local t = {}
    for i = 1, n do t[i], at = unpack_reply(s, at) end
    return t, at
  end
  error("bad redis reply")
end

--- luaws.redis(cmd, ...) -> reply or nil, err: strings, integers, arrays as tables (a nil inside
--- one is luaws.null, an error inside one is { err = "..." }), nil for a nil reply, status
--- replies as strings; a Redis error reply is nil, "ERR ...".
function base.redis(...)
  local n = select("#", ...)
  if n == 0 then fail("redis: a command is needed, e.g. luaws.redis('GET', key)") end
  local args = {}
  for i = 1, n do
    local a = select(i, ...)
    local t = type(a)
    if t == "number" then a = tostring(a) elseif t ~= "string" then
      fail("redis: argument " .. i .. " must be a string or a number (got " .. t .. ")")
    end
    args[i] = pack_bytes("<s4", a)
  end
  local packed, err = wait(WAIT_REDIS, concat(args), n)
  if packed == nil then return nil, err end
  local reply = unpack_reply(packed, 1)
  if reply == core.null then return nil end
  if type(reply) == "table" and reply.err then return nil, reply.err end
  return reply
end

------------------------------------------------------------------------ channels, broadcast
--- Sends `text` to every connection subscribed to `channel`, on every event loop.
--- Returns true, or nil and why when it reached this process's subscribers only (--cluster
--- with Redis down).
function base.publish(channel, text)
  if type(channel) ~= "string" then fail("publish: channel must be a string") end
  text = tostring(text)
  if not utf8_valid(text) then fail("publish: text is not valid UTF-8") end
  local sent = command(OP_PUBLISH, channel, text)
  if sent == true then return true end
  return nil, sent
end

--- Sends `text` to every connection whose path is `path`, on every event loop.
function base.broadcast(path, text)
  if type(path) ~= "string" then fail("broadcast: path must be a string") end
  text = tostring(text)
  if not utf8_valid(text) then fail("broadcast: text is not valid UTF-8") end
  local sent = command(OP_BROADCAST, path, text)
  if sent == true then return true end
  return nil, sent
end

------------------------------------------------------------------------ shared store
-- One store for the whole process (or, with --cluster, for every process on the same Redis).
-- Keys and values are strings (numbers are stored in their string form); a key holds a string
-- or a set. Every operation is atomic. In-process the calls return at once; over Redis they
-- wait (so, there, only where a hook may wait). Failures are nil, err; bad arguments raise.
local STORE_GET, STORE_SET, STORE_ADD, STORE_CAS, STORE_INCR, STORE_DELETE, STORE_EXPIRE, STORE_KEYS,
      STORE_SADD, STORE_SREM, STORE_SMEMBERS, STORE_SCARD = 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12
local store_waits = false

local shared = {}
local function check_key(key, what)
  if type(key) ~= "string" then fail("shared:" .. what .. ": key must be a string (got " .. type(key) .. ")") end
  if not utf8_valid(key) then fail("shared:" .. what .. ": key must be valid UTF-8") end
end
local function store_value(v, what)
  local t = type(v)
  if t == "string" then
    if not utf8_valid(v) then fail("shared:" .. what .. ": values must be valid UTF-8 text (encode bytes, e.g. as hex)") end
    return v
  end
  if t == "number" then
    if v ~= v or v == math.huge or v == -math.huge then fail("shared:" .. what .. ": cannot store " .. tostring(v)) end
    return tostring(v)
  end
  fail("shared:" .. what .. ": values are strings or numbers (got " .. t .. ")")
end
local function check_ttl(ttl, what)
  if ttl ~= nil and (type(ttl) ~= "number" or ttl ~= ttl or ttl < MIN_INTERVAL or ttl > MAX_INTERVAL) then
    fail("shared:" .. what .. ": ttl must be a number of seconds from 0.001 to 1e9 (got " .. tostring(ttl) .. ")")
  end
end
local function store(op, key, a, b, ttl)
  local packed, err
  if store_waits then packed, err = wait(WAIT_STORE, op, key, a, b, ttl)
  else packed, err = command(OP_STORE, op, key, a, b, ttl) end
  if packed == nil then return nil, err end
  local v = unpack_reply(packed, 1)
  if type(v) == "table" and v.err then return nil, v.err end
  return v
end
local function boolean(v, err) if v == nil then return nil, err end return v == 1 end

--- The value of `key` (a string), or nil.
function shared:get(key)
  check_key(key, "get")
  local v, err = store(STORE_GET, key)
  if v == nil then return nil, err end
  if v == core.null then return nil end
  return v
end
--- Stores `value` (nil deletes), for `ttl` seconds if given. True, or nil and why.
function shared:set(key, value, ttl)
  check_key(key, "set")
  if value == nil then return self:delete(key) end
  check_ttl(ttl, "set")
  local v, err = store(STORE_SET, key, store_value(value, "set"), nil, ttl)
  if v == nil then return nil, err end
  return true
end
--- Stores `value` only if `key` is absent: true if it did, false if the key exists.
function shared:add(key, value, ttl)
  check_key(key, "add")
  check_ttl(ttl, "add")
  return boolean(store(STORE_ADD, key, store_value(value, "add"), nil, ttl))
end
--- Compare-and-set: stores `new` only if the value is `old` (nil: absent). True if it did.
function shared:cas(key, old, new)
  check_key(key, "cas")
  if old ~= nil then old = store_value(old, "cas") end
  return boolean(store(STORE_CAS, key, old, store_value(new, "cas")))
end
--- Adds `by` (default 1) to a number (missing counts as 0), atomically; returns the new value.
function shared:incr(key, by)
  check_key(key, "incr")
  by = by or 1
  if type(by) ~= "number" or by ~= by or by == math.huge or by == -math.huge then fail("shared:incr: increment must be a number") end
  local v, err = store(STORE_INCR, key, by)
  if v == nil then return nil, err end
  return math.tointeger(tonumber(v)) or tonumber(v)
end
--- Removes `key`: true if it existed.
function shared:delete(key) check_key(key, "delete") return boolean(store(STORE_DELETE, key)) end
--- Makes `key` expire in `ttl` seconds: true if it exists.
function shared:expire(key, ttl)
  check_key(key, "expire")
  if ttl == nil then fail("shared:expire: ttl is needed") end
  check_ttl(ttl, "expire")
  return boolean(store(STORE_EXPIRE, key, ttl))
end
--- The keys that start with `prefix` (every key: ""), sorted in-process, in no order over Redis.
function shared:keys(prefix)
  prefix = prefix or ""
  check_key(prefix, "keys")
  return store(STORE_KEYS, prefix)
end
--- Sets of strings (presence lists, say): add, remove, list, count.
function shared:sadd(key, member) check_key(key, "sadd") return boolean(store(STORE_SADD, key, store_value(member, "sadd"))) end
function shared:srem(key, member) check_key(key, "srem") return boolean(store(STORE_SREM, key, store_value(member, "srem"))) end
function shared:smembers(key) check_key(key, "smembers") return store(STORE_SMEMBERS, key) end
function shared:scard(key) check_key(key, "scard") return store(STORE_SCARD, key) end
base.shared = readonly(shared, "luaws.shared")

------------------------------------------------------------------------ json
base.json = readonly({
  encode = core.json_encode,
  decode = core.json_decode,
  --- JSON null, as decoded (and as encoded: nil in an array would be a hole).
  null = core.null,
  --- Encodes as []: an empty array (an empty table encodes as {}).
  empty_array = core.json_empty_array,
  --- json.array(t) marks t (a new table without t) as an array, so that it encodes as [] when
  --- empty; decoded arrays are marked. Returns t.
  array = core.json_array,
}, "luaws.json")

-- The `luaws` a plugin (or a module of lib/) sees: the shared functions, plus timers and
-- logging that belong to `owner`.
local function make_luaws(owner)
  local view = {}
  for k, v in pairs(base) do view[k] = v end
  --- Calls fn() once after `seconds`. Returns a timer with :cancel().
  function view.after(seconds, fn) return start_timer(owner, nil, seconds, fn, false) end
  --- Calls fn() every `seconds` until cancelled.
  function view.every(seconds, fn) return start_timer(owner, nil, seconds, fn, true) end
  function view.log(level, ...)
    local l = log_levels[level]
    if l == nil then fail("luaws.log: level must be debug, info, warn or error") end
    core.log(l, "[" .. owner.name .. "] " .. tostrings(...))
  end
  return readonly(view, "luaws")
end

------------------------------------------------------------------------ connections
local conn_methods = {}
local READ_ONLY_FIELDS = { id = true, path = true, protocol = true, query = true, headers = true, remote_addr = true }

-- conn:send(text), conn:send_binary(bytes) and conn:close(code, reason) are C functions.
conn_methods.send = core.conn_send
conn_methods.send_binary = core.conn_send_binary
conn_methods.close = core.conn_close

-- A connection's timers belong to the plugin that made them only for logging; they live as
-- long as the connection, across reloads.
local conn_owner = { name = "conn", count = 0, set = { generation = 0 } }
function conn_methods:after(seconds, fn) return start_timer(conn_owner, self, seconds, fn, false) end
function conn_methods:every(seconds, fn) return start_timer(conn_owner, self, seconds, fn, true) end

--- True once subscribed (with --cluster, once Redis acknowledged it: the call waits); nil and
--- why if Redis is down (then subscribed here, and across processes when Redis is back).
function conn_methods:subscribe(channel)
  if type(channel) ~= "string" then fail("subscribe: channel must be a string") end
  local r = command(OP_SUBSCRIBE, conn_id(self), channel)
  if r == 1 then return wait(WAIT_SUBSCRIBE, channel) end
  return r
end

function conn_methods:unsubscribe(channel)
  if type(channel) ~= "string" then fail("unsubscribe: channel must be a string") end
  return command(OP_UNSUBSCRIBE, conn_id(self), channel)
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

local parse_headers = parse_headers_block

-- `headers`, `query` and `data` are made on first use: most connections never ask for them.
local lazy_fields = {
  id = function(self) return conn_id(self) end,
  headers = function(_, fields) return parse_headers(fields._raw_headers) end,
  query = function(_, fields) return parse_query(fields._raw_query) end,
  data = function() return {} end,
}
core.conn_class(conn_methods,
  -- __index after the methods and the conn's own fields (both looked up in C, the hot path)
  function(self, key, fields)
    local make = lazy_fields[key]
    if make == nil then return nil end
    local value = make(self, fields)
    if key ~= "id" then rawset(fields, key, value) end
    return value
  end,
  -- __newindex: a script may keep its own fields on a conn, but not change what it is.
  function(self, key, value)
    if READ_ONLY_FIELDS[key] or conn_methods[key] ~= nil or (type(key) == "string" and key:sub(1, 1) == "_") then
      fail("conn." .. tostring(key) .. " is read-only")
    end
    rawset(conn_fields(self), key, value)
  end,
  function(self) return "luaws.conn(" .. conn_id(self) .. ")" end)

-- `request`: the table on_upgrade saw, whose `data` becomes the connection's.
local function new_conn(id, path, query, headers, protocol, remote_addr, request)
  return core.new_conn(id, { path = path, protocol = protocol, remote_addr = remote_addr, _raw_query = query, _raw_headers = headers,
                             data = request and rawget(request, "data") or nil })
end

-- The `req` of on_upgrade and of routes: plain tables (parsed at once: not the hot path).
-- `data` (on_upgrade only) becomes `conn.data` if the upgrade is accepted.
local function new_request(method, path, query, headers, remote_addr, body, upgrade)
  return { method = method, path = path, query = parse_query(query), headers = parse_headers(headers),
           remote_addr = remote_addr, body = body, data = upgrade and {} or nil }
end

------------------------------------------------------------------------ sandbox
local function copy(t)
  local c = {}
  for k, v in pairs(t) do c[k] = v end
  return c
end

-- setmetatable without finalizers: a `__gc` runs with hooks off (no instruction budget), at
-- whatever moment the collector picks, even while a state closes. Lua 5.4 marks an object
-- for finalization only when its metatable is set, so refusing `__gc` here is enough.
local function safe_setmetatable(t, mt)
  if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
    fail("setmetatable: __gc finalizers are not available to plugins")
  end
  return setmetatable(t, mt)
end

local function safe_rawset(t, k, v)
  if type(t) ~= "table" then fail("bad argument #1 to 'rawset' (table expected, got " .. type(t) .. ")") end
  if frozen[t] then fail("rawset: this table is read-only") end
  return rawset(t, k, v)
end

-- os.time() and os.date() without a time read luaws.now's clock, not the system's: the same
-- as the system's when serving, the virtual clock under `luaws test`.
local os_time, os_date, floor = os.time, os.date, math.floor
local function script_time(t)
  if t == nil then return floor(core.now()) end
  return os_time(t)
end
local function script_date(format, t)
  if t == nil then t = floor(core.now()) end
  return os_date(format, t)
end

local function sandbox_base(owner, require_fn)
  local env = {
    assert = assert, error = error, ipairs = ipairs, next = next, pairs = pairs,
    pcall = pcall, xpcall = xpcall, rawequal = rawequal, rawget = rawget, rawlen = rawlen,
    rawset = safe_rawset, select = select, setmetatable = safe_setmetatable, getmetatable = getmetatable,
    tonumber = tonumber, tostring = tostring, type = type, _VERSION = _VERSION,
    string = copy(string), table = copy(table), math = copy(math), utf8 = copy(utf8),
    coroutine = copy(coroutine),
    os = { time = script_time, clock = os.clock, date = script_date, difftime = os.difftime },
    luaws = make_luaws(owner),
    require = require_fn,
  }
  env.print = function(...) core.log(LOG_INFO, "[" .. owner.name .. "] " .. tostrings(...)) end
  env.collectgarbage = function(opt, ...)
    opt = opt or "collect"
    if opt == "count" or opt == "collect" or opt == "step" then return collectgarbage(opt, ...) end
    fail("collectgarbage('" .. tostring(opt) .. "') is not available to plugins")
  end
  -- Text chunks only (bytecode can crash the VM), in the plugin's sandbox unless told otherwise.
  env.load = function(chunk, name, mode, chunk_env)
    return load(chunk, name, "t", chunk_env or env)
  end
  env._G = env
  return env
end

-- require("name") loads <lib dir>/name.lua (dots become slashes), once per plugin set.
local function make_require(set, lib_dir, cache)
  local function require_fn(name)
    if type(name) ~= "string" or not name:match("^[%w_]+[%w_%.]*$") or find(name, "..", 1, true) then
      fail("require: bad module name " .. tostring(name))
    end
    local cached = cache[name]
    if cached ~= nil then return cached end
    local path = lib_dir .. "/" .. gsub(name, "%.", "/") .. ".lua"
    local f = io_open(path, "r")
    if f == nil then fail("require: module '" .. name .. "' not found (looked for " .. path .. ")") end
    local src = f:read("a")
    f:close()
    local owner = { name = name, set = set, count = 0 }
    local fn, err = load(src, "@lib/" .. gsub(name, "%.", "/") .. ".lua", "t", sandbox_base(owner, require_fn))
    if fn == nil then error(err, 0) end
    local result = fn(name)
    if result == nil then result = true end
    cache[name] = result
    return result
  end
  return require_fn
end

------------------------------------------------------------------------ plugins
local HOOKS = { on_open = true, on_message = true, on_close = true, on_idle = true, on_reload = true, on_upgrade = true }
local FIELDS = "hooks are on_upgrade, on_open, on_message, on_close, on_idle, on_reload; settings are idle, protocols, name, paths, routes"

-- Where a plugin field was defined, for load errors: a function knows its line.
local function field_where(chunkname, v)
  if type(v) == "function" then
    local info = getinfo(v, "S")
    if info and info.linedefined and info.linedefined > 0 then return chunkname .. ":" .. info.linedefined .. ": " end
  end
  return chunkname .. ": "
end

-- Compiles and runs one plugin's source; checks the table it returns.
local function load_plugin(set, owner, chunkname, src)
  local env = sandbox_base(owner, set.require)
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
      if type(v) ~= "number" or v ~= v or v < MIN_INTERVAL or v > MAX_INTERVAL then
        error(where .. "idle must be a number of seconds from 0.001 to 1e9 (got " .. tostring(v) .. ")", 0)
      end
    elseif k == "protocols" then
      if type(v) ~= "table" then error(where .. "protocols must be a list of strings", 0) end
      for _, p in ipairs(v) do
        if type(p) ~= "string" or not p:match("^[!#$%%&'*+%-.^_`|~%w]+$") then
          error(where .. "protocols must be a list of sub-protocol names (tokens), got " .. tostring(p), 0)
        end
      end
    elseif k == "paths" then
      if type(v) ~= "table" or #v == 0 then error(where .. "paths must be a list of WebSocket paths, e.g. { \"/chat\" }", 0) end
      for _, p in ipairs(v) do
        if type(p) ~= "string" or not p:match("^/[^?#%s]*$") then error(where .. "paths must be paths that start with / (got " .. tostring(p) .. ")", 0) end
      end
    elseif k == "routes" then
      if type(v) ~= "table" then error(where .. "routes must be a table of [\"METHOD /path\"] = function(req)", 0) end
      for key, fn in pairs(v) do
        local method, path
        if type(key) == "string" then method, path = key:match("^(%u+) (/[^?#%s]*)$") end
        if not method or not HTTP_METHODS[method] then
          error(where .. "route " .. tostring(key) .. ": keys are \"METHOD /path\" (GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS)", 0)
        end
        if type(fn) ~= "function" then error(where .. "route " .. key .. " must be a function (got " .. type(fn) .. ")", 0) end
        if set.reserved[path] then error(field_where(chunkname, fn) .. "route " .. key .. " collides with a path the server serves itself (a WebSocket path or /luaws/...)", 0) end
        local other = set.routes[key]
        if other then error(field_where(chunkname, fn) .. "route " .. key .. " is also defined by " .. other, 0) end
        set.routes[key] = chunkname
      end
    elseif k == "name" then
      if type(v) ~= "string" or not v:match("^[%w_%-%.]+$") then
        error(where .. "name must be a string of letters, digits, _ - . (got " .. tostring(v) .. ")", 0)
      end
    else
      error(field_where(chunkname, v) .. "unknown field '" .. tostring(k) .. "' (" .. FIELDS .. ")", 0)
    end
  end
  if plugin.on_idle and not plugin.idle then error(field_where(chunkname, plugin.on_idle) .. "on_idle needs idle = <seconds>", 0) end
  if plugin.idle and not plugin.on_idle then error(where .. "idle is set but there is no on_idle hook", 0) end
  if plugin.name then owner.name = plugin.name end
  return plugin
end

local api = {}

-- A plugin set: every plugin of one load, in order. All-or-nothing: it serves only once
-- Swift activates it, and its plugin timers end when it is retired.
-- `reserved`: paths routes may not take, one a line.
function api.new_set(lib_dir, generation, reserved)
  local set = { plugins = {}, generation = generation, routes = {}, reserved = {} }
  for p in gmatch(reserved or "", "[^\n]+") do set.reserved[p] = true end
  set.require = make_require(set, lib_dir, {})
  return set
end

function api.add_plugin(set, name, chunkname, src)
  local owner = { name = name, set = set, count = 0 }
  set.plugins[#set.plugins + 1] = load_plugin(set, owner, chunkname, src)
end

function api.plugin_field(set, index, field)
  return set.plugins[index][field]
end

-- A plugin's `paths`, one a line (nil: every path); its route keys, one a line; one route.
function api.plugin_paths(set, index)
  local paths = set.plugins[index].paths
  return paths and concat(paths, "\n") or nil
end
function api.plugin_route_keys(set, index)
  local keys = {}
  for k in pairs(set.plugins[index].routes or {}) do keys[#keys + 1] = k end
  table.sort(keys)
  return #keys > 0 and concat(keys, "\n") or nil
end
function api.plugin_route(set, index, key) return set.plugins[index].routes[key] end

api.new_request = new_request

-- on_upgrade(req) returns nothing (accept: the next plugin decides) or a status 400-599 and
-- a reason (refuse: later plugins do not run).
function api.call_upgrade(fn, req)
  local status, reason = fn(req)
  if status == nil then return false end
  if math.type(status) ~= "integer" or status < 400 or status > 599 then
    error("on_upgrade must return nothing (accept) or a status from 400 to 599 and a reason (got " .. tostring(status) .. ")", 0)
  end
  if reason ~= nil and type(reason) ~= "string" and type(reason) ~= "number" then
    error("on_upgrade's reason must be a string (got " .. type(reason) .. ")", 0)
  end
  rawset(req, "_refused", status .. "\n" .. tostring(reason or ""))
  return true
end
function api.upgrade_outcome(req) return rawget(req, "_refused") end

-- A route returns status [, headers [, body]]: the answer is packed for Swift.
function api.call_route(fn, req)
  local status, headers, body = fn(req)
  if status == nil then status = 200 end
  if math.type(status) ~= "integer" or status < 200 or status > 599 then
    error("a route must return a status from 200 to 599 (got " .. tostring(status) .. ")", 0)
  end
  local lines = {}
  if headers ~= nil then
    if type(headers) ~= "table" then error("a route's headers must be a table of name = value", 0) end
    for k, v in pairs(headers) do
      v = tostring(v)
      -- No control characters but tab (NIO would refuse them and drop the connection), UTF-8.
      if type(k) ~= "string" or not k:match("^[!#$%%&'*+%-.^_`|~%w]+$") or v:find("[%z\1-\8\10-\31\127]") or not utf8_valid(v) then
        error("a route's header " .. tostring(k) .. " is not a valid header", 0)
      end
      lines[#lines + 1] = k .. ": " .. v
    end
  end
  if body ~= nil and type(body) ~= "string" then body = tostring(body) end
  -- 204 and 304 answers have no body (one would be read as the start of the next response).
  if status == 204 or status == 304 then body = nil end
  rawset(req, "_response", pack_bytes("<I2s4s4", status, concat(lines, "\n"), body or ""))
  return true
end
function api.route_response(req) return rawget(req, "_response") end

function api.set_var(name, value) vars[name] = value end
function api.set_store_waits(waits) store_waits = waits end

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

-- The set no longer serves (replaced, or never activated): forget its plugin timers (Swift
-- has cancelled them). Connection timers stay: they belong to their connections.
function api.retire_set(set)
  for id, t in pairs(timers) do
    if not t.conn and t.owner.set == set then timers[id] = nil end
  end
end

-- Forgets one timer that Swift will never fire (a top-level timer of a loop that does not run them).
api.forget_timer = forget_timer

api.new_conn = new_conn

-- What scripts can reach, one "group name" pair a line, sorted: the unit test that keeps
-- types/luaws.lua true compares it with the declarations.
function api.describe()
  local lines = {}
  local function add(group, t) for k in pairs(t) do lines[#lines + 1] = group .. " " .. k end end
  add("luaws", make_luaws({ name = "describe", count = 0, set = {} }))
  add("json", base.json)
  add("http", base.http)
  add("shared", shared)
  add("conn", conn_methods)
  add("conn", lazy_fields)
  for _, f in ipairs({ "path", "protocol", "remote_addr" }) do lines[#lines + 1] = "conn " .. f end
  add("plugin", HOOKS)
  for _, f in ipairs({ "idle", "protocols", "name", "paths", "routes" }) do lines[#lines + 1] = "plugin " .. f end
  for _, f in ipairs({ "method", "path", "query", "headers", "remote_addr", "body", "data" }) do lines[#lines + 1] = "request " .. f end
  table.sort(lines)
  return concat(lines, "\n")
end

-- A timer fired (Swift scheduled it). A one-shot timer is forgotten before its callback runs.
function api.fire_timer(id)
  local t = timers[id]
  if t == nil then return end
  if not t.every then forget_timer(id) end
  if t.conn then t.fn(t.conn) else t.fn() end
end

-- The connection is gone (after on_close): forget its timers (Swift has cancelled them).
function api.drop_conn(conn)
  local fields = conn_fields(conn)
  local owned = fields._timers
  if owned == nil then return end
  for id in pairs(owned) do timers[id] = nil end
  fields._timers = nil
  fields._ntimers = 0
end
"""#

/// The prelude of every plugin state.
let luaPrelude = luaPreludeBody + "\nreturn api\n"
