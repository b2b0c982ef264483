import NIOConcurrencyHelpers
import NIOCore
import NIOEmbedded
import WSEngineTesting
import XCTest

@testable import WSEngine

/// The Server-Sent Events hub and its route: every bound holds (history, each subscriber's
/// queue, subscribers, event size), a slow subscriber skips with a marker, and the route
/// streams, keeps alive, respects writability and ends with the stream.
final class HTTPEventStreamTests: XCTestCase {
    // MARK: the format

    func testEncodingSplitsLinesAndKeepsTypesOnOneLine() {
        XCTAssertEqual(ServerSentEvent(data: "hello").encodedFields(), "data: hello\n\n")
        XCTAssertEqual(ServerSentEvent(data: "a\nb\r\nc\rd").encodedFields(), "data: a\ndata: b\ndata: c\ndata: d\n\n")
        XCTAssertEqual(ServerSentEvent(data: "").encodedFields(), "data: \n\n")
        XCTAssertEqual(ServerSentEvent(type: "re\nload", data: "x").encodedFields(), "event: reload\ndata: x\n\n")
    }

    // MARK: the hub

    /// Everything queued for `key`, as text.
    private func drain(_ stream: HTTPEventStream, _ key: Int) -> String {
        var text = ""
        while true {
            let (buffers, closed) = stream.take(key, upTo: 1 << 20)
            XCTAssertFalse(closed)
            if buffers.isEmpty { return text }
            for buffer in buffers { text += String(buffer: buffer) }
        }
    }

    /// The N of the `id: EPOCH-N` lines.
    private func ids(_ text: String) -> [Int] {
        text.split(separator: "\n").compactMap { $0.hasPrefix("id: ") ? $0.split(separator: "-").last.flatMap { Int($0) } : nil }
    }

    /// The id of the last event in `text`, as the client would send it back.
    private func lastID(_ text: String) -> String {
        String(text.split(separator: "\n").last { $0.hasPrefix("id: ") }!.dropFirst(4))
    }

    private func loop() -> EmbeddedEventLoop { EmbeddedEventLoop() }

    /// A stream without history, whose subscribers may have `maxQueuedBytes` queued, and one
    /// subscriber of it.
    private func queueOnlyStream(maxQueuedBytes: Int) throws -> (HTTPEventStream, Int, HTTPEventStream.Limits) {
        var limits = HTTPEventStream.Limits()
        limits.history = 0
        limits.historyBytes = 0
        limits.maxQueuedBytes = maxQueuedBytes
        let stream = HTTPEventStream(limits: limits)
        return (stream, try XCTUnwrap(stream.subscribe(lastEventID: nil, on: loop())), limits)
    }

    func testHistoryKeepsTheLastEventsUpToItsCountAndBytes() throws {
        var limits = HTTPEventStream.Limits()
        limits.history = 200
        let stream = HTTPEventStream(limits: limits)
        for i in 1...300 { stream.publish(ServerSentEvent(data: "event \(i)")) }
        let key = try XCTUnwrap(stream.subscribe(lastEventID: nil, on: loop()))
        XCTAssertEqual(ids(drain(stream, key)), Array(101...300))

        // By bytes: events of about 1 KiB, 8 KiB of history.
        limits.historyBytes = 8 << 10
        let small = HTTPEventStream(limits: limits)
        for _ in 1...50 { small.publish(ServerSentEvent(data: String(repeating: "x", count: 990))) }
        let other = try XCTUnwrap(small.subscribe(lastEventID: nil, on: loop()))
        let replayed = ids(drain(small, other))
        XCTAssertEqual(replayed.last, 50)
        XCTAssertEqual(replayed.count, 8)  // 1,006 to 1,014 bytes each (the id's length varies): 8 fit in 8,192
    }

    func testLastEventIDReplaysOnlyWhatWasMissed() throws {
        let stream = HTTPEventStream()
        for i in 1...7 { stream.publish(ServerSentEvent(data: "\(i)")) }
        let first = try XCTUnwrap(stream.subscribe(lastEventID: nil, on: loop()))
        let seen = lastID(drain(stream, first))
        for i in 8...10 { stream.publish(ServerSentEvent(data: "\(i)")) }
        let key = try XCTUnwrap(stream.subscribe(lastEventID: seen, on: loop()))
        XCTAssertEqual(ids(drain(stream, key)), [8, 9, 10])
        // An id of another stream (the client saw the process before a restart), or one this
        // stream did not give yet, or garbage: everything.
        for other in ["1234-3", seen.split(separator: "-")[0] + "-999", "7", "x-y-z", ""] {
            let fresh = try XCTUnwrap(stream.subscribe(lastEventID: other, on: loop()))
            XCTAssertEqual(ids(drain(stream, fresh)), Array(1...10), other)
        }
    }

