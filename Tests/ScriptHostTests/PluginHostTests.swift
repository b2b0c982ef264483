import Logging
import NIOCore
import ScriptHost
import XCTest

/// A connection that records what plugins did to it.
final class RecordingConnection: ScriptConnection {
    var sent: [(String, Bool)] = []
    var closed: (UInt16, String)?
    var idleTimers: [Double] = []

    func send(_ data: ByteBuffer, binary: Bool) -> Bool {
        sent.append((String(buffer: data), binary))
        return closed == nil
    }

    func close(code: UInt16, reason: String) -> Bool {
        guard closed == nil else { return false }
        closed = (code, reason)
        return true
    }

    func setIdleTimers(_ seconds: [Double]) { idleTimers = seconds }

    /// Every `setReading` call, in order.
    var readingChanges: [Bool] = []
    func setReading(_ reading: Bool) { readingChanges.append(reading) }

    var texts: [String] { sent.map(\.0) }
}

final class PluginHostTests: XCTestCase {
    let logger = Logger(label: "test")
    let request = ScriptRequest(path: "/ws", query: "room=blue&name=a%20b", headers: [("Host", "example"), ("X-Test", "1")])

    func host(_ files: [String: String], vars: [String: String] = [:], limits: ScriptLimits = .init()) throws -> PluginHost {
        let plugins = files.keys.sorted().map { PluginSource(name: $0, path: "scripts/\($0).lua", source: files[$0]!) }
        return try PluginHost(plugins: PluginSet(plugins: plugins, libraryDirectory: "/nonexistent"), vars: vars, limits: limits, logger: logger)
    }

    func text(_ s: String) -> ByteBuffer { ByteBuffer(string: s) }

