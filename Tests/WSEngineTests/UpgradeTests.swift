import Logging
import NIOCore
import NIOEmbedded
import NIOHTTP1
import NIOWebSocket
import WSEngineTesting
import XCTest

@testable import WSEngine

/// The opening handshake as `WebSocketUpgrader` does it: NIO's upgrader's answer, a pipeline
/// with the connection handler alone (nothing left of HTTP or of NIO's frame codec), and
/// connection slots that follow the connections.
final class UpgradeTests: XCTestCase {
    func testAcceptValueOfRFC6455sExample() throws {
        let server = try EmbeddedServer(configuration: ServerConfiguration(), application: EngineGuaranteesTests.Echo())
        defer { server.finish() }
        try server.feed(EngineGuaranteesTests.handshake())
        XCTAssertTrue(String(decoding: server.written(), as: UTF8.self).contains("\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"))
    }

    func testResponseAndWhatTheUpgradedPipelineHolds() throws {
        let server = try EmbeddedServer(configuration: ServerConfiguration(), application: EngineGuaranteesTests.Echo())
        defer { server.finish() }
        try server.feed(EngineGuaranteesTests.handshake(deflate: true))
        let answer = String(decoding: server.written(), as: UTF8.self)
        XCTAssertEqual(answer, "HTTP/1.1 101 Switching Protocols\r\n"
            + "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n"
            + "Upgrade: websocket\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nConnection: upgrade\r\n\r\n")
        let pipeline = server.channel.pipeline.syncOperations
        XCTAssertNoThrow(try pipeline.handler(type: WebSocketConnectionHandler.self))
        XCTAssertThrowsError(try pipeline.handler(type: WebSocketFrameEncoder.self))
        XCTAssertThrowsError(try pipeline.handler(type: ByteToMessageHandler<WebSocketFrameDecoder>.self))
        XCTAssertThrowsError(try pipeline.handler(type: HTTPHandler.self))
        XCTAssertThrowsError(try pipeline.handler(type: HTTPResponseEncoder.self))
        XCTAssertThrowsError(try pipeline.handler(type: HTTPServerPipelineHandler.self))
        XCTAssertThrowsError(try pipeline.handler(type: HTTPServerProtocolErrorHandler.self))
        XCTAssertThrowsError(try pipeline.handler(type: HTTPServerUpgradeHandler.self))
        // Frames still flow both ways.
        try server.feed(EngineGuaranteesTests.frame(0x1, Array("hi".utf8)))
        XCTAssertEqual(EngineGuaranteesTests.frames(server.written(), skipHead: false).map(\.payload), [Array("hi".utf8)])
    }

    func testVersionOtherThan13IsAnsweredWithoutAskingTheApplication() throws {
        final class Counting: WebSocketApplication {
            var asked = 0
            func opened(_ connection: WebSocketConnection, request: WebSocketRequest) {}
            func received(_ message: WebSocketMessage, on connection: WebSocketConnection) {}
            func idle(_ connection: WebSocketConnection, timer: Int) {}
            func closed(_ connection: WebSocketConnection, code: UInt16, reason: String) {}
            func shouldUpgrade(_ request: WebSocketRequest, on eventLoop: EventLoop) -> EventLoopFuture<UpgradeDecision> {
                asked += 1
                return eventLoop.makeSucceededFuture(.accept(context: nil))
            }
        }
        let application = Counting()
        let server = try EmbeddedServer(configuration: ServerConfiguration(), application: application)
        defer { server.finish() }
        let request = String(decoding: EngineGuaranteesTests.handshake(), as: UTF8.self)
            .replacingOccurrences(of: "Sec-WebSocket-Version: 13", with: "Sec-WebSocket-Version: 8")
        try server.feed(Array(request.utf8))
        let answer = String(decoding: server.written(), as: UTF8.self)
        XCTAssertTrue(answer.hasPrefix("HTTP/1.1 426"), answer)
        XCTAssertEqual(application.asked, 0)
    }

    /// An application that decides when the test says so.
    final class Deciding: WebSocketApplication {
        var pending: [EventLoopPromise<UpgradeDecision>] = []
        func opened(_ connection: WebSocketConnection, request: WebSocketRequest) {}
        func received(_ message: WebSocketMessage, on connection: WebSocketConnection) {}
        func idle(_ connection: WebSocketConnection, timer: Int) {}
        func closed(_ connection: WebSocketConnection, code: UInt16, reason: String) {}
        func shouldUpgrade(_ request: WebSocketRequest, on eventLoop: EventLoop) -> EventLoopFuture<UpgradeDecision> {
            let promise = eventLoop.makePromise(of: UpgradeDecision.self)
            pending.append(promise)
            return promise.futureResult
        }
    }

    func testConnectionSlotsFollowTheConnections() throws {
        var configuration = ServerConfiguration()
        configuration.maxConnections = 1
        let application = Deciding()
        let server = EmbeddedServerLoop(configuration: configuration, logger: Logger(label: "test"), keepAlive: false) { _ in application }
        defer { server.shutdown() }
        func upgrade(_ channel: EmbeddedChannel, _ decision: UpgradeDecision) throws -> String {
            try channel.writeInbound(ByteBuffer(bytes: EngineGuaranteesTests.handshake()))
            server.loop.run()
            application.pending.removeFirst().succeed(decision)
            server.loop.run()
            var bytes: [UInt8] = []
            while let data = try? channel.readOutbound(as: IOData.self) {
                if case .byteBuffer(let buffer) = data { bytes += buffer.readableBytesView }
            }
            return String(decoding: bytes, as: UTF8.self)
        }

        // A refusal takes no slot, and answers with the application's status.
        let refused = try server.connect()
        XCTAssertTrue(try upgrade(refused, .refuse(status: 401, reason: "who are you")).hasPrefix("HTTP/1.1 401"))
        // The client leaves while the application decides: accepting it then takes no slot.
        let gone = try server.connect()
        try gone.writeInbound(ByteBuffer(bytes: EngineGuaranteesTests.handshake()))
        server.loop.run()
        try gone.close().wait()
        application.pending.removeFirst().succeed(.accept(context: nil))
        server.loop.run()

        let first = try server.connect()
        XCTAssertTrue(try upgrade(first, .accept(context: nil)).hasPrefix("HTTP/1.1 101"))
        XCTAssertEqual(server.connectionCount, 1)
        let second = try server.connect()
        XCTAssertTrue(try upgrade(second, .accept(context: nil)).hasPrefix("HTTP/1.1 503"))
        // The first one's slot comes back when it closes.
        try first.close().wait()
        server.loop.run()
        XCTAssertEqual(server.connectionCount, 0)
        let third = try server.connect()
        XCTAssertTrue(try upgrade(third, .accept(context: nil)).hasPrefix("HTTP/1.1 101"))
        XCTAssertEqual(server.connectionCount, 1)
    }
}
