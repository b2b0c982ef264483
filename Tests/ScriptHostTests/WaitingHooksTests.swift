import Logging
import NIOCore
import NIOEmbedded
@testable import ScriptHost
import XCTest

/// Hooks that wait (luaws.sleep here; HTTP and Redis go the same way): they run in coroutines,
/// the loop serves others meanwhile, and one connection's events still run in arrival order.
/// Time is an EmbeddedEventLoop's: virtual, so a 10 s wait takes no time.
final class WaitingHooksTests: XCTestCase {
    let request = ScriptRequest(path: "/ws", query: "", headers: [])

    func host(_ files: [String: String], log: CapturedLog = CapturedLog(), limits: ScriptLimits = .init(), loop: EventLoop) throws -> PluginHost {
        let set = PluginSet(plugins: files.keys.sorted().map { PluginSource(name: $0, path: "\($0).lua", source: files[$0]!) }, libraryDirectory: "/nonexistent")
        return try PluginHost(plugins: set, limits: limits, logger: log.logger, eventLoop: loop)
    }

    func text(_ s: String) -> ByteBuffer { ByteBuffer(string: s) }

    static let sleepy = """
        return { on_message = function(conn, msg)
          local ms = tonumber(msg:match("^sleep (%d+)"))
          if ms then luaws.sleep(ms / 1000) end
          conn:send("done " .. msg)
        end }
        """

    func testASleepingHookHoldsItsConnectionsOrderButNotOthers() throws {
        let loop = EmbeddedEventLoop()
        let host = try host(["p": Self.sleepy], loop: loop)
        let a = RecordingConnection(), b = RecordingConnection()
        host.open(a, id: 1, request: request)
        host.open(b, id: 2, request: request)
        host.message(id: 1, data: text("sleep 100"), binary: false)
        host.message(id: 1, data: text("second"), binary: false)
        host.message(id: 2, data: text("other"), binary: false)
        XCTAssertEqual(a.texts, [])
        XCTAssertEqual(b.texts, ["done other"])  // not held up by connection 1
        XCTAssertEqual(host.waitingHooks, 1)
        loop.advanceTime(by: .milliseconds(99))
        XCTAssertEqual(a.texts, [])
        loop.advanceTime(by: .milliseconds(1))
        XCTAssertEqual(a.texts, ["done sleep 100", "done second"])
        XCTAssertEqual(host.waitingHooks, 0)
        XCTAssertEqual(host.errorCount, 0)
    }

    func testManyRandomSleepsKeepEveryMessageInOrder() throws {
        let loop = EmbeddedEventLoop()
        let host = try host(["p": Self.sleepy], loop: loop)
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        var expected: [String] = []
        var generator = SystemRandomNumberGenerator()
        for i in 0..<1000 {
            let message = i % 10 == 0 ? "sleep \(Int.random(in: 0...20, using: &generator)) #\(i)" : "#\(i)"
            expected.append("done " + message)
            host.message(id: 1, data: text(message), binary: false)
            if i % 7 == 0 { loop.advanceTime(by: .milliseconds(3)) }
        }
        loop.advanceTime(by: .seconds(10))
        XCTAssertEqual(conn.texts, expected)
    }

    func testTheChainGoesOnAfterTheWaitAndTrueStillStopsIt() throws {
        let loop = EmbeddedEventLoop()
        let host = try host([
            "a": "return { on_message = function(conn, msg) luaws.sleep(1) conn:send('a') return msg == 'stop' end }",
            "b": "return { on_message = function(conn, msg) conn:send('b') end }",
        ], loop: loop)
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        host.message(id: 1, data: text("go"), binary: false)
        host.message(id: 1, data: text("stop"), binary: false)
        loop.advanceTime(by: .seconds(5))
        XCTAssertEqual(conn.texts, ["a", "b", "a"])
    }

    func testCloseWhileWaitingRunsOnCloseAfterTheHookOnce() throws {
        let loop = EmbeddedEventLoop()
        let log = CapturedLog()
        let host = try host(["p": """
            return {
              on_message = function(conn, msg) luaws.sleep(1) luaws.log("info", "send after close:", conn:send("late")) end,
              on_close = function(conn, code) luaws.log("info", "on_close", code) end,
            }
            """], log: log, loop: loop)
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        host.message(id: 1, data: text("x"), binary: false)
        _ = conn.close(code: 1001, reason: "")   // the engine's side: sends now fail
        host.closed(id: 1, code: 1001, reason: "gone")
        XCTAssertEqual(host.connectionCount, 1)  // on_close waits for the hook
        loop.advanceTime(by: .seconds(1))
        XCTAssertEqual(log.lines, ["info: [p] send after close: false", "info: [p] on_close 1001"])
        XCTAssertEqual(host.connectionCount, 0)
    }

