import Logging
import NIOCore
import NIOEmbedded
import NIOPosix
@testable import ScriptHost
import XCTest

/// The promises of the sandbox and the plugin lifecycle: nothing a script does may crash,
/// stall or bloat the process, and a plugin set loads, serves and retires as one.
final class GuaranteesTests: XCTestCase {
    let request = ScriptRequest(path: "/ws", query: "", headers: [])

    func set(_ files: [String: String]) -> PluginSet {
        PluginSet(plugins: files.keys.sorted().map { PluginSource(name: $0, path: "scripts/\($0).lua", source: files[$0]!) }, libraryDirectory: "/nonexistent")
    }

    func host(_ files: [String: String], log: CapturedLog = CapturedLog(), limits: ScriptLimits = .init(), loop: EventLoop? = nil, isPrimary: Bool = true) throws -> PluginHost {
        try PluginHost(plugins: set(files), limits: limits, logger: log.logger, eventLoop: loop, isPrimary: isPrimary)
    }

    func text(_ s: String) -> ByteBuffer { ByteBuffer(string: s) }

    // MARK: numbers from scripts

    func testTimerIntervalsOutOfRangeAreLuaErrorsAtTheCallersLine() throws {
        let loop = EmbeddedEventLoop()
        let log = CapturedLog()
        let host = try host(["p": """
            return { on_message = function(conn, msg)
              local n = tonumber(msg)
              if n < 0 then luaws.every(-n, function() end) else
              conn:after(n, function() end) end
            end }
            """], log: log, loop: loop)
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        for value in ["9.3e9", "-1e10", "1e300", "0", "-0"] {
            host.message(id: 1, data: text(value), binary: false)
        }
        XCTAssertEqual(host.errorCount, 5)
        XCTAssertTrue(log.text.contains("scripts/p.lua:4: timer interval must be a number of seconds from 0.001 to 1e9 (got 9300000000"), log.text)
        XCTAssertTrue(log.text.contains("scripts/p.lua:3: timer interval"), log.text)
        XCTAssertEqual(host.timerCount, 0)
        host.message(id: 1, data: text("1e9"), binary: false)   // the largest allowed
        XCTAssertEqual(host.timerCount, 1)
    }

    // MARK: memory outside the Lua caps

    func testSharedStoreIsCappedAndSaysSo() throws {
        let log = CapturedLog()
        var limits = ScriptLimits(sharedMemoryLimit: 1 << 20)
        limits.sharedValueLimit = 256 << 10
        let cluster = ScriptCluster(plugins: set(["p": """
            return { on_message = function(conn, msg)
              if msg == "fill" then for i = 1, 100 do luaws.shared:set("k" .. i, string.rep("x", 100000)) end
              elseif msg == "big" then luaws.shared:set("big", string.rep("x", 300000))
              elseif msg == "free" then for i = 1, 100 do luaws.shared:delete("k" .. i) end conn:send("freed")
              else luaws.shared:set("small", "ok") conn:send(luaws.shared:get("small")) end
            end }
            """]), limits: limits, logger: log.logger)
        let loop = EmbeddedEventLoop()
        let host = try cluster.makeHost(on: loop)
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        host.message(id: 1, data: text("fill"), binary: false)
        XCTAssertTrue(log.text.contains("scripts/p.lua:2: shared: the store is full (1 MiB, --shared-memory-mb)"), log.text)
        host.message(id: 1, data: text("big"), binary: false)
        XCTAssertTrue(log.text.contains("scripts/p.lua:3: shared: key and value of 300003 bytes are over the limit of 262144 bytes"), log.text)
        host.message(id: 1, data: text("free"), binary: false)
        host.message(id: 1, data: text("x"), binary: false)
        XCTAssertEqual(conn.texts, ["freed", "ok"])
        XCTAssertEqual(host.errorCount, 2)
    }

