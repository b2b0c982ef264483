import NIOCore
import WSEngine

/// Runs arbitrary bytes from a "client" through a fresh server pipeline on an EmbeddedChannel:
/// the target of the fuzzer (`Sources/LuaWSFuzz`) and of the regression corpus tests.
/// Whatever the bytes, this must return; a crash or a trap is a bug.
public enum FuzzHarness {
    /// An application that echoes, sends binary, closes on request: enough to reach every path.
    private final class EchoApplication: WebSocketApplication {
        func opened(_ connection: WebSocketConnection, request: WebSocketRequest) {
            connection.setIdleTimers([.milliseconds(1)])
        }
        func received(_ message: WebSocketMessage, on connection: WebSocketConnection) {
            if message.data.readableBytes == 1, message.data.getInteger(at: message.data.readerIndex, as: UInt8.self) == 0x2A {
                connection.close(code: 4000, reason: "asked")
            } else {
                connection.send(message.data, binary: message.kind == .binary)
            }
        }
        func idle(_ connection: WebSocketConnection, timer: Int) {}
        func closed(_ connection: WebSocketConnection, code: UInt16, reason: String) {}
        func subprotocol(offered: [String], path: String) -> String? { offered.first }
    }

    /// A valid opening handshake (with permessage-deflate) that inputs can start with.
    public static let handshake = Array((
        "GET /ws HTTP/1.1\r\nHost: fuzz\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n" +
        "Sec-WebSocket-Extensions: permessage-deflate\r\nSec-WebSocket-Protocol: x\r\n\r\n").utf8)

    /// What the server wrote back, as raw bytes, and whether it closed the connection.
    public struct Outcome {
        public var written: [UInt8]
        public var closed: Bool
    }

    /// Feeds `input` in pieces (the first byte, if any, picks the piece size, so inputs also
    /// exercise frames split across reads). With `withHandshake`, a valid handshake goes first.
    @discardableResult
    public static func run(_ input: [UInt8], withHandshake: Bool) -> Outcome {
        var configuration = ServerConfiguration()
        configuration.maxMessageSize = 1 << 16
        configuration.maxFrameSize = 1 << 16
        configuration.compressionThreshold = 8
        configuration.compressionLevel = 1
        var outcome = Outcome(written: [], closed: false)
        guard let server = try? EmbeddedServer(configuration: configuration, application: EchoApplication()) else {
            return outcome
        }
        do {
            let bytes = (withHandshake ? handshake : []) + input
            let piece = max(1, Int(input.first ?? 0) % 64 == 0 ? bytes.count : Int(input.first ?? 0) % 64)
            var offset = 0
            while offset < bytes.count, server.isActive {
                let end = min(bytes.count, offset + piece)
                try server.feed(Array(bytes[offset..<end]))
                offset = end
                server.advanceTime(by: .milliseconds(2))
                outcome.written += server.written()
            }
        } catch {
            // A pipeline error (the channel closed under us): the bytes were refused. Fine.
        }
        outcome.written += server.written()
        outcome.closed = !server.isActive
        server.finish()
        return outcome
    }
}
