import NIOCore
import NIOHTTP1
import WSEngineTesting
import XCTest

@testable import WSEngine

/// Issue 8's promises, checked on the real pipeline (EmbeddedServer): pongs count toward the
/// slow-consumer bound, compressed bombs fail early, only real handshake keys upgrade, and
/// invalid UTF-8 fails as soon as it arrives.
final class EngineGuaranteesTests: XCTestCase {
    /// Echoes every message back.
    final class Echo: WebSocketApplication {
        func opened(_ connection: WebSocketConnection, request: WebSocketRequest) {}
        func received(_ message: WebSocketMessage, on connection: WebSocketConnection) {
            connection.send(message.data, binary: message.kind == .binary)
        }
        func idle(_ connection: WebSocketConnection, timer: Int) {}
        func closed(_ connection: WebSocketConnection, code: UInt16, reason: String) {}
    }

    static func handshake(key: String = "dGhlIHNhbXBsZSBub25jZQ==", deflate: Bool = false) -> [UInt8] {
        Array(("GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
               "Sec-WebSocket-Key: \(key)\r\nSec-WebSocket-Version: 13\r\n" +
               (deflate ? "Sec-WebSocket-Extensions: permessage-deflate\r\n" : "") + "\r\n").utf8)
    }

    /// A masked client frame header (the key is 0, so the payload goes as it is).
    static func header(_ opcode: UInt8, length: Int, fin: Bool = true, rsv1: Bool = false) -> [UInt8] {
        var bytes: [UInt8] = [(fin ? 0x80 : 0) | (rsv1 ? 0x40 : 0) | opcode]
        if length < 126 {
            bytes.append(0x80 | UInt8(length))
        } else if length <= 0xFFFF {
            bytes += [0x80 | 126, UInt8(length >> 8), UInt8(length & 0xFF)]
        } else {
            bytes.append(0x80 | 127)
            for shift in stride(from: 56, through: 0, by: -8) { bytes.append(UInt8((length >> shift) & 0xFF)) }
        }
        return bytes + [0, 0, 0, 0]
    }

    static func frame(_ opcode: UInt8, _ payload: [UInt8], fin: Bool = true, rsv1: Bool = false) -> [UInt8] {
        header(opcode, length: payload.count, fin: fin, rsv1: rsv1) + payload
    }

    /// The frames in what the server wrote, after the HTTP response (if `skipHead`).
    static func frames(_ written: [UInt8], skipHead: Bool = true) -> [(opcode: UInt8, payload: [UInt8])] {
        var i = 0
        if skipHead {
            guard let end = written.firstRange(of: Array("\r\n\r\n".utf8))?.upperBound else { return [] }
            i = end
        }
        var result: [(UInt8, [UInt8])] = []
        while i + 2 <= written.count {
            var length = Int(written[i + 1] & 0x7F)
            var header = 2
            if length == 126 {
                length = Int(written[i + 2]) << 8 | Int(written[i + 3])
                header = 4
            } else if length == 127 {
                length = written[(i + 2)..<(i + 10)].reduce(0) { $0 << 8 | Int($1) }
                header = 10
            }
            guard i + header + length <= written.count else { break }
            result.append((written[i] & 0x0F, Array(written[(i + header)..<(i + header + length)])))
            i += header + length
        }
        return result
    }

    static func closeCode(_ frames: [(opcode: UInt8, payload: [UInt8])]) -> UInt16? {
        guard let close = frames.last(where: { $0.opcode == 0x8 }), close.payload.count >= 2 else { return nil }
        return UInt16(close.payload[0]) << 8 | UInt16(close.payload[1])
    }

    func open(_ configuration: ServerConfiguration = ServerConfiguration(), deflate: Bool = false) throws -> EmbeddedServer {
        let server = try EmbeddedServer(configuration: configuration, application: Echo())
        try server.feed(Self.handshake(deflate: deflate))
        let head = String(decoding: server.written(), as: UTF8.self)
        XCTAssertTrue(head.hasPrefix("HTTP/1.1 101"), head)
        return server
    }

    // MARK: pongs and the slow-consumer bound

