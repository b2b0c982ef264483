import CLua
import Foundation

/// What a test file's `test` module asks of the runner that drives the plugins (`luaws test`):
/// `test.connect(...)` becomes `testCall("connect", ...)`. Called on the thread that runs the
/// test file, never re-entering its Lua state (the plugins run in a state of their own).
public protocol ScriptTestDriver: AnyObject {
    /// Runs `name`; `.error(message)` is raised in the test file at the line that called it.
    func testCall(_ name: String, _ args: [ScriptTestValue]) -> ScriptTestValue
    /// `print` and `luaws.log` of the test file.
    func testLog(_ message: String)
}

/// A value crossing between a test file and its driver.
public enum ScriptTestValue: Equatable, Sendable {
    case `nil`
    case bool(Bool)
    case integer(Int64)
    case number(Double)
    /// From Lua, any string (as UTF-8; binary payloads travel in hex); to Lua, text.
    case string(String)
    /// To Lua only: a string of any bytes.
    case bytes([UInt8])
    /// To Lua only: raised as an error at the test file's line.
    case error(String)

    public var string: String? { if case .string(let s) = self { s } else { nil } }
    public var number: Double? {
        switch self {
        case .integer(let n): Double(n)
        case .number(let n): n
        default: nil
        }
    }
    public var integer: Int64? {
        switch self {
        case .integer(let n): n
        case .number(let n) where n.rounded() == n && abs(n) < 9e18: Int64(n)
        default: nil
        }
    }
}

/// A test file (`*_test.lua`) in a Lua state of its own, sandboxed like a plugin, with one
/// extra global: the `test` module (the prelude's test part below), whose functions reach the
/// runner through `ScriptTestDriver`. Loading runs its top level, which declares the cases;
/// each case then runs on its own.
public final class ScriptTestFile: LuaVMDelegate {
    private let vm: LuaVM
    private unowned let driver: ScriptTestDriver
    private let fnRunCase: Int32
    /// The cases the file declared, in order.
    public private(set) var cases: [String] = []

    /// Compiles and runs `source` (named `chunkname` in errors: `chunkname:line:`). Throws a
    /// `LuaError` for a syntax error or an error at its top level. `clock`: the time the file
    /// sees in `luaws.now` and `os.time`, as for `PluginHost`.
    public init(chunkname: String, source: String, libraryDirectory: String, driver: ScriptTestDriver, clock: (() -> Int64)? = nil) throws {
        self.driver = driver
        // A test runs as one call, however many steps it takes: a generous budget still stops
        // a test stuck in a loop (with an error) instead of hanging the run.
        vm = try LuaVM(memoryLimit: 512 << 20, instructionBudget: 2_000_000_000, prelude: luaTestPrelude)
        fnRunCase = try vm.apiFunction("run_case")
        vm.clock = clock
        vm.delegate = self
        let count = try vm.call(try vm.apiFunction("load_test"), [.string(chunkname), .string(source), .string(libraryDirectory)]).number ?? 0
        let caseName = try vm.apiFunction("case_name")
        for index in 0..<Int(count) {
            cases.append(try vm.call(caseName, [.int(Int64(index + 1))]).string ?? "case \(index + 1)")
        }
    }

    /// Runs case `index` (from 0): nil if it passed, else why it failed (`file:line: ...`).
    public func run(case index: Int) -> String? {
        do {
            try vm.call(fnRunCase, [.int(Int64(index + 1))])
            return nil
        } catch let error as LuaError {
            // The message, not Lua's traceback: its first line already says file:line, and the
            // traceback would mostly show the runner's own frames.
            let message = error.message
            if let range = message.range(of: "\nstack traceback:") { return String(message[..<range.lowerBound]) }
            return message
        } catch {
            return "\(error)"
        }
    }

    // MARK: LuaVMDelegate

    func luaSend(connection: Int64, bytes: UnsafeRawBufferPointer, binary: Bool) -> Bool { false }
    func luaClose(connection: Int64, code: UInt16, reason: String) -> Bool { false }

    func luaLog(level: Int32, message: String) {
        driver.testLog(message)
    }

    func luaCommand(_ op: Int32, _ args: [LuaValue]) -> LuaValue {
        guard op == testCommand, case .string(let name)? = args.first else {
            return .error("not available in test files (timers, channels and the shared store belong to plugins)")
        }
        let values: [ScriptTestValue] = args.dropFirst().map { value in
            switch value {
            case .nil: .nil
            case .bool(let b): .bool(b)
            case .integer(let n): .integer(n)
            case .number(let n): .number(n)
            case .string(let s): .string(s)
            case .bytes(let b): .string(String(decoding: b, as: UTF8.self))
            case .error(let s): .error(s)
            }
        }
        switch driver.testCall(name, values) {
        case .nil: return .nil
        case .bool(let b): return .bool(b)
        case .integer(let n): return .integer(n)
        case .number(let n): return .number(n)
        case .string(let s): return .string(s)
        case .bytes(let b): return .bytes(b)
        case .error(let s): return .error(s)
        }
    }
}