    func testLastEventIDOlderThanTheHistorySaysHowManyWereLost() throws {
        var limits = HTTPEventStream.Limits()
        limits.history = 5
        let stream = HTTPEventStream(limits: limits)
        stream.publish(ServerSentEvent(data: "1"))
        let first = try XCTUnwrap(stream.subscribe(lastEventID: nil, on: loop()))
        let epoch = lastID(drain(stream, first)).split(separator: "-")[0]
        for i in 2...20 { stream.publish(ServerSentEvent(data: "\(i)")) }
        let key = try XCTUnwrap(stream.subscribe(lastEventID: "\(epoch)-3", on: loop()))
        let text = drain(stream, key)
        XCTAssertTrue(text.hasPrefix("event: skipped\ndata: 12\n\n"), text)  // 4...15 are gone
        XCTAssertEqual(ids(text), Array(16...20))
    }

    func testASubscriberThatDoesNotReadIsBoundedAndSkipsWithAMarker() throws {
        let (stream, key, limits) = try queueOnlyStream(maxQueuedBytes: 10_000)
        let payload = String(repeating: "y", count: 90)
        for _ in 1...1_000 {
            stream.publish(ServerSentEvent(data: payload))
            XCTAssertLessThanOrEqual(stream.queuedBytes(key), limits.maxQueuedBytes + HTTPEventStream.Item.skipCost)
        }
        // What fitted, in order, then one marker for the rest, where they would have been.
        let text = drain(stream, key)
        let received = ids(text)
        XCTAssertGreaterThan(received.count, 80)
        XCTAssertEqual(received, Array(1...received.count))
        XCTAssertTrue(text.hasSuffix("event: skipped\ndata: \(1_000 - received.count)\n\n"), String(text.suffix(80)))

        // Once it reads, events flow again.
        stream.publish(ServerSentEvent(data: "again"))
        XCTAssertEqual(ids(drain(stream, key)), [1001])
    }

    func testSkippingLastsUntilHalfTheQueueIsRead() throws {
        let (stream, key, _) = try queueOnlyStream(maxQueuedBytes: 1_000)
        // Fill the queue until an event does not fit: the marker goes in, skipping starts.
        let payload = String(repeating: "z", count: 80)
        while true {
            let before = stream.queuedBytes(key)
            stream.publish(ServerSentEvent(data: payload))
            if stream.queuedBytes(key) == before + HTTPEventStream.Item.skipCost { break }
        }
        // Reading a little (still over half) does not end the skipping, even for a small event.
        _ = stream.take(key, upTo: 1)
        XCTAssertGreaterThan(stream.queuedBytes(key), 500)
        let before = stream.queuedBytes(key)
        stream.publish(ServerSentEvent(data: "small"))
        XCTAssertEqual(stream.queuedBytes(key), before)  // counted on the marker
        // Reading below half does.
        while stream.queuedBytes(key) > 500 { _ = stream.take(key, upTo: 1) }
        stream.publish(ServerSentEvent(data: "after"))
        let text = drain(stream, key)
        XCTAssertTrue(text.contains("event: skipped\ndata: 2\n\n"), text)
        XCTAssertTrue(text.hasSuffix("data: after\n\n"), text)
        XCTAssertFalse(text.contains("small"))
    }

    func testSubscribersAreBoundedAndComeBackWhenOneLeaves() throws {
        var limits = HTTPEventStream.Limits()
        limits.maxSubscribers = 16
        let stream = HTTPEventStream(limits: limits)
        let keys = (0..<16).compactMap { _ in stream.subscribe(lastEventID: nil, on: loop()) }
        XCTAssertEqual(keys.count, 16)
        XCTAssertNil(stream.subscribe(lastEventID: nil, on: loop()))
        stream.unsubscribe(keys[3])
        XCTAssertNotNil(stream.subscribe(lastEventID: nil, on: loop()))
        XCTAssertEqual(stream.subscriberCount, 16)
    }

    func testAnOversizedEventIsNotPublished() throws {
        var limits = HTTPEventStream.Limits()
        limits.maxEventBytes = 100
        let stream = HTTPEventStream(limits: limits)
        XCTAssertFalse(stream.publish(ServerSentEvent(data: String(repeating: "x", count: 200))))
        XCTAssertTrue(stream.publish(ServerSentEvent(data: "fits")))
        XCTAssertEqual(stream.oversizedCount, 1)
        let key = try XCTUnwrap(stream.subscribe(lastEventID: nil, on: loop()))
        let text = drain(stream, key)
        XCTAssertTrue(text.hasPrefix("id: ") && text.hasSuffix("-1\ndata: fits\n\n"), text)
    }

    func testASubscriberIsWokenOnceForWhatComesAfterItTookEverything() throws {
        let loop = EmbeddedEventLoop()
        let stream = HTTPEventStream()
        stream.publish(ServerSentEvent(data: "before"))
        let key = try XCTUnwrap(stream.subscribe(lastEventID: nil, on: loop))
        let wakes = NIOLockedValueBox(0)
        stream.attach(key) { wakes.withLockedValue { $0 += 1 } }
        stream.publish(ServerSentEvent(data: "queued behind the history"))
        loop.run()
        XCTAssertEqual(wakes.withLockedValue { $0 }, 0)  // it takes what is queued right after attaching
        XCTAssertEqual(ids(drain(stream, key)), [1, 2])
        for _ in 1...5 { stream.publish(ServerSentEvent(data: "burst")) }
        loop.run()
        XCTAssertEqual(wakes.withLockedValue { $0 }, 1)  // one wake for the burst
        XCTAssertEqual(ids(drain(stream, key)), [3, 4, 5, 6, 7])
        try loop.syncShutdownGracefully()
    }

