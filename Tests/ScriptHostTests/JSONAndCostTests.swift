import Foundation
import Logging
import NIOCore
import ScriptHost
import XCTest

/// Keeps every log line, so tests can read the script errors a host reports.
final class LogLines: @unchecked Sendable {
    private let lock = NSLock()
    private var lines: [String] = []
    func append(_ line: String) { lock.withLock { lines.append(line) } }
    var all: [String] { lock.withLock { lines } }
}

struct RecordingLogHandler: LogHandler {
    let lines: LogLines
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .info
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    func log(event: LogEvent) {
        lines.append("\(event.message)")
    }
}

/// luaws.json (in C, on the Lua state) and the charged string/table functions: what they
/// produce, and that scripts cannot make them work past the memory cap or the budget.
final class JSONAndCostTests: XCTestCase {
    let request = ScriptRequest(path: "/ws", query: "", headers: [])
    let log = LogLines()

    /// A host with one plugin, `scripts/p.lua`, and one open connection (id 1).
    func open(_ source: String, limits: ScriptLimits = .init()) throws -> (PluginHost, RecordingConnection) {
        let lines = log
        let logger = Logger(label: "test") { _ in RecordingLogHandler(lines: lines) }
        let set = PluginSet(plugins: [PluginSource(name: "p", path: "scripts/p.lua", source: source)], libraryDirectory: "/nonexistent")
        let host = try PluginHost(plugins: set, limits: limits, logger: logger)
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        return (host, conn)
    }

    /// Sends each message to a plugin whose on_message is `body` (with `conn` and `msg`) and
    /// returns what it sent back.
    func replies(_ body: String, _ messages: [String], limits: ScriptLimits = .init()) throws -> [String] {
        let (host, conn) = try open("return { on_message = function(conn, msg)\n\(body)\nend }", limits: limits)
        for m in messages { host.message(id: 1, data: ByteBuffer(string: m), binary: false) }
        XCTAssertEqual(host.errorCount, 0, log.all.joined(separator: "\n"))
        return conn.texts
    }

    /// Runs `body` as a message hook that must fail; returns the error lines logged.
    func failure(_ body: String, limits: ScriptLimits = .init(), message: String = "x") throws -> (errors: [String], seconds: Double, host: PluginHost, conn: RecordingConnection) {
        let (host, conn) = try open("return { on_message = function(conn, msg)\n  if msg == 'ping' then conn:send('pong') return end\n\(body)\nend }", limits: limits)
        let start = Date()
        host.message(id: 1, data: ByteBuffer(string: message), binary: false)
        let seconds = Date().timeIntervalSince(start)
        XCTAssertEqual(host.errorCount, 1, "the hook should have failed")
        // The state stays usable.
        host.message(id: 1, data: ByteBuffer(string: "ping"), binary: false)
        XCTAssertEqual(conn.texts.last, "pong")
        return (log.all.filter { $0.contains("script error") }, seconds, host, conn)
    }

    static func peakRSSBytes() -> Int {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        return usage.ru_maxrss * 1024   // kilobytes on Linux
    }

    // MARK: JSON

