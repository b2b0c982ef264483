import Foundation
import NIOCore
import NIOEmbedded

/// The client end of one test connection: speaks the handshake and RFC 6455 frames (masked, as
/// a browser's) to the server's real pipeline on an `EmbeddedChannel`, and behaves like a
/// well-mannered client on its own: it answers pings, and echoes the server's close frame.
final class TestClient {
    enum State: Equatable {
        /// The handshake is sent; no answer yet (on_upgrade may be waiting).
        case connecting
        case open
        /// The server answered the handshake with this status.
        case refused(Int)
        /// The connection is over (close frame or TCP close).
        case closed
    }

    let channel: EmbeddedChannel
    private(set) var state = State.connecting
    /// The refusal's body.
    private(set) var body = ""
    private(set) var subprotocol: String?
    private(set) var closeCode: UInt16?
    private(set) var closeReason: String?
    /// Messages the server sent, not yet read by the test.
    private var messages = CircularBuffer<(binary: Bool, data: [UInt8])>()
    /// What the server wrote and has not been parsed yet.
    private var pending: [UInt8] = []
    private var fragments: (binary: Bool, data: [UInt8])?
    private var sentClose = false
    private var maskCounter: UInt32 = 0x5A17_0000

    init(channel: EmbeddedChannel) {
        self.channel = channel
    }

    /// A HEAD request's answer has no body, whatever its Content-Length says.
    private var isHead = false
    /// The answer's headers (names in lower case), once it came.
    private(set) var headers: [(name: String, value: String)] = []

    /// A plain HTTP request (a plugin route), with `headerLines` added; its answer reads like a
    /// refused handshake (`state` is `.refused(status)`, with `body` and `headers`).
    func request(method: String, path: String, headerLines: String, body: [UInt8]) throws {
        isHead = method == "HEAD"
        var request = "\(method) \(path) HTTP/1.1\r\nHost: luaws.test\r\nContent-Length: \(body.count)\r\n"
        for line in headerLines.split(separator: "\n") where !line.isEmpty { request += line + "\r\n" }
        request += "\r\n"
        try channel.writeInbound(ByteBuffer(bytes: Array(request.utf8) + body))
    }

    /// The opening handshake, with `headerLines` ("Name: value", one a line) added.
    func handshake(path: String, headerLines: String) throws {
        var request = "GET \(path) HTTP/1.1\r\nHost: luaws.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            + "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
        for line in headerLines.split(separator: "\n") where !line.isEmpty { request += line + "\r\n" }
        request += "\r\n"
        try channel.writeInbound(ByteBuffer(string: request))
    }

    /// Reads what the server wrote since the last call and reacts to it (pongs, close echo).
    /// Returns whether anything happened: the caller runs the loop again until nothing does.
    func collect() -> Bool {
        var progressed = false
        while let data = try? channel.readOutbound(as: IOData.self) {
            if case .byteBuffer(let buffer) = data {
                pending += buffer.readableBytesView
                progressed = true
            }
        }
        if progressed { parse() }
        if !channel.isActive, state != .closed, !isRefused {
            if state == .open || state == .connecting, closeCode == nil { closeCode = 1006; closeReason = "" }
            state = .closed
            progressed = true
        }
        return progressed
    }

    private var isRefused: Bool { if case .refused = state { true } else { false } }

    private func parse() {
        if state == .connecting {
            guard let end = pending.firstRange(of: Array("\r\n\r\n".utf8))?.upperBound else { return }
            let head = String(decoding: pending[..<end], as: UTF8.self)
            let lines = head.split(separator: "\r\n")
            let status = lines.first.flatMap { $0.split(separator: " ").dropFirst().first }.flatMap { Int($0) } ?? 0
            var headers: [(name: String, value: String)] = []
            for line in lines.dropFirst() {
                guard let colon = line.firstIndex(of: ":") else { continue }
                headers.append((line[..<colon].lowercased(), line[line.index(after: colon)...].trimmingCharacters(in: .whitespaces)))
            }
            self.headers = headers
            if status == 101 {
                pending.removeSubrange(..<end)
                subprotocol = headers.first { $0.0 == "sec-websocket-protocol" }?.1
                state = .open
            } else {
                let length = isHead ? 0 : headers.first { $0.0 == "content-length" }.flatMap { Int($0.1) } ?? 0
                guard pending.count >= end + length else { return }
                body = String(decoding: pending[end..<end + length], as: UTF8.self)
                pending.removeSubrange(..<(end + length))
                state = .refused(status)
                return
            }
        }
        while state == .open, let frame = nextFrame() {
            handle(frame)
        }
    }