    func testTheStoreRefusesValuesOfOtherTypesAtTheCallersLine() throws {
        let log = CapturedLog()
        let cluster = ScriptCluster(plugins: set(["p": """
            return { on_message = function(conn, msg)
              if msg == "bool" then luaws.shared:set("k", true)
              elseif msg == "table" then luaws.shared:sadd("k", {})
              elseif msg == "ttl" then luaws.shared:set("k", "v", -1)
              else luaws.shared:set("n", 3) conn:send(luaws.shared:get("n") .. " " .. math.type(luaws.shared:incr("n"))) end
            end }
            """]), logger: log.logger)
        let host = try cluster.makeHost(on: EmbeddedEventLoop())
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        for msg in ["bool", "table", "ttl", "ok"] { host.message(id: 1, data: text(msg), binary: false) }
        XCTAssertTrue(log.text.contains("scripts/p.lua:2: shared:set: values are strings or numbers (got boolean)"), log.text)
        XCTAssertTrue(log.text.contains("scripts/p.lua:3: shared:sadd: values are strings or numbers (got table)"), log.text)
        XCTAssertTrue(log.text.contains("scripts/p.lua:4: shared:set: ttl must be a number of seconds"), log.text)
        XCTAssertEqual(conn.texts, ["3 integer"])
    }

    func testPublishFanOutIsBounded() throws {
        let log = CapturedLog()
        let cluster = ScriptCluster(plugins: set(["p": """
            return { on_message = function(conn, msg)
              local big = string.rep("x", 1 << 20)
              for i = 1, 1500 do luaws.publish("nobody", big) end
            end }
            """]), logger: log.logger)
        let loop = EmbeddedEventLoop()
        let host = try cluster.makeHost(on: loop)
        host.open(RecordingConnection(), id: 1, request: request)
        host.message(id: 1, data: text("go"), binary: false)
        XCTAssertTrue(log.text.contains("scripts/p.lua:3: publish: more than 64 MiB of messages are waiting for delivery"), log.text)
        loop.run()  // deliveries drain; publishing works again
        host.message(id: 1, data: text("go"), binary: false)
        XCTAssertEqual(host.errorCount, 2)
    }

    // MARK: the instruction budget cannot be escaped

    func testFinalizersAreRefused() throws {
        let log = CapturedLog()
        XCTAssertThrowsError(try host(["p": "setmetatable({}, { __gc = function() while true do end end })\nreturn {}"])) { error in
            XCTAssertTrue("\(error)".contains("scripts/p.lua:1: setmetatable: __gc finalizers are not available to plugins"), "\(error)")
        }
        let host = try host(["p": "return { on_message = function(conn) setmetatable({}, { __gc = false }) end }"], log: log)
        host.open(RecordingConnection(), id: 1, request: request)
        host.message(id: 1, data: text("x"), binary: false)
        XCTAssertTrue(log.text.contains("__gc finalizers are not available"), log.text)
    }

    func testBudgetCoversEveryCoroutineAHookRuns() throws {
        let log = CapturedLog()
        let limits = ScriptLimits(instructionBudget: 1_000_000, memoryLimit: 0)
        let host = try host(["p": """
            return { on_message = function(conn, msg)
              if msg == "many" then
                for i = 1, 60 do coroutine.wrap(function() for j = 1, 400000 do end end)() end
              else
                for i = 1, 100000 do coroutine.wrap(function() for j = 1, 300 do end end)() end
              end
              conn:send("finished " .. msg)
            end }
            """], log: log, limits: limits)
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        host.message(id: 1, data: text("many"), binary: false)
        host.message(id: 1, data: text("short"), binary: false)
        XCTAssertEqual(conn.texts, [])
        XCTAssertEqual(host.errorCount, 2)
        XCTAssertTrue(log.text.contains("instruction budget exceeded (1000000 instructions)"), log.text)
    }

    func testALongLivedCoroutineDoesNotRunOutOfBudget() throws {
        let host = try host(["p": """
            local co = coroutine.wrap(function() local n = 0 while true do n = n + 1 coroutine.yield(n) end end)
            return { on_message = function(conn, msg) if msg == "last" then conn:send(tostring(co())) else co() end end }
            """], limits: ScriptLimits(instructionBudget: 10_000, memoryLimit: 0))
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        for _ in 0..<20_000 { host.message(id: 1, data: text("x"), binary: false) }
        host.message(id: 1, data: text("last"), binary: false)
        XCTAssertEqual(host.errorCount, 0)
        XCTAssertEqual(conn.texts, ["20001"])
    }