/// core.command's operation for the test module (the plugin operations stop well below).
private let testCommand: Int32 = 100

/// The prelude of a test file's state: the plugin prelude (its sandbox, `fail`, JSON) plus the
/// `test` module. Kept in the prelude's chunk so that errors it raises point at the test file's
/// line, as the plugin API's errors point at the plugin's.
let luaTestPrelude = luaPreludeBody + #"""

local function install_test_api()
  local OP_TEST = 100
  local fmt, byte, sort, mtype = string.format, string.byte, table.sort, math.type
  local json_encode, json_decode = core.json_encode, core.json_decode
  local cases = {}
  local in_case = false
  local t = {}

  local function call(name, ...) return command(OP_TEST, name, ...) end
  local function hex(s) return (gsub(s, ".", function(c) return fmt("%02x", byte(c)) end)) end

  -- A value as a test failure shows it: strings quoted, tables with sorted keys.
  local function quote(s)
    return '"' .. gsub(s, '[%c"\\]', function(c)
      if c == "\n" then return "\\n" elseif c == "\r" then return "\\r" elseif c == "\t" then return "\\t"
      elseif c == '"' then return '\\"' elseif c == "\\" then return "\\\\" end
      return fmt("\\%03d", byte(c))
    end) .. '"'
  end
  local function show(v, depth)
    local ty = type(v)
    if ty == "string" then return quote(v) end
    if ty ~= "table" then return tostring(v) end
    depth = depth or 0
    if depth > 4 then return "{...}" end
    local keys = {}
    for k in pairs(v) do keys[#keys + 1] = k end
    sort(keys, function(a, b)
      local ta, tb = type(a), type(b)
      if ta ~= tb then return ta < tb end
      if ta == "number" or ta == "string" then return a < b end
      return tostring(a) < tostring(b)
    end)
    local parts, n = {}, #v
    for _, k in ipairs(keys) do
      if mtype(k) == "integer" and k >= 1 and k <= n then
        parts[#parts + 1] = show(v[k], depth + 1)
      elseif type(k) == "string" and k:match("^[%a_][%w_]*$") then
        parts[#parts + 1] = k .. " = " .. show(v[k], depth + 1)
      else
        parts[#parts + 1] = "[" .. show(k, depth + 1) .. "] = " .. show(v[k], depth + 1)
      end
    end
    return "{" .. concat(parts, ", ") .. "}"
  end
  local function equal(a, b)
    if a == b then return true end
    if type(a) ~= "table" or type(b) ~= "table" then return false end
    for k, v in pairs(a) do if not equal(v, b[k]) then return false end end
    for k in pairs(b) do if a[k] == nil then return false end end
    return true
  end
  local function prefix(message) return message ~= nil and (tostring(message) .. ": ") or "" end

  local function need_case(what)
    if not in_case then fail(what .. " can only be used inside test.case(name, function() ... end)") end
  end

  --- test.case(name, fn): declares a case; cases run in order, each against fresh plugins.
  function t.case(name, fn)
    if in_case then fail("test.case cannot be nested: declare cases at the top of the file") end
    if type(name) ~= "string" then fail("test.case: the name must be a string") end
    if type(fn) ~= "function" then fail("test.case: expected a function after the name") end
    cases[#cases + 1] = { name = name, fn = fn }
  end

  --- test.expect(actual, expected [, message]): equal values (tables compared deeply).
  function t.expect(actual, expected, message)
    if not equal(actual, expected) then
      fail(prefix(message) .. "expect failed\n    expected: " .. show(expected) .. "\n    actual:   " .. show(actual))
    end
  end

  --- test.match(actual, pattern [, message]): a string that matches the Lua pattern.
  function t.match(actual, pattern, message)
    if type(pattern) ~= "string" then fail("match: the pattern must be a string") end
    if type(actual) ~= "string" or not find(actual, pattern) then
      fail(prefix(message) .. "match failed\n    pattern:  " .. show(pattern) .. "\n    actual:   " .. show(actual))
    end
  end

  --- test.ok(value [, message]): a value that is neither nil nor false.
  function t.ok(value, message)
    if not value then fail(prefix(message) .. "expected a true value, got " .. show(value)) end
  end

  --- test.fails(fn [, pattern]): fn raises an error, or a plugin hook fails while it runs
  --- (else a hook error fails the case); returns the error message.
  function t.fails(fn, pattern)
    if type(fn) ~= "function" then fail("fails: expected a function") end
    if pattern ~= nil and type(pattern) ~= "string" then fail("fails: the pattern must be a string") end
    call("fails_begin")
    local ok, err = pcall(fn)
    local hook_errors = call("fails_end")
    local message
    if not ok then message = tostring(err) end
    if hook_errors then message = message and (message .. "\n" .. hook_errors) or hook_errors end
    if message == nil then fail("fails: expected an error, but none happened") end
    if pattern ~= nil and not find(message, pattern) then
      fail("fails: the error does not match " .. show(pattern) .. "\n    error: " .. message)
    end
    return message
  end

  --- test.plugins{"echo", "time"}: only these plugins of the scripts (by file name), in
  --- their usual order. At the top of a file for every case, or in a case before connect.
  function t.plugins(names)
    if type(names) ~= "table" then fail("plugins: expected a list of plugin names, e.g. test.plugins{\"echo\"}") end
    for i, n in ipairs(names) do
      if type(n) ~= "string" then fail("plugins: name " .. i .. " is not a string") end
    end
    call("plugins", concat(names, "\n"))
  end

  --- test.scripts(path): the plugins to test are these (a folder or one .lua file, relative
  --- to the test file) instead of --scripts.
  function t.scripts(path)
    if type(path) ~= "string" then fail("scripts: expected a path") end
    call("scripts", path)
  end

  --- test.set_var(name, value): what luaws.var(name) returns to the plugins (like --var).
  function t.set_var(name, value)
    if type(name) ~= "string" then fail("set_var: the name must be a string") end
    if value == nil then fail("set_var: a value is needed") end
    call("set_var", name, tostring(value))
  end

  --- test.now(): the virtual clock, in seconds since the epoch (luaws.now of the plugins).
  function t.now() return call("now") end

  --- test.advance(seconds): moves the virtual clock; idle hooks, timers, sleeps and the
  --- server's own deadlines fire in time order.
  function t.advance(seconds)
    need_case("advance")
    if type(seconds) ~= "number" or seconds ~= seconds or seconds < 0 or seconds > 1e9 then
      fail("advance: seconds must be a number from 0 to 1e9 (got " .. tostring(seconds) .. ")")
    end
    call("advance", seconds)
  end

  --- test.http_stub(url, response): what luaws.http.request gets for `url` (a trailing * matches
  --- any rest). response: a body string, or { status =, headers =, body =, delay =, error = }.
  function t.http_stub(url, response)
    if type(url) ~= "string" then fail("http_stub: the url must be a string") end
    if type(response) == "string" then response = { body = response } end
    if type(response) ~= "table" then fail("http_stub: response must be a body string or a table { status =, headers =, body =, delay =, error = }") end
    for k in pairs(response) do
      if k ~= "status" and k ~= "headers" and k ~= "body" and k ~= "delay" and k ~= "error" then
        fail("http_stub: unknown field " .. tostring(k) .. " (status, headers, body, delay, error)")
      end
    end
    local status = response.status or 200
    if mtype(status) ~= "integer" then fail("http_stub: status must be an integer") end
    local lines = {}
    for k, v in pairs(response.headers or {}) do lines[#lines + 1] = tostring(k) .. ": " .. tostring(v) end
    sort(lines)
    local body = response.body or ""
    if type(body) ~= "string" then fail("http_stub: body must be a string") end
    local delay = response.delay
    if delay ~= nil and (type(delay) ~= "number" or delay < 0) then fail("http_stub: delay must be a number of seconds") end
    if response.error ~= nil and type(response.error) ~= "string" then fail("http_stub: error must be a string") end
    call("http_stub", url, status, concat(lines, "\n"), hex(body), response.error, delay)
  end

  --- test.http_requests(): the requests plugins made so far: { method =, url =, headers =, body = }.
  function t.http_requests() return json_decode(call("http_requests")) end

  --- test.redis(cmd, ...): a command to the fake Redis the plugins use (to seed or inspect it).
  function t.redis(...)
    local n = select("#", ...)
    if n == 0 then fail("redis: a command is needed, e.g. test.redis('GET', key)") end
    local parts = {}
    for i = 1, n do
      local a = select(i, ...)
      if type(a) ~= "string" and type(a) ~= "number" then fail("redis: argument " .. i .. " must be a string or a number") end
      parts[i] = hex(tostring(a))
    end
    local reply = json_decode(call("redis", concat(parts, " ")))
    if reply.err then return nil, reply.err end
    if reply.value == core.null then return nil end
    return reply.value
  end

  --- test.reload(scripts): reloads the plugins as the server does (on_reload runs for every
  --- connection): nil re-reads them; a list of names picks some; { ["x.lua"] = source } gives
  --- new sources; a string is another folder or file.
  function t.reload(scripts)
    need_case("reload")
    if scripts == nil then return call("reload", "same") end
    if type(scripts) == "string" then return call("reload", "path", scripts) end
    if type(scripts) ~= "table" then fail("reload: expected nothing, a path, a list of names or a table of sources") end
    if #scripts > 0 then
      for i, n in ipairs(scripts) do if type(n) ~= "string" then fail("reload: name " .. i .. " is not a string") end end
      return call("reload", "names", concat(scripts, "\n"))
    end
    for k, v in pairs(scripts) do
      if type(k) ~= "string" or not k:match("%.lua$") or type(v) ~= "string" then
        fail("reload: sources are { [\"name.lua\"] = \"source\" }")
      end
    end
    return call("reload", "sources", json_encode(scripts))
  end

  --- test.logs(): what the plugins logged (print, luaws.log, script errors) since the case began.
  function t.logs() return json_decode(call("logs")) end

  -- A connection of a test: fields are read live from the runner.
  local client_methods = {}
  local client_fields = { status = true, refused = true, body = true, open = true, closed = true,
                          close_code = true, close_reason = true, protocol = true, pending = true }
  local Client = {
    __index = function(c, k)
      local m = client_methods[k]
      if m then return m end
      if client_fields[k] then return call("field", rawget(c, "_id"), k) end
      fail("a test connection has no field '" .. tostring(k) .. "' (methods: send, send_binary, recv, recv_all, close; fields: status, refused, body, open, pending, closed, close_code, close_reason, protocol)")
    end,
    __newindex = function(_, k) fail("a test connection's fields are read-only (cannot set '" .. tostring(k) .. "')") end,
    __tostring = function(c) return "test connection " .. rawget(c, "_id") end,
    __metatable = false,
  }
  local function id_of(c, what)
    local id = type(c) == "table" and rawget(c, "_id")
    if id == nil then fail(what .. ": call it as conn:" .. what .. "(...)") end
    need_case(what)
    return id
  end
  function client_methods.send(c, text)
    local id = id_of(c, "send")
    if type(text) ~= "string" then fail("send: expected a string") end
    if not utf8_valid(text) then fail("send: text must be valid UTF-8 (use send_binary for bytes)") end
    call("send", id, "text", hex(text))
  end
  function client_methods.send_binary(c, bytes)
    local id = id_of(c, "send_binary")
    if type(bytes) ~= "string" then fail("send_binary: expected a string of bytes") end
    call("send", id, "binary", hex(bytes))
  end
  --- conn:recv() -> the next message the server sent and its kind ("text" or "binary"), or nil.
  function client_methods.recv(c)
    local got = call("recv", id_of(c, "recv"))
    if got == nil then return nil end
    return got:sub(2), (got:sub(1, 1) == "b" and "binary" or "text")
  end
  --- conn:recv_all() -> every message queued (a list of strings).
  function client_methods.recv_all(c)
    local id, all = id_of(c, "recv_all"), {}
    while true do
      local got = call("recv", id)
      if got == nil then return all end
      all[#all + 1] = got:sub(2)
    end
  end
  function client_methods.close(c, code, reason)
    local id = id_of(c, "close")
    if code ~= nil and (mtype(code) ~= "integer" or code < 1000 or code > 4999) then fail("close: code must be an integer from 1000 to 4999") end
    if reason ~= nil and type(reason) ~= "string" then fail("close: reason must be a string") end
    call("close", id, code or 1000, reason or "")
  end

  -- The answer to test.request: fields read live (status is nil until the route answers).
  local Response = {
    __index = function(r, k)
      local id = rawget(r, "_id")
      if k == "status" then return call("field", id, "refused") end
      if k == "body" then
        if call("field", id, "refused") == nil then return nil end
        return call("field", id, "body")
      end
      if k == "headers" then
        if call("field", id, "refused") == nil then return nil end
        return json_decode(call("field", id, "headers"))
      end
      fail("a test response has no field '" .. tostring(k) .. "' (status, headers, body)")
    end,
    __newindex = function(_, k) fail("a test response is read-only (cannot set '" .. tostring(k) .. "')") end,
    __metatable = false,
  }
  local HTTP_METHODS = { GET = true, HEAD = true, POST = true, PUT = true, PATCH = true, DELETE = true, OPTIONS = true }
  local REQUEST_OPTIONS = { headers = true, body = true, remote_addr = true }
  --- test.request(method, path [, { headers =, body =, remote_addr = }]) -> response: a plain
  --- HTTP request (plugin routes): response.status, .headers (lower-case names), .body.
  function t.request(method, path, opts)
    need_case("request")
    if not HTTP_METHODS[method] then fail("request: method must be one of GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS") end
    if type(path) ~= "string" or path:sub(1, 1) ~= "/" or find(path, "[%s%c]") then
      fail("request: the path must start with / and have no spaces")
    end
    opts = opts or {}
    if type(opts) ~= "table" then fail("request: options must be a table { headers =, body =, remote_addr = }") end
    for k in pairs(opts) do
      if not REQUEST_OPTIONS[k] then fail("request: unknown option " .. tostring(k) .. " (headers, body, remote_addr)") end
    end
    local lines = {}
    for k, v in pairs(opts.headers or {}) do
      v = tostring(v)
      if type(k) ~= "string" or not k:match("^[!#$%%&'*+%-.^_`|~%w]+$") or find(v, "[\r\n%z]") then
        fail("request: bad header " .. tostring(k))
      end
      lines[#lines + 1] = k .. ": " .. v
    end
    sort(lines)
    if opts.body ~= nil and type(opts.body) ~= "string" then fail("request: body must be a string") end
    local id = call("request", method, path, concat(lines, "\n"), hex(opts.body or ""), opts.remote_addr)
    return setmetatable({ _id = id }, Response)
  end

  local CONNECT_OPTIONS = { headers = true, protocols = true, remote_addr = true }
  --- test.connect(path [, { headers =, protocols =, remote_addr = }]) -> conn: opens a WebSocket
  --- through the server's handshake, on_upgrade and on_open. A refusal: conn.refused is its status.
  function t.connect(path, opts)
    need_case("connect")
    if type(path) ~= "string" or path:sub(1, 1) ~= "/" or find(path, "[%s%c]") then
      fail("connect: the path must start with / and have no spaces (e.g. \"/ws?room=blue\")")
    end
    opts = opts or {}
    if type(opts) ~= "table" then fail("connect: options must be a table { headers =, protocols =, remote_addr = }") end
    for k in pairs(opts) do
      if not CONNECT_OPTIONS[k] then fail("connect: unknown option " .. tostring(k) .. " (headers, protocols, remote_addr)") end
    end
    local lines = {}
    if opts.headers ~= nil then
      if type(opts.headers) ~= "table" then fail("connect: headers must be a table of name = value") end
      for k, v in pairs(opts.headers) do
        v = tostring(v)
        if type(k) ~= "string" or not k:match("^[!#$%%&'*+%-.^_`|~%w]+$") or find(v, "[\r\n%z]") then
          fail("connect: bad header " .. tostring(k))
        end
        lines[#lines + 1] = k .. ": " .. v
      end
      sort(lines)
    end
    if opts.protocols ~= nil then
      if type(opts.protocols) ~= "table" then fail("connect: protocols must be a list of names") end
      lines[#lines + 1] = "Sec-WebSocket-Protocol: " .. concat(opts.protocols, ", ")
    end
    if opts.remote_addr ~= nil and type(opts.remote_addr) ~= "string" then fail("connect: remote_addr must be an IP address") end
    local id = call("connect", path, concat(lines, "\n"), opts.remote_addr)
    return setmetatable({ _id = id }, Client)
  end

  local names = {}
  for k in pairs(t) do names[#names + 1] = k end
  sort(names)
  local known = concat(names, ", ")
  local module = setmetatable({}, {
    __index = function(_, k)
      local f = t[k]
      if f == nil then fail("test." .. tostring(k) .. " does not exist (the test module has: " .. known .. ")") end
      return f
    end,
    __newindex = function(_, k) fail("the test module is read-only (cannot set '" .. tostring(k) .. "')") end,
    __metatable = false,
  })

  function api.load_test(chunkname, src, lib_dir)
    local set = { generation = -1 }
    local env = sandbox_base({ name = "test", set = set, count = 0 }, make_require(set, lib_dir, {}))
    env.test = module
    local fn, err = load(src, "@" .. chunkname, "t", env)
    if fn == nil then error(err, 0) end
    fn()
    return #cases
  end
  function api.case_name(i) return cases[i].name end
  function api.run_case(i)
    in_case = true
    local ok, err = pcall(cases[i].fn)
    in_case = false
    if not ok then error(err, 0) end
  end
end
install_test_api()

return api
"""#