    /// Splits one server frame (unmasked) off `pending`.
    private func nextFrame() -> (fin: Bool, opcode: UInt8, payload: [UInt8])? {
        guard pending.count >= 2 else { return nil }
        var length = Int(pending[1] & 0x7F)
        var header = 2
        if length == 126 {
            guard pending.count >= 4 else { return nil }
            length = Int(pending[2]) << 8 | Int(pending[3])
            header = 4
        } else if length == 127 {
            guard pending.count >= 10 else { return nil }
            length = pending[2..<10].reduce(0) { $0 << 8 | Int($1) }
            header = 10
        }
        guard pending.count >= header + length else { return nil }
        let frame = (fin: pending[0] & 0x80 != 0, opcode: pending[0] & 0x0F, payload: Array(pending[header..<header + length]))
        pending.removeSubrange(..<(header + length))
        return frame
    }

    private func handle(_ frame: (fin: Bool, opcode: UInt8, payload: [UInt8])) {
        switch frame.opcode {
        case 0x1, 0x2:
            if frame.fin { messages.append((frame.opcode == 0x2, frame.payload)) } else { fragments = (frame.opcode == 0x2, frame.payload) }
        case 0x0:
            fragments?.data += frame.payload
            if frame.fin, let whole = fragments {
                messages.append(whole)
                fragments = nil
            }
        case 0x9:
            try? write(opcode: 0xA, payload: frame.payload)
        case 0x8:
            let code = frame.payload.count >= 2 ? UInt16(frame.payload[0]) << 8 | UInt16(frame.payload[1]) : 1005
            closeCode = code
            closeReason = String(decoding: frame.payload.dropFirst(2), as: UTF8.self)
            if !sentClose {
                // Echo the code, as browsers do; the server then closes the TCP connection.
                sentClose = true
                try? write(opcode: 0x8, payload: frame.payload.count >= 2 ? Array(frame.payload.prefix(2)) : [])
            }
            state = .closed
        default:
            break
        }
    }

    // MARK: what the test does

    func send(binary: Bool, _ payload: [UInt8]) throws {
        try write(opcode: binary ? 0x2 : 0x1, payload: payload)
    }

    func close(code: UInt16, reason: String) throws {
        sentClose = true
        try write(opcode: 0x8, payload: [UInt8(code >> 8), UInt8(code & 0xFF)] + Array(reason.utf8))
    }

    func receive() -> (binary: Bool, data: [UInt8])? {
        messages.popFirst()
    }

    /// One masked frame to the server.
    private func write(opcode: UInt8, payload: [UInt8]) throws {
        maskCounter &+= 0x9E37_79B9
        let key = withUnsafeBytes(of: maskCounter.bigEndian) { Array($0) }
        var bytes: [UInt8] = [0x80 | opcode]
        if payload.count < 126 {
            bytes.append(0x80 | UInt8(payload.count))
        } else if payload.count <= 0xFFFF {
            bytes += [0x80 | 126, UInt8(payload.count >> 8), UInt8(payload.count & 0xFF)]
        } else {
            bytes.append(0x80 | 127)
            for shift in stride(from: 56, through: 0, by: -8) { bytes.append(UInt8((payload.count >> shift) & 0xFF)) }
        }
        bytes += key
        bytes.reserveCapacity(bytes.count + payload.count)
        for (index, byte) in payload.enumerated() { bytes.append(byte ^ key[index & 3]) }
        try channel.writeInbound(ByteBuffer(bytes: bytes))
    }
}