    func testCloseEndsSubscriptionsAndRefusesNewOnes() throws {
        let loop = EmbeddedEventLoop()
        let stream = HTTPEventStream()
        let key = try XCTUnwrap(stream.subscribe(lastEventID: nil, on: loop))
        let woken = NIOLockedValueBox(false)
        stream.attach(key) { woken.withLockedValue { $0 = true } }
        stream.close()
        loop.run()
        XCTAssertTrue(woken.withLockedValue { $0 })
        XCTAssertTrue(stream.take(key, upTo: 100).closed)
        XCTAssertNil(stream.subscribe(lastEventID: nil, on: loop))
        try loop.syncShutdownGracefully()
    }

    // MARK: the route, on the real pipeline

    private func serve(_ stream: HTTPEventStream) throws -> EmbeddedServer {
        var configuration = ServerConfiguration()
        configuration.eventStreams["/events"] = stream
        return try EmbeddedServer(configuration: configuration, application: EngineGuaranteesTests.Echo())
    }

    private static let request = Array("GET /events HTTP/1.1\r\nHost: test\r\n\r\n".utf8)

    private func text(_ server: EmbeddedServer) -> String { String(decoding: server.written(), as: UTF8.self) }

    func testTheRouteSendsTheHistoryThenLiveEvents() throws {
        let stream = HTTPEventStream()
        stream.publish(ServerSentEvent(data: "old"))
        let server = try serve(stream)
        defer { server.finish() }
        try server.feed(Self.request)
        let head = text(server)
        XCTAssertTrue(head.hasPrefix("HTTP/1.1 200 OK\r\n"), head)
        XCTAssertTrue(head.lowercased().contains("content-type: text/event-stream"), head)
        XCTAssertTrue(head.lowercased().contains("cache-control: no-store"), head)
        XCTAssertTrue(head.contains("retry: 2000\n"), head)
        XCTAssertTrue(head.contains("-1\ndata: old\n\n"), head)
        XCTAssertEqual(stream.subscriberCount, 1)

        stream.publish(ServerSentEvent(data: "new"))
        server.loop.run()  // the wake
        XCTAssertTrue(text(server).contains("-2\ndata: new\n\n"))

        // The client goes: so does its subscription.
        server.channel.pipeline.fireChannelInactive()
        XCTAssertEqual(stream.subscriberCount, 0)
    }

    func testTheRouteKeepsAliveAndClosesAStalledClient() throws {
        var limits = HTTPEventStream.Limits()
        limits.keepAlive = .seconds(15)
        limits.stallTimeout = .seconds(60)
        let stream = HTTPEventStream(limits: limits)
        let server = try serve(stream)
        defer { server.finish() }
        try server.feed(Self.request)
        _ = server.written()
        server.advanceTime(by: .seconds(15))
        XCTAssertTrue(text(server).contains(":\n\n"))

        // Not writable (the client reads nothing): nothing is written, events wait in its queue …
        server.channel.isWritable = false
        server.channel.pipeline.fireChannelWritabilityChanged()
        stream.publish(ServerSentEvent(data: "waits"))
        server.advanceTime(by: .seconds(15))
        XCTAssertEqual(text(server), "")
        // … until it is writable again.
        server.channel.isWritable = true
        server.channel.pipeline.fireChannelWritabilityChanged()
        XCTAssertTrue(text(server).contains("data: waits\n\n"))

        // Unwritable for the stall timeout: closed.
        server.channel.isWritable = false
        server.channel.pipeline.fireChannelWritabilityChanged()
        server.advanceTime(by: .seconds(45))
        XCTAssertTrue(server.isActive)
        server.advanceTime(by: .seconds(15))
        XCTAssertFalse(server.isActive)
        XCTAssertEqual(stream.subscriberCount, 0)
    }

    func testTheRouteAnswers503PastItsSubscribersAndEndsWhenTheStreamCloses() throws {
        var limits = HTTPEventStream.Limits()
        limits.maxSubscribers = 1
        let stream = HTTPEventStream(limits: limits)
        let first = try serve(stream)
        defer { first.finish() }
        try first.feed(Self.request)
        XCTAssertTrue(text(first).hasPrefix("HTTP/1.1 200"))

        let second = try serve(stream)
        defer { second.finish() }
        try second.feed(Self.request)
        let refused = text(second)
        XCTAssertTrue(refused.hasPrefix("HTTP/1.1 503"), refused)
        XCTAssertTrue(refused.contains("Retry-After: 5"), refused)

        stream.close()
        first.loop.run()
        XCTAssertTrue(text(first).hasSuffix("0\r\n\r\n"))  // the chunked body's end
        XCTAssertFalse(first.isActive)
    }
}
