import NIOCore
import WSEngineTesting
import XCTest

@testable import WSEngine

/// The frames a read batch produces are written as one buffer (`corked` in the connection
/// handler), in order, also around a frame too large to be copied into it and a close frame.
final class BatchedWritesTests: XCTestCase {
    typealias G = EngineGuaranteesTests

    /// Echoes each message; "big" answers with a 10,000-byte message, "bye" closes.
    final class App: WebSocketApplication {
        func opened(_ connection: WebSocketConnection, request: WebSocketRequest) {}
        func received(_ message: WebSocketMessage, on connection: WebSocketConnection) {
            switch String(buffer: message.data) {
            case "big": connection.send(ByteBuffer(repeating: 0x61, count: 10_000))
            case "bye": connection.close(code: 1000, reason: "bye")
            default: connection.send(message.data)
            }
        }
        func idle(_ connection: WebSocketConnection, timer: Int) {}
        func closed(_ connection: WebSocketConnection, code: UInt16, reason: String) {}
    }

    func open() throws -> EmbeddedServer {
        let server = try EmbeddedServer(configuration: ServerConfiguration(), application: App())
        try server.feed(G.handshake())
        XCTAssertTrue(String(decoding: server.written(), as: UTF8.self).hasPrefix("HTTP/1.1 101"))
        return server
    }

    /// Every buffer the server wrote since the last call.
    func writes(_ server: EmbeddedServer) -> [[UInt8]] {
        var buffers: [[UInt8]] = []
        while let data = try? server.channel.readOutbound(as: IOData.self) {
            if case .byteBuffer(let buffer) = data { buffers.append(Array(buffer.readableBytesView)) }
        }
        return buffers
    }

    func testTheRepliesOfOneReadLeaveAsOneBuffer() throws {
        let server = try open()
        defer { server.finish() }
        try server.feed((1...8).flatMap { G.frame(0x1, Array("m\($0)".utf8)) })
        let buffers = writes(server)
        XCTAssertEqual(buffers.count, 1)
        XCTAssertEqual(G.frames(buffers.flatMap { $0 }, skipHead: false).map { String(decoding: $0.payload, as: UTF8.self) },
                       (1...8).map { "m\($0)" })
    }

    func testALargeFrameAndACloseKeepTheirPlace() throws {
        let server = try open()
        defer { server.finish() }
        try server.feed(["a", "big", "b", "bye", "after"].flatMap { G.frame(0x1, Array($0.utf8)) })
        let frames = G.frames(writes(server).flatMap { $0 }, skipHead: false)
        XCTAssertEqual(frames.map(\.opcode), [0x1, 0x1, 0x1, 0x8], "nothing after our close frame")
        XCTAssertEqual(frames.map(\.payload.count), [1, 10_000, 1, 5])
        XCTAssertEqual(frames[2].payload, Array("b".utf8))
    }

    func testNoBufferIsHeldBetweenBatches() throws {
        let server = try open()
        defer { server.finish() }
        try server.feed(G.frame(0x1, Array("x".utf8)))
        XCTAssertEqual(writes(server).count, 1, "flushed at the end of the read")
        XCTAssertEqual(writes(server).count, 0)
    }
}
