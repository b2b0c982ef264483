import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import RedisClient
import XCTest

final class RedisSubscriberTests: XCTestCase {
    private var group: MultiThreadedEventLoopGroup!
    private var server: RedisServerProcess?

    override func setUp() {
        group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    }

    override func tearDown() {
        server?.stop()
        server = nil
        try? group.syncShutdownGracefully()
    }

    func testMessagesFailFastWhileDownAndResubscribeAfterRestart() throws {
        server = try RedisServerProcess()
        let url = try RedisURL(server!.url)
        var fast = RedisConfiguration()
        fast.reconnectBackoff = RedisBackoff(initial: .milliseconds(50), maximum: .milliseconds(400))
        let inbox = Inbox()
        let resubscribed = NIOLockedValueBox<[[String]]>([])
        let subscriber = RedisSubscriber(url: url, eventLoop: group.next(), configuration: fast) { channel, payload in
            inbox.append(channel, payload)
        }
        subscriber.onResubscribed { channels in resubscribed.withLockedValue { $0.append(channels) } }
        let redis = RedisConnection(url: url, eventLoop: group.next(), configuration: fast)
        defer {
            _ = try? redis.close().wait(seconds: 2)
            _ = try? subscriber.close().wait(seconds: 2)
        }
        try subscriber.whenConnected().wait(seconds: 3, "subscriber connect")
        try redis.whenConnected().wait(seconds: 3, "connect")

        try subscriber.subscribe("news").wait(seconds: 2, "SUBSCRIBE news")
        try subscriber.subscribe("other").wait(seconds: 2, "SUBSCRIBE other")
        XCTAssertEqual(try redis.send("PUBLISH", "news", "hello").wait(seconds: 2), .integer(1))
        XCTAssertEqual(try redis.send([bytes("PUBLISH"), bytes("other"), [0, 255, 10]]).wait(seconds: 2), .integer(1))
        waitUntil(2, "first messages") { inbox.messages.count == 2 }
        XCTAssertTrue(inbox.contains("news", "hello"))
        XCTAssertEqual(inbox.messages.last?.1, [0, 255, 10])

        // Unsubscribed channels no longer deliver.
        try subscriber.unsubscribe("other").wait(seconds: 2, "UNSUBSCRIBE")
        XCTAssertEqual(try redis.send("PUBLISH", "other", "dropped").wait(seconds: 2), .integer(0))

        // Redis dies.
        server!.crash()
        waitUntil(3, "both disconnected") {
            if case .disconnected = redis.state, case .disconnected = subscriber.state { return true }
            return false
        }

        // Commands fail fast while it is down, however often they are tried.
        var slowest = 0.0
        for _ in 0..<50 {
            let started = Date()
            do {
                _ = try redis.send("GET", "k").wait(seconds: 1)
                XCTFail("a command succeeded with Redis down")
            } catch let error as RedisError {
                guard case .unavailable = error else { return XCTFail("\(error)") }
            }
            slowest = max(slowest, Date().timeIntervalSince(started))
            usleep(2_000)
        }
        print("fail-fast while Redis is down: slowest of 50 commands \(String(format: "%.3f", slowest * 1000)) ms")
        XCTAssertLessThan(slowest, 0.050)
        // A subscription made while down fails at once but stands.
        let started = Date()
        XCTAssertThrowsError(try subscriber.subscribe("later").wait(seconds: 1))
        XCTAssertLessThan(Date().timeIntervalSince(started), 0.050)

        // Redis comes back on the same port: both reconnect, the subscriber subscribes again.
        try server!.start()
        try redis.whenConnected().wait(seconds: 5, "reconnect")
        try subscriber.whenConnected().wait(seconds: 5, "subscriber reconnect")
        waitUntil(2, "resubscribed") { !resubscribed.withLockedValue { $0 }.isEmpty }
        XCTAssertEqual(resubscribed.withLockedValue { $0 }.first, ["later", "news"])
        XCTAssertEqual(try subscriber.subscriptions().wait(seconds: 2), ["later", "news"])

        XCTAssertEqual(try redis.send("SET", "k", "back").wait(seconds: 2), .status("OK"))
        XCTAssertEqual(try redis.send("GET", "k").wait(seconds: 2), .string(bytes("back")))
        XCTAssertEqual(try redis.send("PUBLISH", "news", "again").wait(seconds: 2), .integer(1))
        XCTAssertEqual(try redis.send("PUBLISH", "later", "now").wait(seconds: 2), .integer(1))
        XCTAssertEqual(try redis.send("PUBLISH", "other", "still dropped").wait(seconds: 2), .integer(0))
        waitUntil(2, "messages after restart") { inbox.contains("news", "again") && inbox.contains("later", "now") }
    }

    func testSubscribeErrorsAndClose() throws {
        server = try RedisServerProcess()
        let url = try RedisURL(server!.url)
        var small = RedisConfiguration()
        small.maxSubscriptions = 2
        let subscriber = RedisSubscriber(url: url, eventLoop: group.next(), configuration: small) { _, _ in }
        try subscriber.whenConnected().wait(seconds: 3)
        try subscriber.subscribe("a").wait(seconds: 2)
        try subscriber.subscribe("b").wait(seconds: 2)
        try subscriber.subscribe("a").wait(seconds: 2)  // again: no new slot
        XCTAssertThrowsError(try subscriber.subscribe("c").wait(seconds: 2)) { error in
            XCTAssertEqual(error as? RedisError, .invalidCommand("more than 2 subscriptions"))
        }
        try subscriber.close().wait(seconds: 2)
        XCTAssertEqual(subscriber.state, .closed)
        XCTAssertThrowsError(try subscriber.subscribe("d").wait(seconds: 2)) { error in
            XCTAssertEqual(error as? RedisError, .closed)
        }
    }
}
