import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import RedisClient
import XCTest

final class RedisConnectionTests: XCTestCase {
    private var group: MultiThreadedEventLoopGroup!
    private var server: RedisServerProcess?
    private var connections: [RedisConnection] = []

    override func setUp() {
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    }

    override func tearDown() {
        for c in connections { _ = try? c.close().wait(seconds: 2) }
        connections = []
        server?.stop()
        server = nil
        try? group.syncShutdownGracefully()
    }

    private func connect(_ url: String, _ configure: (inout RedisConfiguration) -> Void = { _ in }) throws -> RedisConnection {
        var configuration = RedisConfiguration()
        configure(&configuration)
        let c = RedisConnection(url: try RedisURL(url), eventLoop: group.next(), configuration: configuration)
        connections.append(c)
        return c
    }

    private func connected(_ url: String, _ configure: (inout RedisConfiguration) -> Void = { _ in }) throws -> RedisConnection {
        let c = try connect(url, configure)
        try c.whenConnected().wait(seconds: 3, "connect")
        return c
    }

    private func failure(_ future: EventLoopFuture<RedisReply>) -> RedisError? {
        do {
            _ = try future.wait(seconds: 3)
            return nil
        } catch let error as RedisError {
            return error
        } catch {
            XCTFail("unexpected \(error)")
            return nil
        }
    }

    func testRepliesOfEveryType() throws {
        server = try RedisServerProcess()
        let redis = try connected(server!.url)
        XCTAssertEqual(redis.state, .connected)

        XCTAssertEqual(try redis.send("SET", "k", "v").wait(seconds: 2), .status("OK"))
        XCTAssertEqual(try redis.send("GET", "k").wait(seconds: 2), .string(bytes("v")))
        XCTAssertEqual(try redis.send("INCR", "n").wait(seconds: 2), .integer(1))
        XCTAssertEqual(try redis.send("INCRBY", "n", "-5").wait(seconds: 2), .integer(-4))
        XCTAssertEqual(try redis.send("GET", "missing").wait(seconds: 2), .null)
        XCTAssertEqual(try redis.send("MGET", "k", "missing", "n").wait(seconds: 2),
                       .array([.string(bytes("v")), .null, .string(bytes("-4"))]))
        XCTAssertEqual(try redis.send("LRANGE", "nolist", "0", "-1").wait(seconds: 2), .array([]))
        XCTAssertEqual(try redis.send("PING").wait(seconds: 2), .status("PONG"))

        // Error replies are replies, with their code.
        guard case .error(let message) = try redis.send("INCR", "k").wait(seconds: 2) else { return XCTFail("no error reply") }
        XCTAssertTrue(message.hasPrefix("ERR "), message)
        guard case .error(let unknown) = try redis.send("NOSUCHCOMMAND").wait(seconds: 2) else { return XCTFail("no error reply") }
        XCTAssertTrue(unknown.hasPrefix("ERR unknown command"), unknown)
        guard case .error(let wrongType) = try redis.send("LPUSH", "k", "x").wait(seconds: 2) else { return XCTFail("no error reply") }
        XCTAssertTrue(wrongType.hasPrefix("WRONGTYPE"), wrongType)

        // Binary-safe both ways: NUL, CR LF, bytes that are not UTF-8, and an empty value.
        let binary: [UInt8] = [0, 13, 10, 255, 254, 36, 42, 0]
        XCTAssertEqual(try redis.send([bytes("SET"), bytes("bin"), binary]).wait(seconds: 2), .status("OK"))
        XCTAssertEqual(try redis.send([bytes("GET"), bytes("bin")]).wait(seconds: 2), .string(binary))
        XCTAssertEqual(try redis.send([bytes("SET"), bytes("empty"), []]).wait(seconds: 2), .status("OK"))
        XCTAssertEqual(try redis.send("GET", "empty").wait(seconds: 2), .string([]))

        // Nested arrays (each level goes through the bounded reader's object functions).
        XCTAssertEqual(try redis.send("EVAL", "return {1, {2, {'x', {}}}, 'y'}", "0").wait(seconds: 2),
                       .array([.integer(1), .array([.integer(2), .array([.string(bytes("x")), .array([])])]), .string(bytes("y"))]))

        XCTAssertEqual(failure(redis.send([[UInt8]]())), .invalidCommand("empty command"))
    }

    func testTenThousandPipelinedCommandsCompleteInOrder() throws {
        server = try RedisServerProcess()
        let redis = try connected(server!.url)
        let loop = redis.eventLoop
        // Sent from the loop in one tick: all 10,000 are in flight together (the default bound).
        let started = Date()
        let futures = try loop.submit { (0..<10_000).map { _ in redis.send("INCR", "counter") } }.wait(seconds: 2)
        let replies = try EventLoopFuture.whenAllSucceed(futures, on: loop).wait(seconds: 10, "10,000 INCRs")
        print("10,000 pipelined INCRs: \(Int(Date().timeIntervalSince(started) * 1000)) ms")
        XCTAssertEqual(replies, (1...10_000).map { .integer(Int64($0)) })
    }

