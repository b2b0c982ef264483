import NIOCore
import NIOWebSocket

/// One frame from the client, its payload already unmasked.
struct ClientFrame {
    var fin: Bool
    var rsv1: Bool
    var rsv2: Bool
    var rsv3: Bool
    var opcode: WebSocketOpcode
    var masked: Bool
    var payload: ByteBuffer
}

/// Splits the bytes a client sends into frames (RFC 6455 §5.2) and unmasks them.
///
/// It replaces NIO's ByteToMessageHandler + WebSocketFrameDecoder on the hot path: every
/// complete frame of a read is unmasked in place in one pass over the read's buffer (one
/// copy-on-write of the buffer per read at most, instead of one allocation per frame), and the
/// payloads handed out are slices of it. Bytes of an incomplete frame wait in `pending`.
///
/// Invariants: a frame header is refused as soon as it is read, before its payload arrives:
/// a length over `maxFrameSize` (1009), a 64-bit length with the top bit set, a fragmented or
/// over-125-byte control frame (1002). Frames before a refused header are still delivered.
struct FrameParser {
    let maxFrameSize: Int
    private var pending: ByteBuffer?

    private struct Span {
        var first: UInt8
        var masked: Bool
        var key: UInt32
        var payloadStart: Int
        var length: Int
    }
    /// Reused across reads: no allocation per read once it has grown (and none at all for a
    /// connection that never sends).
    private var spans: [Span] = []

    init(maxFrameSize: Int) {
        self.maxFrameSize = maxFrameSize
    }

    /// Takes the next bytes read and calls `body` with every frame they complete, in order.
    /// `body` returns false to stop (the connection is closing).
    mutating func parse(_ bytes: ByteBuffer, _ body: (ClientFrame) throws(ProtocolFailure) -> Bool) throws(ProtocolFailure) {
        var buffer: ByteBuffer
        if var waiting = pending {
            pending = nil
            var more = bytes
            waiting.writeBuffer(&more)
            buffer = waiting
        } else {
            buffer = bytes
        }

        // 1. Headers: find the complete frames.
        spans.removeAll(keepingCapacity: true)
        var offset = buffer.readerIndex
        let end = buffer.writerIndex
        var refused: ProtocolFailure?
        while end - offset >= 2 {
            let first = buffer.getInteger(at: offset, as: UInt8.self)!
            let second = buffer.getInteger(at: offset + 1, as: UInt8.self)!
            var header = 2
            var length = Int(second & 0x7F)
            if length == 126 {
                guard end - offset >= 4 else { break }
                length = Int(buffer.getInteger(at: offset + 2, as: UInt16.self)!)
                header = 4
            } else if length == 127 {
                guard end - offset >= 10 else { break }
                let long = buffer.getInteger(at: offset + 2, as: UInt64.self)!
                guard long >> 63 == 0 else {
                    refused = ProtocolFailure(code: ProtocolFailure.protocolError, reason: "64-bit frame length with the top bit set")
                    break
                }
                guard long <= UInt64(maxFrameSize) else {
                    refused = ProtocolFailure(code: ProtocolFailure.tooLarge, reason: "frame larger than \(maxFrameSize) bytes")
                    break
                }
                length = Int(long)
                header = 10
            }
            if first & 0x08 != 0 {  // control frame
                guard first & 0x80 != 0 else {
                    refused = ProtocolFailure(code: ProtocolFailure.protocolError, reason: "fragmented control frame")
                    break
                }
                guard length <= 125 else {
                    refused = ProtocolFailure(code: ProtocolFailure.protocolError, reason: "control frame longer than 125 bytes")
                    break
                }
            }
            guard length <= maxFrameSize else {
                refused = ProtocolFailure(code: ProtocolFailure.tooLarge, reason: "frame larger than \(maxFrameSize) bytes")
                break
            }
            let masked = second & 0x80 != 0
            var key: UInt32 = 0
            if masked {
                guard end - offset >= header + 4 else { break }
                key = buffer.getInteger(at: offset + header, endianness: .little, as: UInt32.self)!
                header += 4
            }
            guard end - offset >= header + length else { break }
            spans.append(Span(first: first, masked: masked, key: key, payloadStart: offset + header, length: length))
            offset += header + length
        }

        // 2. Unmask every complete payload in one mutable access.
        if spans.contains(where: { $0.masked && $0.length > 0 }) {
            let base = buffer.readerIndex
            buffer.withUnsafeMutableReadableBytes { raw in
                for span in spans where span.masked && span.length > 0 {
                    Self.unmask(UnsafeMutableRawBufferPointer(rebasing: raw[(span.payloadStart - base)..<(span.payloadStart - base + span.length)]), key: span.key)
                }
            }
        }

        // 3. Deliver, then keep what is left of an incomplete frame.
        var stopped = false
        for span in spans where !stopped {
            let frame = ClientFrame(
                fin: span.first & 0x80 != 0, rsv1: span.first & 0x40 != 0, rsv2: span.first & 0x20 != 0,
                rsv3: span.first & 0x10 != 0, opcode: WebSocketOpcode(encodedWebSocketOpcode: span.first & 0x0F)!,
                masked: span.masked, payload: buffer.getSlice(at: span.payloadStart, length: span.length)!)
            stopped = try !body(frame)
        }
        spans.removeAll(keepingCapacity: true)
        if let refused, !stopped { throw refused }
        if offset < end && !stopped {
            buffer.moveReaderIndex(to: offset)
            if buffer.readerIndex > 4096 { buffer.discardReadBytes() }
            pending = buffer
        }
    }

    /// XORs `bytes` with the 4-byte masking key (as read, little-endian in `key`), 8 bytes at a time.
    static func unmask(_ bytes: UnsafeMutableRawBufferPointer, key: UInt32) {
        let wide = UInt64(key) | UInt64(key) << 32
        var i = 0
        let count = bytes.count
        while i + 8 <= count {
            let word = UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: i, as: UInt64.self))
            bytes.storeBytes(of: (word ^ wide).littleEndian, toByteOffset: i, as: UInt64.self)
            i += 8
        }
        while i < count {
            bytes[i] ^= UInt8(truncatingIfNeeded: key >> (8 * UInt32(i & 3)))
            i += 1
        }
    }
}