    func testDefaultScriptsEchoAndDeclareTheIdleTimer() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let set = try PluginSet.read(from: root.appendingPathComponent("scripts").path)
        XCTAssertEqual(set.plugins.map(\.name), ["echo", "time"])
        let host = try PluginHost(plugins: set, vars: ["time_interval": "2.5"], logger: logger)
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        XCTAssertEqual(conn.idleTimers, [2.5])
        host.message(id: 1, data: text("héllo"), binary: false)
        host.message(id: 1, data: text("bin"), binary: true)
        XCTAssertEqual(conn.texts, ["Message received: héllo"])
        host.idle(id: 1, timer: 0)
        XCTAssertEqual(conn.sent.count, 2)
        XCTAssertTrue(conn.texts[1].hasPrefix("It is: 20"))
        XCTAssertEqual(host.errorCount, 0)
    }

    func testConnectionFieldsAndPerConnectionData() throws {
        let host = try host(["p": """
            return {
              on_open = function(conn) conn.data.count = 0 end,
              on_message = function(conn, msg, kind)
                conn.data.count = conn.data.count + 1
                conn:send(table.concat({conn.path, conn.query.room, conn.query.name, conn.headers["x-test"], kind, conn.data.count, tostring(conn.id)}, "|"))
              end,
            }
            """])
        let conn = RecordingConnection()
        host.open(conn, id: 42, request: request)
        host.message(id: 42, data: text("a"), binary: false)
        host.message(id: 42, data: text("b"), binary: true)
        XCTAssertEqual(conn.texts, ["/ws|blue|a b|1|text|1|42", "/ws|blue|a b|1|binary|2|42"])
    }

    func testPluginsRunInOrderAndTrueStopsTheChain() throws {
        let host = try host([
            "a": "return { on_message = function(conn, msg) conn:send('a') return msg == 'stop' end }",
            "b": "return { on_message = function(conn, msg) conn:send('b') end }",
        ])
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        host.message(id: 1, data: text("go"), binary: false)
        host.message(id: 1, data: text("stop"), binary: false)
        XCTAssertEqual(conn.texts, ["a", "b", "a"])
    }

    func testOnCloseSeesCodeAndReason() throws {
        let log = CapturedLog()
        let plugins = PluginSet(plugins: [PluginSource(name: "p", path: "scripts/p.lua", source: "return { on_close = function(conn, code, reason) luaws.log('info', math.type(code), code, reason) end }")], libraryDirectory: "/nonexistent")
        let host = try PluginHost(plugins: plugins, logger: log.logger)
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        host.closed(id: 1, code: 1001, reason: "bye")
        XCTAssertEqual(log.lines, ["info: [p] integer 1001 bye"])
        XCTAssertEqual(host.connectionCount, 0)
        XCTAssertEqual(host.errorCount, 0)
        host.message(id: 1, data: text("late"), binary: false)  // ignored: the connection is gone
    }

    func testCloseFromLuaValidatesTheCode() throws {
        let host = try host(["p": "return { on_message = function(conn, msg) conn:close(tonumber(msg), 'done') end }"])
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        host.message(id: 1, data: text("1006"), binary: false)
        XCTAssertNil(conn.closed)
        XCTAssertEqual(host.errorCount, 1)
        host.message(id: 1, data: text("4000"), binary: false)
        XCTAssertEqual(conn.closed?.0, 4000)
        XCTAssertEqual(conn.closed?.1, "done")
    }

    func testConnHeadersLeaveOutTheHandshakesOwn() throws {
        let host = try host(["p": """
            return { on_message = function(conn)
              local names = {}
              for name in pairs(conn.headers) do names[#names + 1] = name end
              table.sort(names)
              conn:send(table.concat(names, ","))
            end }
            """])
        let conn = RecordingConnection()
        let handshake = ScriptRequest(path: "/ws", query: "", headers: [
            ("Host", "example"), ("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"), ("Sec-WebSocket-Extensions", "permessage-deflate"), ("Sec-WebSocket-Protocol", "chat"),
            ("User-Agent", "x"),
        ])
        host.open(conn, id: 1, request: handshake)
        host.message(id: 1, data: text("?"), binary: false)
        XCTAssertEqual(conn.texts, ["host,sec-websocket-protocol,user-agent"])
    }

    func testSendJoinsItsPartsIntoOneMessage() throws {
        let host = try host(["p": """
            return { on_message = function(conn, msg)
              if msg == "parts" then conn:send("a", 1, "é", 2.5)
              elseif msg == "split" then conn:send("\\xC3", "\\xA9")          -- one character over two parts
              elseif msg == "bad" then conn:send("ok", "\\xFF")
              elseif msg == "bin" then conn:send_binary("\\0", "\\255")
              elseif msg == "big" then conn:send(string.rep("x", 3000), string.rep("y", 3000))
              elseif msg == "notconn" then conn.send({}, "x") end
            end }
            """])
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        for message in ["parts", "split", "bad", "bin", "big", "notconn"] { host.message(id: 1, data: text(message), binary: false) }
        XCTAssertEqual(conn.sent.count, 4)
        XCTAssertEqual(conn.sent[0].0, "a1é2.5")
        XCTAssertEqual(conn.sent[1].0, "é", "UTF-8 is checked on the whole message")
        XCTAssertEqual(conn.sent[2].1, true)
        XCTAssertEqual(conn.sent[3].0, String(repeating: "x", count: 3000) + String(repeating: "y", count: 3000))
        XCTAssertEqual(host.errorCount, 2, "invalid UTF-8 and a table for conn are the script's errors")
    }

    func testRuntimeErrorIsCountedAndTheConnectionLives() throws {
        let host = try host([
            "a": "return { on_message = function(conn, msg)\n  error('boom')\nend }",
            "b": "return { on_message = function(conn, msg) conn:send('still here') end }",
        ])
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        host.message(id: 1, data: text("x"), binary: false)
        XCTAssertEqual(conn.texts, ["still here"])
        XCTAssertEqual(host.errorCount, 1)
        XCTAssertNil(conn.closed)
    }

    func testSandboxHasNoWayOut() throws {
        let probe = """
            return { on_message = function(conn, msg)
              local ok = {}
              for _, name in ipairs({"io", "debug", "package", "dofile", "loadfile", "os.execute", "os.remove", "os.exit", "os.getenv", "io.popen", "string.dump"}) do
                local v = _G
                for part in name:gmatch("[^.]+") do v = v and v[part] end
                ok[#ok + 1] = name .. "=" .. type(v)
              end
              ok[#ok + 1] = "bytecode=" .. tostring(select(2, load("\\27Lua")))
              conn:send(table.concat(ok, " "))
            end }
            """
        let host = try host(["p": probe])
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        host.message(id: 1, data: text("x"), binary: false)
        let report = try XCTUnwrap(conn.texts.first)
        for name in ["io", "debug", "package", "dofile", "loadfile", "os.execute", "os.remove", "os.exit", "os.getenv", "io.popen", "string.dump"] {
            XCTAssertTrue(report.contains("\(name)=nil"), report)
        }
        XCTAssertTrue(report.contains("attempt to load a binary chunk"), report)
    }

    func testPluginsDoNotShareGlobals() throws {
        let host = try host([
            "a": "counter = 1\nreturn { on_message = function(conn) counter = counter + 1 end }",
            "b": "return { on_message = function(conn) conn:send(tostring(counter)) end }",
        ])
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        host.message(id: 1, data: text("x"), binary: false)
        XCTAssertEqual(conn.texts, ["nil"])
    }

    func testInstructionBudgetStopsRunawayCodeEvenUnderPcall() throws {
        let host = try host([
            "a": "return { on_message = function(conn, msg) while true do pcall(function() while true do end end) end end }",
            "b": "return { on_message = function(conn, msg) conn:send('b ran') end }",
        ], limits: ScriptLimits(instructionBudget: 100_000, memoryLimit: 0))
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        host.message(id: 1, data: text("x"), binary: false)
        host.message(id: 1, data: text("y"), binary: false)
        XCTAssertEqual(conn.texts, ["b ran", "b ran"])
        XCTAssertEqual(host.errorCount, 2)
    }

    func testMemoryCapGivesALuaErrorAndTheStateRecovers() throws {
        let host = try host([
            "a": "return { on_message = function(conn, msg) if msg == 'hog' then local t = {} for i = 1, 1e9 do t[i] = ('x'):rep(64) .. i end end conn:send('ok ' .. msg) end }",
        ], limits: ScriptLimits(instructionBudget: 0, memoryLimit: 8 << 20))
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        host.message(id: 1, data: text("hog"), binary: false)
        XCTAssertEqual(host.errorCount, 1)
        host.message(id: 1, data: text("after"), binary: false)
        XCTAssertEqual(conn.texts, ["ok after"])
        XCTAssertLessThan(host.memoryInUse, 8 << 20)
    }

    func testLoadErrorsNameFileAndLineAndKeepThePreviousPlugins() throws {
        let host = try host(["echo": "return { on_message = function(conn, msg) conn:send('v1') end }"])
        let bad = PluginSet(plugins: [
            PluginSource(name: "echo", path: "scripts/echo.lua", source: "return { on_message = function(conn, msg) conn:send('v2') end }"),
            PluginSource(name: "oops", path: "scripts/oops.lua", source: "return {\n  on_message = function(\nend }"),
        ], libraryDirectory: "/nonexistent")
        XCTAssertThrowsError(try host.load(bad)) { error in
            XCTAssertTrue("\(error)".hasPrefix("scripts/oops.lua:3:"), "\(error)")
        }
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        host.message(id: 1, data: text("x"), binary: false)
        XCTAssertEqual(conn.texts, ["v1"])
    }

    func testInvalidPluginTablesAreRejected() throws {
        for (source, expected) in [
            ("return 42", "must return a table"),
            ("return { on_message = 'nope' }", "on_message must be a function"),
            ("return { idle = -1, on_idle = function() end }", "idle must be a number of seconds from 0.001 to 1e9"),
            ("return { idle = 1e10, on_idle = function() end }", "idle must be a number of seconds from 0.001 to 1e9"),
            ("return {\n  on_mesage = function() end }", "scripts/p.lua:2: unknown field 'on_mesage'"),
            ("return { on_idle = function() end }", "on_idle needs idle"),
            ("return { on_mesage = function() end }", "unknown field 'on_mesage'"),
        ] {
            XCTAssertThrowsError(try host(["p": source]), source) { error in
                XCTAssertTrue("\(error)".contains(expected), "\(error)")
            }
        }
    }

    func testUtcnowIsoLooksLikePythons() throws {
        let host = try host(["p": "return { on_message = function(conn) conn:send(luaws.utcnow_iso()) end }"])
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        host.message(id: 1, data: text("x"), binary: false)
        let stamp = try XCTUnwrap(conn.texts.first)
        XCTAssertNotNil(stamp.range(of: #"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?$"#, options: .regularExpression), stamp)
    }

    /// A host given a clock (what `luaws test` does with its virtual one): every way a script
    /// reads the time follows it; without one, the system clock.
    func testScriptsReadTheHostClock() throws {
        var now: Int64 = 1_735_689_600_000_000_000 + 1_500_000  // 2025-01-01T00:00:00.0015Z
        let source = """
            return { on_message = function(conn)
              conn:send(luaws.now() .. " " .. luaws.utcnow_iso() .. " " .. os.time() .. " " .. os.date("!%H:%M:%S"))
            end }
            """
        let set = PluginSet(plugins: [PluginSource(name: "clock", path: "clock.lua", source: source)], libraryDirectory: "/nonexistent")
        let host = try PluginHost(plugins: set, logger: logger, clock: { now })
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        host.message(id: 1, data: text("x"), binary: false)
        now += 3_600_000_000_000
        host.message(id: 1, data: text("x"), binary: false)
        XCTAssertEqual(conn.texts, [
            "1735689600.0015 2025-01-01T00:00:00.001500 1735689600 00:00:00",
            "1735693200.0015 2025-01-01T01:00:00.001500 1735693200 01:00:00",
        ])

        let real = try PluginHost(plugins: set, logger: logger)
        let other = RecordingConnection()
        real.open(other, id: 1, request: request)
        real.message(id: 1, data: text("x"), binary: false)
        let seconds = Double(other.texts[0].split(separator: " ")[0]) ?? 0
        XCTAssertEqual(seconds, Date().timeIntervalSince1970, accuracy: 60)
    }
}