    // MARK: timers and subscriptions are bounded and cleaned up

    func testTimersPerConnectionAndPerPluginAreLimited() throws {
        let loop = EmbeddedEventLoop()
        let log = CapturedLog()
        let host = try host(["p": """
            return { on_message = function(conn, msg)
              if msg == "conn" then for i = 1, 65 do conn:every(1, function() end) end
              else for i = 1, 1025 do luaws.every(0.001, function() end) end end
            end }
            """], log: log, loop: loop)
        host.open(RecordingConnection(), id: 1, request: request)
        host.message(id: 1, data: text("conn"), binary: false)
        XCTAssertTrue(log.text.contains("scripts/p.lua:2: a connection may have at most 64 timers"), log.text)
        host.message(id: 1, data: text("plugin"), binary: false)
        XCTAssertTrue(log.text.contains("scripts/p.lua:3: p has 1024 timers already"), log.text)
        XCTAssertEqual(host.timerCount, 64 + 1024)
        host.closed(id: 1, code: 1000, reason: "")
        XCTAssertEqual(host.timerCount, 1024)
    }

    func testWhatOnCloseStartsEndsWithTheConnection() throws {
        let loop = EmbeddedEventLoop()
        let log = CapturedLog()
        let host = try host(["p": """
            saved = nil
            return {
              on_open = function(conn) if not saved then saved = conn end end,
              on_close = function(conn, code, reason)
                luaws.log("info", "closed", code, reason)
                conn:every(0.01, function() luaws.log("info", "ghost tick") end)
                conn:subscribe("room")
              end,
              on_message = function(conn, msg)
                local errors = 0
                for i = 1, 1000 do if not pcall(saved.after, saved, 1, function() end) then errors = errors + 1 end end
                conn:send(errors .. " " .. select(2, pcall(saved.after, saved, 1, function() end)))
              end,
            }
            """], log: log, loop: loop)
        host.open(RecordingConnection(), id: 1, request: request)
        host.closed(id: 1, code: 1001, reason: "bye")
        XCTAssertTrue(log.text.contains("[p] closed 1001 bye"), log.text)
        XCTAssertEqual(host.timerCount, 0)
        loop.advanceTime(by: .milliseconds(50))
        XCTAssertFalse(log.text.contains("ghost tick"), log.text)
        let other = RecordingConnection()
        host.open(other, id: 2, request: request)
        let before = host.memoryInUse
        host.message(id: 2, data: text("x"), binary: false)
        XCTAssertEqual(other.texts, ["1000 scripts/p.lua:12: timer on a closed connection"])
        XCTAssertEqual(host.timerCount, 0)
        XCTAssertLessThan(host.memoryInUse, before + 64 << 10)
    }

    // MARK: the plugin set's lifecycle

    func testRetiringASetCancelsItsPluginTimers() throws {
        let loop = EmbeddedEventLoop()
        func tick(_ version: String) -> [String: String] {
            ["tick": """
                local conns = {}
                luaws.every(0.01, function() for c in pairs(conns) do c:send("tick \(version)") end end)
                return { on_open = function(conn) conns[conn] = true end, on_reload = function(conn) conns[conn] = true end }
                """]
        }
        let host = try host(tick("v1"), loop: loop)
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        loop.advanceTime(by: .milliseconds(25))
        XCTAssertEqual(conn.texts, ["tick v1", "tick v1"])
        try host.load(set(tick("v2")), reloading: true)
        XCTAssertEqual(host.timerCount, 1)
        loop.advanceTime(by: .milliseconds(25))
        XCTAssertEqual(conn.texts, ["tick v1", "tick v1", "tick v2", "tick v2"])
    }