    func testInFlightBoundFailsAtOnce() throws {
        server = try RedisServerProcess()
        let redis = try connected(server!.url) { $0.maxInFlight = 10 }
        let futures = try redis.eventLoop.submit { (0..<11).map { _ in redis.send("PING") } }.wait(seconds: 2)
        XCTAssertEqual(failure(futures[10]), .tooManyInFlight(limit: 10))
        for f in futures[..<10] { XCTAssertEqual(try f.wait(seconds: 2), .status("PONG")) }
        // Once replies are in, there is room again.
        XCTAssertEqual(try redis.send("PING").wait(seconds: 2), .status("PONG"))
    }

    func testAuthWithPasswordAndACLUser() throws {
        server = try RedisServerProcess(password: "pa ss:w@rd")
        let port = server!.port
        let redis = try connected("redis://:pa%20ss%3Aw%40rd@127.0.0.1:\(port)")
        XCTAssertEqual(try redis.send("SET", "a", "1").wait(seconds: 2), .status("OK"))
        // Redis 6 ACL form, with the default user.
        let acl = try connected("redis://default:pa%20ss%3Aw%40rd@127.0.0.1:\(port)")
        XCTAssertEqual(try acl.send("GET", "a").wait(seconds: 2), .string(bytes("1")))
    }

    func testWrongPasswordKeepsTheConnectionDownWithTheReason() throws {
        server = try RedisServerProcess(password: "right")
        let redis = try connect("redis://:wrong@127.0.0.1:\(server!.port)")
        waitUntil(3, "disconnected") { if case .disconnected = redis.state { return true } else { return false } }
        guard case .unavailable(let why)? = failure(redis.send("GET", "a")) else { return XCTFail("not unavailable") }
        XCTAssertTrue(why?.contains("AUTH failed: WRONGPASS") == true, why ?? "nil")
        XCTAssertFalse(why?.contains("wrong") == true, "the password leaked into the error")

        // No password at all: commands get NOAUTH error replies (the connection itself is up).
        let anonymous = try connected("redis://127.0.0.1:\(server!.port)")
        guard case .error(let noauth) = try anonymous.send("GET", "a").wait(seconds: 2) else { return XCTFail("no error") }
        XCTAssertTrue(noauth.hasPrefix("NOAUTH"), noauth)
    }

    func testSelectDatabase() throws {
        server = try RedisServerProcess()
        let db3 = try connected("redis://127.0.0.1:\(server!.port)/3")
        let db0 = try connected("redis://127.0.0.1:\(server!.port)")
        XCTAssertEqual(try db3.send("SET", "where", "three").wait(seconds: 2), .status("OK"))
        XCTAssertEqual(try db0.send("GET", "where").wait(seconds: 2), .null)
        XCTAssertEqual(try db3.send("GET", "where").wait(seconds: 2), .string(bytes("three")))
        // An out-of-range db fails the handshake, with the reason.
        let db99 = try connect("redis://127.0.0.1:\(server!.port)/99")
        waitUntil(3, "disconnected") { if case .disconnected = db99.state { return true } else { return false } }
        guard case .unavailable(let why)? = failure(db99.send("PING")) else { return XCTFail("not unavailable") }
        XCTAssertTrue(why?.contains("SELECT 99 failed") == true, why ?? "nil")
    }