    func testAHookThatWaitsTooLongIsCancelledAndTheQueueMovesOn() throws {
        let loop = EmbeddedEventLoop()
        let log = CapturedLog()
        var limits = ScriptLimits()
        limits.hookTimeout = 2
        let host = try host(["p": Self.sleepy], log: log, limits: limits, loop: loop)
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        host.message(id: 1, data: text("sleep 60000"), binary: false)
        host.message(id: 1, data: text("next"), binary: false)
        loop.advanceTime(by: .seconds(2))
        XCTAssertEqual(conn.texts, ["done next"])
        XCTAssertTrue(log.text.contains("p.lua on_message: waited longer than 2.0 s (--hook-timeout); cancelled"), log.text)
        XCTAssertEqual(host.errorCount, 1)
        loop.advanceTime(by: .seconds(60))  // the sleep's own end finds nothing to resume
        XCTAssertEqual(conn.texts, ["done next"])
    }

    func testEachResumeHasItsOwnBudget() throws {
        let loop = EmbeddedEventLoop()
        let host = try host(["p": """
            return { on_message = function(conn)
              for i = 1, 60000 do end
              luaws.sleep(0)
              for i = 1, 60000 do end
              conn:send("both halves ran")
            end }
            """], limits: ScriptLimits(instructionBudget: 100_000, memoryLimit: 0), loop: loop)
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        host.message(id: 1, data: text("x"), binary: false)
        loop.run()
        XCTAssertEqual(conn.texts, ["both halves ran"])
        XCTAssertEqual(host.errorCount, 0)
    }

    func testWaitingWhereNoHookRunsIsAnErrorAtTheLine() throws {
        let loop = EmbeddedEventLoop()
        XCTAssertThrowsError(try host(["p": "luaws.sleep(1)\nreturn {}"], loop: loop)) { error in
            XCTAssertTrue("\(error)".contains("p.lua:1: waiting calls (luaws.sleep, luaws.http, luaws.redis) are only available in hooks"), "\(error)")
        }
        let log = CapturedLog()
        let host = try host(["p": """
            return { on_message = function(conn)
              local co = coroutine.wrap(function() luaws.sleep(1) end)
              co()
            end }
            """], log: log, loop: loop)
        host.open(RecordingConnection(), id: 1, request: request)
        host.message(id: 1, data: text("x"), binary: false)
        XCTAssertTrue(log.text.contains("p.lua:3: p.lua:2: waiting calls cannot be made inside a coroutine the script created"), log.text)
        host.message(id: 1, data: text("x"), binary: false)
        XCTAssertEqual(host.errorCount, 2)
    }

    func testTooManyWaitingMessagesStopReadingUntilTheyDrain() throws {
        let loop = EmbeddedEventLoop()
        var limits = ScriptLimits()
        limits.maxPendingMessages = 4
        let host = try host(["p": Self.sleepy], limits: limits, loop: loop)
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        host.message(id: 1, data: text("sleep 10"), binary: false)
        for i in 0..<10 { host.message(id: 1, data: text("m\(i)"), binary: false) }
        XCTAssertEqual(conn.readingChanges, [false])
        loop.advanceTime(by: .milliseconds(10))
        XCTAssertEqual(conn.readingChanges, [false, true])
        XCTAssertEqual(conn.texts.count, 11)
    }

    func testTimersThatFireWhileAHookWaitsAreNotPiledUp() throws {
        let loop = EmbeddedEventLoop()
        let host = try host(["p": """
            return { on_open = function(conn)
              conn:every(0.1, function(c) c:send("tick") end)
            end, on_message = function(conn, msg) luaws.sleep(1) conn:send("slept") end }
            """], loop: loop)
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        host.message(id: 1, data: text("x"), binary: false)
        loop.advanceTime(by: .milliseconds(1050))
        // ten firings during the wait: one queued tick (and the one due as the wait ends)
        XCTAssertEqual(conn.texts.first, "slept")
        XCTAssertLessThanOrEqual(conn.texts.filter { $0 == "tick" }.count, 2)
    }

    func testTimerCallbacksCanWaitToo() throws {
        let loop = EmbeddedEventLoop()
        let host = try host(["p": """
            return { on_open = function(conn)
              conn:after(1, function(c) c:send("before") luaws.sleep(1) c:send("after") end)
            end, on_message = function(conn, msg) conn:send(msg) end }
            """], loop: loop)
        let conn = RecordingConnection()
        host.open(conn, id: 1, request: request)
        loop.advanceTime(by: .milliseconds(1500))
        host.message(id: 1, data: text("queued behind the timer"), binary: false)
        loop.advanceTime(by: .seconds(1))
        XCTAssertEqual(conn.texts, ["before", "after", "queued behind the timer"])
    }
}