    func testTopLevelTimersLoadEverywhereAndRunOnThePrimaryOnly() throws {
        let source = ["t": "ticks = 0\nluaws.every(0.01, function() ticks = ticks + 1 end)\nreturn { on_message = function(conn) conn:send(tostring(ticks)) end }"]
        // luaws check: no event loop, nothing runs, nothing fails.
        XCTAssertNoThrow(try host(source))
        let loop = EmbeddedEventLoop()
        let primary = try host(source, loop: loop, isPrimary: true)
        let secondary = try host(source, loop: loop, isPrimary: false)
        XCTAssertEqual(primary.timerCount, 1)
        XCTAssertEqual(secondary.timerCount, 0)
        loop.advanceTime(by: .milliseconds(35))
        let a = RecordingConnection(), b = RecordingConnection()
        primary.open(a, id: 1, request: request)
        secondary.open(b, id: 1, request: request)
        primary.message(id: 1, data: text("x"), binary: false)
        secondary.message(id: 1, data: text("x"), binary: false)
        XCTAssertEqual(a.texts, ["3"])
        XCTAssertEqual(b.texts, ["0"])
        // and a reload of such a plugin works
        XCTAssertNoThrow(try primary.load(set(source), reloading: true))
        XCTAssertEqual(primary.timerCount, 1)
    }

