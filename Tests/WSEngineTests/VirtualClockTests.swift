import Logging
import NIOCore
import NIOEmbedded
import WSEngineTesting
import XCTest

@testable import WSEngine

/// The engine reads time from its event loop (`eventLoop.now`), never from the wall clock: on
/// an `EmbeddedEventLoop` (what `luaws test` runs on) idle timers, pings and timeouts follow
/// virtual time exactly, and an hour of it passes in an instant.
final class VirtualClockTests: XCTestCase {
    /// Sets a 10 s idle timer on every connection and counts its firings.
    final class IdleCounter: WebSocketApplication {
        var idles: [Int64: Int] = [:]
        func opened(_ connection: WebSocketConnection, request: WebSocketRequest) {
            connection.setIdleTimers([.seconds(10)])
        }
        func received(_ message: WebSocketMessage, on connection: WebSocketConnection) {}
        func idle(_ connection: WebSocketConnection, timer: Int) { idles[connection.id, default: 0] += 1 }
        func closed(_ connection: WebSocketConnection, code: UInt16, reason: String) {}
    }

    func testIdleTimersAndKeepAliveFollowTheLoopsClock() throws {
        let application = IdleCounter()
        let server = EmbeddedServerLoop(configuration: ServerConfiguration(), logger: Logger(label: "test")) { _ in application }
        defer { server.shutdown() }
        let a = try server.connect(), b = try server.connect()
        for channel in [a, b] {
            try channel.writeInbound(ByteBuffer(bytes: EngineGuaranteesTests.handshake()))
            server.loop.run()
        }
        XCTAssertEqual(server.connectionCount, 2)
        func written(_ channel: EmbeddedChannel) -> [UInt8] {
            var bytes: [UInt8] = []
            while let data = try? channel.readOutbound(as: IOData.self) {
                if case .byteBuffer(let buffer) = data { bytes += buffer.readableBytesView }
            }
            return bytes
        }
        _ = written(a)

        server.loop.advanceTime(by: .milliseconds(9_900))
        XCTAssertEqual(application.idles.values.reduce(0, +), 0)
        // A message to `b` at 9.9 s moves its wait; `a` fires at 10 s.
        try b.writeInbound(ByteBuffer(bytes: EngineGuaranteesTests.frame(0x1, Array("hi".utf8))))
        server.loop.advanceTime(by: .milliseconds(100))
        XCTAssertEqual(application.idles.values.sorted(), [1])
        // `b` at 19.9 s, `a` again at 20 s.
        server.loop.advanceTime(by: .milliseconds(9_899))
        XCTAssertEqual(application.idles.values.sorted(), [1])
        server.loop.advanceTime(by: .milliseconds(1))
        XCTAssertEqual(application.idles.values.sorted(), [1, 1])
        server.loop.advanceTime(by: .milliseconds(100))
        XCTAssertEqual(application.idles.values.sorted(), [1, 2])

        // 30 s of silence from the client (ping interval): the sweep pings it, on virtual time.
        let frames = EngineGuaranteesTests.frames(written(a), skipHead: false)
        XCTAssertFalse(frames.contains { $0.opcode == 0x9 })
        server.loop.advanceTime(by: .seconds(11))
        XCTAssertTrue(EngineGuaranteesTests.frames(written(a), skipHead: false).contains { $0.opcode == 0x9 })
    }
}