    func testPongsAreNotQueuedForAClientThatDoesNotRead() throws {
        for policy in SlowConsumerPolicy.allCases {
            var configuration = ServerConfiguration()
            configuration.slowConsumerPolicy = policy
            let server = try open(configuration)
            defer { server.finish() }
            let ping = Self.frame(0x9, Array(repeating: 0x70, count: 125))
            try server.feed(ping)
            XCTAssertEqual(Self.frames(server.written(), skipHead: false).map(\.opcode), [0xA], "writable: answered")

            server.channel.isWritable = false  // over maxOutboundBytes
            server.channel.pipeline.fireChannelWritabilityChanged()
            try? server.feed(ping + ping)
            let written = Self.frames(server.written(), skipHead: false)
            XCTAssertFalse(written.contains { $0.opcode == 0xA }, "\(policy): no pong queued")
            switch policy {
            case .close:
                XCTAssertEqual(Self.closeCode(written), 1008)
                XCTAssertFalse(server.isActive)
            case .drop:
                XCTAssertTrue(written.isEmpty)
                XCTAssertTrue(server.isActive)
                server.channel.isWritable = true
                server.channel.pipeline.fireChannelWritabilityChanged()
                try server.feed(ping)
                XCTAssertEqual(Self.frames(server.written(), skipHead: false).map(\.opcode), [0xA], "drained: answered again")
            }
        }
    }

    // MARK: compressed bombs

    func testInflateLimit() {
        var configuration = ServerConfiguration()
        configuration.maxMessageSize = 16 << 20
        XCTAssertEqual(configuration.maxCompressedRatio, 100)
        XCTAssertEqual(configuration.inflateLimit(compressedBytes: 8 << 10), 1 << 20, "the floor")
        XCTAssertEqual(configuration.inflateLimit(compressedBytes: 100_000), 10_000_000)
        XCTAssertEqual(configuration.inflateLimit(compressedBytes: 1 << 20), 16 << 20, "never past maxMessageSize")
        configuration.maxCompressedRatio = .max
        XCTAssertEqual(configuration.inflateLimit(compressedBytes: 3), 16 << 20, "no overflow")
        configuration.maxCompressedRatio = 0
        XCTAssertEqual(configuration.inflateLimit(compressedBytes: 1), 16 << 20, "0: off")
    }

    func testDecompressStopsJustPastTheLimit() throws {
        let streams = DeflateStreams(level: 6)
        let bomb = try streams.compress(ByteBuffer(repeating: 0x61, count: 8 << 20), windowBits: 15, allocator: ByteBufferAllocator())
        XCTAssertLessThan(bomb.readableBytes, 10_000)
        XCTAssertThrowsError(try streams.decompress(bomb, limit: 1 << 20, allocator: ByteBufferAllocator())) { error in
            XCTAssertEqual((error as? ProtocolFailure)?.code, 1009)
        }
        // The streams are reset after a refusal: the next message inflates.
        let small = try streams.compress(ByteBuffer(string: "hello"), windowBits: 15, allocator: ByteBufferAllocator())
        XCTAssertEqual(String(buffer: try streams.decompress(small, limit: 100, allocator: ByteBufferAllocator())), "hello")
    }

    func testCompressedBombFailsTheConnectionWith1009() throws {
        let bomb = try DeflateStreams(level: 9).compress(ByteBuffer(repeating: 0x61, count: 8 << 20), windowBits: 15, allocator: ByteBufferAllocator())
        let server = try open(deflate: true)  // maxMessageSize 16 MiB: the size alone passes
        defer { server.finish() }
        try? server.feed(Self.frame(0x1, Array(bomb.readableBytesView), rsv1: true))
        XCTAssertEqual(Self.closeCode(Self.frames(server.written(), skipHead: false)), 1009)

        var off = ServerConfiguration()
        off.maxCompressedRatio = 0
        let unlimited = try open(off, deflate: true)
        defer { unlimited.finish() }
        try unlimited.feed(Self.frame(0x1, Array(bomb.readableBytesView), rsv1: true))
        let echoed = Self.frames(unlimited.written(), skipHead: false)
        XCTAssertEqual(echoed.map(\.opcode), [0x1], "ratio 0: inflated and echoed")
    }

    // MARK: Sec-WebSocket-Key