    func testReloadIsAllOrNothingAcrossEventLoops() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        func version(_ v: String, failOnLoad: Int) -> PluginSet {
            set(["p": """
                if luaws.shared:incr("loads") == \(failOnLoad) then error("fails on the second loop") end
                return { on_message = function(conn) conn:send("\(v)") end }
                """])
        }
        let cluster = ScriptCluster(plugins: version("v1", failOnLoad: -1), logger: CapturedLog().logger)
        let loops = Array(group.makeIterator())
        for loop in loops { _ = try await loop.submit { _ = try cluster.makeHost(on: loop) }.get() }
        // loads 3 (first loop) succeeds, 4 (second loop) fails: neither loop may switch.
        let result = await cluster.reload(version("v2", failOnLoad: 4))
        guard case .failure(let error) = result else { return XCTFail("reload should fail") }
        XCTAssertTrue(error.message.contains("fails on the second loop"), error.message)
        XCTAssertFalse(cluster.status.lastReloadOK)
        let served = try await cluster.probe(message: "x")
        XCTAssertEqual(served, ["v1", "v1"])
        // and a good reload switches both
        _ = await cluster.reload(version("v3", failOnLoad: -1))
        let after = try await cluster.probe(message: "x")
        XCTAssertEqual(after, ["v3", "v3"])
        try await group.shutdownGracefully()
    }

    // MARK: what plugins share, they cannot break for each other

    func testLuawsIsReadOnlyAndAConnCannotChangeIdentity() throws {
        let log = CapturedLog()
        let host = try host([
            "a": """
                return { on_message = function(conn, msg)
                  if msg == "1" then luaws.publish = function() end
                  elseif msg == "2" then rawset(luaws, "log", print)
                  elseif msg == "3" then luaws.json.encode = nil
                  elseif msg == "4" then conn.id = 5
                  elseif msg == "5" then rawset(conn, "id", 5)
                  else conn.nick = "ann" conn:send(conn.nick .. " " .. conn.id) end
                end }
                """,
            "b": "return { on_message = function(conn, msg) conn:send(type(luaws.publish) .. ' ' .. type(luaws.log) .. ' ' .. type(luaws.json.encode)) end }",
        ], log: log)
        let conn = RecordingConnection()
        host.open(conn, id: 7, request: request)
        for msg in ["1", "2", "3", "4", "5", "6"] { host.message(id: 7, data: text(msg), binary: false) }
        XCTAssertEqual(host.errorCount, 5)
        for line in ["scripts/a.lua:2: luaws is read-only", "scripts/a.lua:3: rawset: this table is read-only",
                     "scripts/a.lua:4: luaws.json is read-only", "scripts/a.lua:5: conn.id is read-only", "scripts/a.lua:6: bad argument #1 to 'rawset'"] {
            XCTAssertTrue(log.text.contains(line), "\(line) in \(log.text)")
        }
        XCTAssertEqual(conn.texts.last, "function function function")
        XCTAssertEqual(conn.texts.dropLast().last, "ann 7")
    }

    func testTextMustBeUTF8WhereverItIsSent() throws {
        let log = CapturedLog()
        let cluster = ScriptCluster(plugins: set(["p": """
            return { on_message = function(conn, msg)
              if msg == "send" then conn:send("\\255")
              elseif msg == "publish" then luaws.publish("c", "\\192\\128")
              elseif msg == "broadcast" then luaws.broadcast("/ws", "\\237\\160\\128")
              elseif msg == "close" then conn:close(4000, "\\244\\144\\128\\128")
              else conn:send_binary("\\255") conn:send("héllo ✓ 😀") end
            end }
            """]), logger: log.logger)
        let host = try cluster.makeHost(on: EmbeddedEventLoop())
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        for msg in ["send", "publish", "broadcast", "close", "ok"] { host.message(id: 1, data: text(msg), binary: false) }
        XCTAssertEqual(host.errorCount, 4)
        XCTAssertTrue(log.text.contains("scripts/p.lua:2: bad argument #1 to 'send' (text is not valid UTF-8"), log.text)
        XCTAssertTrue(log.text.contains("scripts/p.lua:3: publish: text is not valid UTF-8"), log.text)
        XCTAssertTrue(log.text.contains("scripts/p.lua:4: broadcast: text is not valid UTF-8"), log.text)
        XCTAssertTrue(log.text.contains("scripts/p.lua:5: bad argument #2 to 'close' (close reason is not valid UTF-8)"), log.text)
        XCTAssertNil(conn.closed)
        XCTAssertEqual(conn.sent.count, 2)
        XCTAssertEqual(conn.texts.last, "héllo ✓ 😀")
    }

    // MARK: smaller promises

    func testStringDumpIsGoneEvenThroughTheStringMetatable() throws {
        let host = try host(["p": "return { on_message = function(conn) conn:send(type(string.dump) .. ' ' .. type((''):rep(1) and ('').dump)) end }"])
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        host.message(id: 1, data: text("x"), binary: false)
        XCTAssertEqual(conn.texts, ["nil nil"])
    }

    func testPluginNameFieldNamesItsLogLines() throws {
        let log = CapturedLog()
        let host = try host(["p": "luaws.log('info', 'loading')\nreturn { name = 'greeter', on_message = function(conn) luaws.log('warn', 'hi', 1) print('printed') end }"], log: log)
        XCTAssertEqual(host.pluginNames, ["greeter"])
        host.open(RecordingConnection(), id: 1, request: request)
        host.message(id: 1, data: text("x"), binary: false)
        XCTAssertTrue(log.text.contains("info: [p] loading"), log.text)
        XCTAssertTrue(log.text.contains("warning: [greeter] hi 1"), log.text)
        XCTAssertTrue(log.text.contains("info: [greeter] printed"), log.text)
    }

    func testBadCloseCodeIsReportedAtTheCallersLine() throws {
        let log = CapturedLog()
        let host = try host(["p": "return { on_message = function(conn)\n  conn:close(2999)\nend }"], log: log)
        host.open(RecordingConnection(), id: 1, request: request)
        host.message(id: 1, data: text("x"), binary: false)
        XCTAssertTrue(log.text.contains("scripts/p.lua:2: bad argument #1 to 'close' (not a close code"), log.text)
    }
}

extension ScriptCluster {
    /// What each loop's plugins answer to `message` on a fresh connection, in loop order.
    func probe(message: String) async throws -> [String] {
        var answers: [String] = []
        for (index, (loop, host)) in hosts.enumerated() {
            let answer = try await loop.submit { () -> String in
                let conn = RecordingConnection()
                let id = Int64(1000 + index)
                host.value.open(conn, id: id, request: ScriptRequest(path: "/ws", query: "", headers: []))
                host.value.message(id: id, data: ByteBuffer(string: message), binary: false)
                host.value.closed(id: id, code: 1000, reason: "")
                return conn.texts.joined(separator: ",")
            }.get()
            answers.append(answer)
        }
        return answers
    }
}