    func testRoundTripsKeepTextAndSortKeys() throws {
        let texts = [
            #"{"a":[1,2,3],"b":{"c":null,"d":true,"e":false},"f":"x"}"#,
            #"[1,-2,0.5,1e+300,"é😀","tab\tquote\"back\\slash/","\u0001"]"#,
            #"{"":0,"A":1,"a":2,"é":3}"#,
            "[]", "{}", #"{"empty":[],"obj":{}}"#, "null", "0", #""text""#,
        ]
        let out = try replies("conn:send(luaws.json.encode(luaws.json.decode(msg)))", texts)
        XCTAssertEqual(out, [
            #"{"a":[1,2,3],"b":{"c":null,"d":true,"e":false},"f":"x"}"#,
            #"[1,-2,0.5,1e+300,"é😀","tab\tquote\"back\\slash/","\u0001"]"#,
            #"{"":0,"A":1,"a":2,"é":3}"#,
            "[]", "{}", #"{"empty":[],"obj":{}}"#, "null", "0", #""text""#,
        ])
        // Keys are sorted bytewise whatever the insertion order: equal tables, equal text.
        let sorted = try replies("""
            local a, b = {}, {}
            for i = 1, 50 do a["k" .. i] = i end
            for i = 50, 1, -1 do b["k" .. i] = i end
            conn:send(tostring(luaws.json.encode(a) == luaws.json.encode(b)))
            conn:send(luaws.json.encode({ zeta = 1, alpha = { 3, 2, 1 }, mid = "m" }))
            """, ["x"])
        XCTAssertEqual(sorted, ["true", #"{"alpha":[3,2,1],"mid":"m","zeta":1}"#])
    }

    func testEscapesSurrogatesAndStrings() throws {
        let out = try replies("""
            local s = luaws.json.decode(msg)
            conn:send(s .. "|" .. #s .. "|" .. luaws.json.encode(s))
            """, [#""\ud83d\ude00 \u00e9 \/ \n""#])
        XCTAssertEqual(out, ["😀 é / \n|11|\"😀 é / \\n\""])
    }

    func testNumbers() throws {
        let out = try replies("""
            local j = luaws.json
            local big = j.decode("9007199254740993")
            conn:send(math.type(big) .. " " .. tostring(big) .. " " .. j.encode(big))
            conn:send(tostring(j.decode("9223372036854775807") == math.maxinteger) .. " " .. tostring(j.decode("-9223372036854775808") == math.mininteger))
            conn:send(math.type(j.decode("9223372036854775808")) .. " " .. math.type(j.decode("1.0")) .. " " .. math.type(j.decode("1e2")))
            conn:send(j.encode({ 0.1, 1/3, 2.0, -0.5, 1e300, math.maxinteger, 123456789012 }))
            local x = 1/3
            conn:send(tostring(j.decode(j.encode(x)) == x))
            """, ["x"])
        XCTAssertEqual(out, [
            "integer 9007199254740993 9007199254740993",
            "true true",
            "float float float",
            "[0.1,0.33333333333333331,2,-0.5,1e+300,9223372036854775807,123456789012]",
            "true",
        ])
    }

    func testEmptyArraysAndArrayMarker() throws {
        let out = try replies("""
            local j = luaws.json
            conn:send(j.encode({}))
            conn:send(j.encode(j.array({})))
            conn:send(j.encode(j.array()))
            conn:send(j.encode({ list = j.empty_array, map = {} }))
            conn:send(j.encode(j.array({ 1, 2 })))
            local t = j.decode('{"a":[],"b":[[]]}')
            conn:send(j.encode(t))
            t.a[1] = "now one"
            conn:send(j.encode(t.a))
            conn:send(tostring(j.empty_array) .. " " .. tostring(getmetatable(t.a)))
            conn:send(select(2, pcall(j.array, setmetatable({}, {}))))
            conn:send(select(2, pcall(j.encode, j.array({ x = 1 }))))
            """, ["x"])
        XCTAssertEqual(out.count, 10)
        XCTAssertEqual(Array(out.prefix(8)), [
            "{}", "[]", "[]", #"{"list":[],"map":{}}"#, "[1,2]", #"{"a":[],"b":[[]]}"#, #"["now one"]"#,
            "luaws.json.empty_array luaws.json.array",
        ])
        XCTAssertTrue(out[8].contains("already has a metatable"), out[8])
        XCTAssertTrue(out[9].contains("marked as an array has string keys"), out[9])
    }

    func testTablesThatAreNeitherArraysNorObjectsAreErrors() throws {
        let out = try replies("""
            local j = luaws.json
            local function try(v)
              local ok, err = pcall(function() return j.encode(v) end)
              conn:send(ok and "ok" or err)
            end
            try({ 1, nil, 3 })
            try({ [1] = 1, [3] = 3 })
            try({ [1] = 1, ["1"] = 2 })
            try({ [true] = 1 })
            try({ [1.5] = 1 })
            try({ [0] = "zero" })
            try({ f = print })
            try({ s = "\\xff" })
            try({ n = 0/0 })
            local cycle = {}
            cycle.self = cycle
            try(cycle)
            """, ["x"])
        let expected = [
            "json.encode: array has holes (2 entries, largest index 3)",
            "json.encode: array has holes (2 entries, largest index 3)",
            "json.encode: table mixes integer and string keys",
            "json.encode: table key of type boolean",
            "json.encode: table key 1.5 is not an integer",
            "json.encode: table key 0 is not a positive integer",
            "json.encode: cannot encode a function",
            "json.encode: string is not valid UTF-8",
            "json.encode: cannot encode NaN or infinity",
            "json.encode: nesting deeper than 64 (a cycle?)",
        ]
        XCTAssertEqual(out.count, expected.count)
        for (got, want) in zip(out, expected) {
            XCTAssertTrue(got.hasPrefix("scripts/p.lua:4: " + want), "\(got) does not start with scripts/p.lua:4: \(want)")
        }
    }

    func testDecodeErrorsCarryLineAndColumn() throws {
        let cases: [(String, String)] = [
            (#"{"a": x}"#, "unexpected character 'x' (expected a value) at line 1, column 7"),
            ("[1,\n 2,\n  }", "unexpected character '}' (expected a value) at line 3, column 3"),
            (#"{"é": tru}"#, "unexpected character '}' at line 1, column 10"),
            ("[1] x", "unexpected character 'x' (expected the end after the value) at line 1, column 5"),
            ("", "unexpected end of input (expected a value) at line 1, column 1"),
            (#"["\ud800"]"#, "lone high surrogate in \\u escape at line 1, column 3"),
            (#""\udc00""#, "lone low surrogate in \\u escape at line 1, column 2"),
            ("[01]", "unexpected character '1' (expected ',' or ']') at line 1, column 3"),
            (#"{"a":1,}"#, "unexpected character '}' (expected a string key) at line 1, column 8"),
            ("\"a\u{1}b\"", "control character in string (escape it) at line 1, column 3"),
            ("1e400", "number out of range at line 1, column 1"),
            (String(repeating: "[", count: 201), "nesting deeper than 200 at line 1, column 201"),
        ]
        let out = try replies("""
            local ok, err = pcall(function() return luaws.json.decode(msg) end)
            conn:send(ok and "decoded" or err)
            """, cases.map(\.0))
        XCTAssertEqual(out.count, cases.count)
        for (got, (input, want)) in zip(out, cases) {
            XCTAssertEqual(got, "scripts/p.lua:2: json.decode: not valid JSON: " + want, "input: \(input)")
        }
        // Invalid UTF-8 in a string (sent as binary: a text message must be UTF-8 already).
        let (host, conn) = try open("return { on_message = function(conn, msg) conn:send((select(2, pcall(luaws.json.decode, msg)))) end }")
        host.message(id: 1, data: ByteBuffer(bytes: Array("\"ab\u{FF}\"".utf8.prefix(3)) + [0xFF, 0x22]), binary: true)
        XCTAssertEqual(conn.texts, ["json.decode: not valid JSON: invalid UTF-8 in string at line 1, column 4"])
    }

    /// A table of 1,000 references to one ~300 KB subtable: its text would be ~300 MB. The
    /// encoder pays for every node it writes, so the budget (or the memory cap) stops it early.
    func testSharedSubtableBombFailsFast() throws {
        let before = Self.peakRSSBytes()
        let result = try failure("""
            local sub = {}
            for i = 1, 3000 do sub["key" .. i] = ("v"):rep(60) end
            local t = {}
            for i = 1, 1000 do t[i] = sub end
            conn:send(#luaws.json.encode(t))
            """)
        let grown = Self.peakRSSBytes() - before
        print("shared-subtable bomb: failed in \(String(format: "%.3f", result.seconds)) s, peak RSS +\(grown >> 20) MiB: \(result.errors.first ?? "")")
        XCTAssertTrue(result.errors.contains { $0.contains("instruction budget exceeded") || $0.contains("memory") }, "\(result.errors)")
        XCTAssertLessThan(result.seconds, 5)
        XCTAssertLessThan(grown, 512 << 20)
        XCTAssertTrue(result.conn.texts == ["pong"])
    }

    /// 16 MiB of small numbers: decoded within the cap and the budget, or refused cleanly.
    func testDecodeOf16MiBArray() throws {
        var text = "["
        text.reserveCapacity(16 << 20 + 16)
        var i = 0
        while text.utf8.count < 16 << 20 - 8 {
            text += String(i % 1000)
            text += ","
            i += 1
        }
        text += "0]"
        let (host, conn) = try open("return { on_message = function(conn, msg) local t = luaws.json.decode(msg) conn:send(tostring(#t)) end }")
        let before = Self.peakRSSBytes()
        let start = Date()
        host.message(id: 1, data: ByteBuffer(string: text), binary: false)
        let seconds = Date().timeIntervalSince(start)
        let grown = Self.peakRSSBytes() - before
        print("16 MiB decode (\(i + 1) numbers): \(String(format: "%.3f", seconds)) s, peak RSS +\(grown >> 20) MiB, replies \(conn.texts), errors \(log.all.filter { $0.contains("script error") })")
        if host.errorCount == 0 {
            XCTAssertEqual(conn.texts, [String(i + 1)])
        } else {
            XCTAssertEqual(host.errorCount, 1)
        }
        XCTAssertLessThan(host.memoryInUse, ScriptLimits().memoryLimit)
        XCTAssertLessThan(grown, 768 << 20)
    }

    // MARK: charged C functions

    func testBacktrackingPatternStopsWithTheBudgetError() throws {
        let result = try failure(#"conn:send(tostring(string.find(string.rep("a", 40), string.rep("a*", 12) .. "b")))"#)
        XCTAssertTrue(result.errors.contains { $0.contains("scripts/p.lua:3: instruction budget exceeded") }, "\(result.errors)")
        XCTAssertLessThan(result.seconds, 5)
    }

    func testRepeatedRepHitsTheBudget() throws {
        // Memory cap raised so that the budget, not the cap, is what stops it.
        let result = try failure(#"local s for i = 1, 100 do s = ("x"):rep(1e8) end"#, limits: ScriptLimits(instructionBudget: 10_000_000, memoryLimit: 1 << 30))
        XCTAssertTrue(result.errors.contains { $0.contains("scripts/p.lua:3: instruction budget exceeded") }, "\(result.errors)")
        XCTAssertLessThan(result.seconds, 10)
    }

    func testEndlessConcatAndMoveAreCharged() throws {
        let concat = try failure(#"conn:send(#table.concat(setmetatable({}, { __index = function() return "x" end }), "", 1, 1e12))"#)
        XCTAssertTrue(concat.errors.contains { $0.contains("instruction budget exceeded") }, "\(concat.errors)")
        log.append("---")
        let move = try failure(#"table.move({}, 1, 1e12, 1, setmetatable({}, { __newindex = function() end }))"#)
        XCTAssertTrue(move.errors.last { $0.contains("script error") }?.contains("instruction budget exceeded") == true, "\(move.errors)")
    }

    func testCopiesOfABigStringAreCharged() throws {
        for call in ["big:upper()", "big:sub(2)", "big:reverse()", "big:gsub('x', 'y')", "string.format('%s', big)"] {
            let result = try failure("local big = ('x'):rep(1e7) for i = 1, 1e6 do local u = \(call) end")
            XCTAssertTrue(result.errors.last?.contains("scripts/p.lua:3: instruction budget exceeded") == true, "\(call): \(result.errors)")
            XCTAssertLessThan(result.seconds, 5, call)
        }
    }

    func testStringDumpIsGone() throws {
        XCTAssertEqual(try replies(#"conn:send(type(string.dump) .. " " .. type(("").dump) .. " " .. tostring(("x"):rep(3)))"#, ["x"]), ["nil nil xxx"])
    }

    func testPatternFunctionsGiveLuasResults() throws {
        let out = try replies(#"""
            local results = {}
            local function add(...) local t = table.pack(...) for i = 1, t.n do t[i] = tostring(t[i]) end results[#results + 1] = table.concat(t, ",") end
            add(string.find("hello world", "o w"))
            add(string.find("hello world", "l+"))
            add(string.find("a.b", ".", 1, true))
            add(string.find("key = value", "(%w+)%s*=%s*(%w+)"))
            add(string.find("abc", "b", -1))
            add(string.match("  trim me  ", "^%s*(.-)%s*$"))
            add(string.match("2024-05-06", "(%d+)-(%d+)-(%d+)"))
            add(string.match("hello", "()ll()"))
            add(string.match("f(a(b)c)d", "%b()"))
            add(string.match("xyz", "^y"))
            add(string.match("end", "d$"))
            add(string.gsub("hello world", "o", "0"))
            add(string.gsub("hello world", "(%w+)", "<%1>"))
            add(string.gsub("abc", "%w", "%0%0", 2))
            add(string.gsub("$name is $age", "%$(%w+)", { name = "bob", age = 3 }))
            add(string.gsub("abc", ".", function(c) if c ~= "b" then return c:upper() end end))
            add(string.gsub("THE (quick) fox", "%f[%a]%a+", "W"))
            add(string.gsub("one two", "^%a+", "X"))
            add(string.gsub("", "x*", "-"))
            local words = {}
            for k, v in string.gmatch("a=1, b=2, c=3", "(%w+)=(%w+)") do words[#words + 1] = k .. v end
            add(table.concat(words, " "))
            add(string.format("%5.2f|%-3d|%q|%x|%s", 3.14159, 7, "a\"\0", 255, nil))
            add(string.rep("ab", 3, "-"), string.rep("x", 0), string.rep("", 1e18), ("abc"):rep(4))
            add(pcall(string.rep, "x", 1 << 62))
            add(pcall(string.find, "x", "%"))
            local t = { 5, 3, 1, 4, 2 }
            table.sort(t) add(table.concat(t))
            table.sort(t, function(a, b) return a > b end) add(table.concat(t))
            table.insert(t, 1, 9) table.insert(t, 0) add(table.concat(t, ","), table.remove(t, 1), table.remove(t))
            add(table.concat(table.move({ 1, 2, 3 }, 1, 3, 2), ""))
            conn:send(table.concat(results, "\n"))
            """#, ["x"])
        XCTAssertEqual(out.first?.split(separator: "\n", omittingEmptySubsequences: false).map(String.init), [
            "5,7",
            "3,4",
            "2,2",
            "1,11,key,value",
            "nil",
            "trim me",
            "2024,05,06",
            "3,5",
            "(a(b)c)",
            "nil",
            "d",
            "hell0 w0rld,2",
            "<hello> <world>,2",
            "aabbc,2",
            "bob is 3,2",
            "AbC,3",
            "W (W) W,3",
            "X two,1",
            "-,1",
            "a1 b2 c3",
            #" 3.14|7  |"a\"\0"|ff|nil"#,
            "ab-ab-ab,,,abcabcabcabc",
            "false,resulting string too large",
            "false,malformed pattern (ends with '%')",
            "12345",
            "54321",
            "9,5,4,3,2,1,0,9,0",
            "1123",
        ])
    }
}