    func testHandshakeKeyIsABase64SixteenByteNonce() {
        for key in ["dGhlIHNhbXBsZSBub25jZQ==", "AAAAAAAAAAAAAAAAAAAAAA==", "/////////////////////w==", " dGhlIHNhbXBsZSBub25jZQ== "] {
            XCTAssertTrue(Handshake.isNonce(key), key)
        }
        for key in ["", "short", "dGhlIHNhbXBsZSBub25jZQ", "dGhlIHNhbXBsZSBub25jZQ=", "AAAAAAAAAAAAAAAAAAAAAAA=",
                    "AAAAAAAAAAAAAAAAAAAAAAAA", "AAAAAAAAAAAAAAAAAAAA-_==", "AAAAAAAAAAAAAAAAAAAAAA==AAAA", "ÄAAAAAAAAAAAAAAAAAAAAA=="] {
            XCTAssertFalse(Handshake.isNonce(key), key)
        }
    }

    func testShortKeyGets400() throws {
        for (key, status) in [("short", "HTTP/1.1 400"), ("dGhlIHNhbXBsZSBub25jZQ==", "HTTP/1.1 101")] {
            let server = try EmbeddedServer(configuration: ServerConfiguration(), application: Echo())
            defer { server.finish() }
            try server.feed(Self.handshake(key: key))
            let answer = String(decoding: server.written(), as: UTF8.self)
            XCTAssertTrue(answer.hasPrefix(status), "\(key): \(answer)")
        }
    }

    // MARK: UTF-8 as it arrives

    func testInvalidUTF8FailsBeforeTheFrameEnds() throws {
        let server = try open()
        defer { server.finish() }
        try server.feed(Self.header(0x1, length: 1000))
        try? server.feed(Array("hello".utf8) + [0xC0, 0xAF] + Array("wor".utf8))  // 10 of the 1000 bytes
        XCTAssertEqual(Self.closeCode(Self.frames(server.written(), skipHead: false)), 1007)
    }

    func testInvalidUTF8InAContinuationFailsBeforeItEnds() throws {
        let server = try open()
        defer { server.finish() }
        try server.feed(Self.frame(0x1, Array("ok ".utf8), fin: false))
        try server.feed(Self.header(0x0, length: 500) + [0x61, 0xED])  // ED A0: a surrogate
        XCTAssertTrue(server.written().isEmpty)
        try? server.feed([0xA0])
        XCTAssertEqual(Self.closeCode(Self.frames(server.written(), skipHead: false)), 1007)
    }

    func testValidTextSplitAnywhereIsDelivered() throws {
        let text = Array("snow ☃, party 🎉, κόσμε".utf8)
        for cut in 1..<text.count {
            for fragmented in [false, true] {
                let server = try open()
                defer { server.finish() }
                if fragmented {
                    try server.feed(Self.frame(0x1, Array(text[..<cut]), fin: false))
                    try server.feed(Self.header(0x0, length: text.count - cut))
                    for byte in text[cut...] { try server.feed([byte]) }
                } else {
                    try server.feed(Self.header(0x1, length: text.count) + text[..<cut])
                    try server.feed(Array(text[cut...]))
                }
                let frames = Self.frames(server.written(), skipHead: false)
                XCTAssertEqual(frames.map(\.opcode), [0x1], "cut at \(cut)")
                XCTAssertEqual(frames.first?.payload, text, "cut at \(cut)")
            }
        }
    }

    func testBinaryAndCompressedFramesAreNotValidatedAsText() throws {
        let server = try open()
        defer { server.finish() }
        try server.feed(Self.header(0x2, length: 4) + [0xFF, 0xFE])
        try server.feed([0xFD, 0xFC])
        XCTAssertEqual(Self.frames(server.written(), skipHead: false).first?.payload, [0xFF, 0xFE, 0xFD, 0xFC])
    }

    func testEarlyFailureStopsOnlyTextOfTheRightMessage() throws {
        // A ping in the middle of a fragmented text message, cut across reads, is not text.
        let server = try open()
        defer { server.finish() }
        try server.feed(Self.frame(0x1, Array("a".utf8), fin: false))
        try server.feed(Self.header(0x9, length: 4) + [0xFF])
        try server.feed([0xFF, 0xFF, 0xFF] + Self.frame(0x0, Array("b".utf8)))
        XCTAssertEqual(Self.frames(server.written(), skipHead: false).map(\.opcode), [0xA, 0x1])
    }
}