    func testReplyBounds() throws {
        server = try RedisServerProcess()
        let redis = try connected(server!.url) {
            $0.maxReplyBytes = 4096
            $0.maxArrayElements = 100
        }
        XCTAssertEqual(try redis.send("SET", "big", String(repeating: "x", count: 10_000)).wait(seconds: 2), .status("OK"))
        XCTAssertEqual(try redis.send("SET", "small", "ok").wait(seconds: 2), .status("OK"))
        XCTAssertEqual(try redis.send(["RPUSH", "long"] + (0..<150).map(String.init)).wait(seconds: 2), .integer(150))

        // A bulk string past the bound: refused, the connection resets and comes back.
        XCTAssertEqual(failure(redis.send("GET", "big")), .replyTooLarge(limit: 4096))
        try redis.whenConnected().wait(seconds: 3, "reconnect")
        XCTAssertEqual(try redis.send("GET", "small").wait(seconds: 2), .string(bytes("ok")))

        // An array longer than the element bound, at the top and nested.
        XCTAssertEqual(failure(redis.send("LRANGE", "long", "0", "-1")), .replyTooLarge(limit: 4096))
        try redis.whenConnected().wait(seconds: 3, "reconnect")
        XCTAssertEqual(try redis.send("LRANGE", "long", "0", "99").wait(seconds: 2).arrayCount, 100)
        XCTAssertEqual(failure(redis.send("EVAL", "return {1, redis.call('LRANGE', 'long', 0, -1)}", "0")), .replyTooLarge(limit: 4096))
        try redis.whenConnected().wait(seconds: 3, "reconnect")

        // Many small elements adding up past the byte bound (16 bytes charged per element).
        XCTAssertEqual(failure(redis.send("EVAL", "local t = {} for i = 1, 90 do t[i] = {i, i, i} end return t", "0")),
                       .replyTooLarge(limit: 4096))
        try redis.whenConnected().wait(seconds: 3, "reconnect")
        XCTAssertEqual(try redis.send("PING").wait(seconds: 2), .status("PONG"))

        // Nesting: hiredis 0.14 reads 7 levels and refuses deeper replies.
        XCTAssertEqual(try redis.send("EVAL", "return {{{{{{{1}}}}}}}", "0").wait(seconds: 2),
                       .array([.array([.array([.array([.array([.array([.array([.integer(1)])])])])])])]))
        guard case .protocolError? = failure(redis.send("EVAL", "return {{{{{{{{{1}}}}}}}}}", "0")) else {
            return XCTFail("deep reply accepted")
        }
        try redis.whenConnected().wait(seconds: 3, "reconnect")
        XCTAssertEqual(try redis.send("PING").wait(seconds: 2), .status("PONG"))
    }

    func testSharedConnectionRefusesCommandsThatWouldBreakIt() throws {
        let redis = try connect("redis://127.0.0.1:1")
        for command in [["SUBSCRIBE", "x"], ["select", "1"], ["MULTI"], ["BLPOP", "l", "0"], ["XREAD", "block", "0", "STREAMS", "s", "$"]] {
            guard case .invalidCommand? = failure(redis.send(command)) else { return XCTFail("\(command) not refused") }
        }
    }

    func testCloseFailsPendingCommandsAndStopsReconnecting() throws {
        server = try RedisServerProcess()
        let redis = try connected(server!.url)
        let futures = try redis.eventLoop.submit { () -> [EventLoopFuture<RedisReply>] in
            let sent = (0..<100).map { _ in redis.send("PING") }
            _ = redis.close()
            return sent
        }.wait(seconds: 2)
        for f in futures { XCTAssertEqual(failure(f), .closed) }
        XCTAssertEqual(redis.state, .closed)
        XCTAssertEqual(failure(redis.send("PING")), .closed)
        let expectClosed = redis.whenConnected()
        XCTAssertThrowsError(try expectClosed.wait(seconds: 1))
    }

    func testNeverConnectedFailsFastWithTheReason() throws {
        // A port nobody listens on (a server started and stopped).
        let gone = try RedisServerProcess()
        gone.stop()
        let redis = try connect("redis://127.0.0.1:\(gone.port)")
        waitUntil(3, "disconnected") { if case .disconnected = redis.state { return true } else { return false } }
        guard case .unavailable(let why)? = failure(redis.send("PING")) else { return XCTFail("not unavailable") }
        XCTAssertTrue(why?.lowercased().contains("refused") == true, why ?? "nil")
    }

    func testCommandTimeoutResetsAStuckConnection() throws {
        server = try RedisServerProcess()
        let redis = try connected(server!.url) { $0.commandTimeout = .milliseconds(200) }
        XCTAssertEqual(try redis.send("PING").wait(seconds: 2), .status("PONG"))
        server!.pause()
        let started = Date()
        XCTAssertEqual(failure(redis.send("PING")), .timeout)
        let waited = Date().timeIntervalSince(started)
        XCTAssertGreaterThanOrEqual(waited, 0.19)
        XCTAssertLessThan(waited, 1.5)
        server!.resume()
        try redis.whenConnected().wait(seconds: 3, "reconnect")
        XCTAssertEqual(try redis.send("PING").wait(seconds: 2), .status("PONG"))
    }

    func testStateChangesAreReported() throws {
        server = try RedisServerProcess()
        let seen = NIOLockedValueBox<[String]>([])
        let redis = try connect(server!.url)
        redis.onStateChange { state in
            seen.withLockedValue { $0.append(state == .connected ? "connected" : state == .closed ? "closed" : "disconnected") }
        }
        try redis.whenConnected().wait(seconds: 3)
        server!.crash()
        waitUntil(3, "disconnected") { seen.withLockedValue { $0.contains("disconnected") } }
        try server!.start()
        try redis.whenConnected().wait(seconds: 5, "reconnect")
        try redis.close().wait(seconds: 2)
        // Registered possibly after the first connect: the tail is what matters.
        XCTAssertEqual(seen.withLockedValue { Array($0.suffix(3)) }, ["disconnected", "connected", "closed"])
    }
}

extension RedisReply {
    var arrayCount: Int? {
        if case .array(let items) = self { return items.count }
        return nil
    }
}
