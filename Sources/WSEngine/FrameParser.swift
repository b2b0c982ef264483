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
/// The payload of a frame still arriving is unmasked as it comes and handed out too, piece by
/// piece (`partial`), so that text can be validated before the frame ends: each byte is
/// unmasked once, the rest when the frame completes.
///
/// Invariants: a frame header is refused as soon as it is read, before its payload arrives:
/// a length over `maxFrameSize` (1009), a 64-bit length with the top bit set, a fragmented or
/// over-125-byte control frame (1002). Frames before a refused header are still delivered.
/// `pending`, when set, starts at the header of the incomplete frame (its reader index), and the
/// first `pendingUnmasked` bytes of that frame's payload are unmasked already.
struct FrameParser {
    let maxFrameSize: Int
    private var pending: ByteBuffer?
    private var pendingUnmasked = 0

    private struct Span {
        var first: UInt8
        var masked: Bool
        var key: UInt32
        var payloadStart: Int
        var length: Int
        /// Payload bytes unmasked by an earlier call (the frame was incomplete then).
        var unmasked = 0
    }
    /// Reused across reads: no allocation per read once it has grown (and none at all for a
    /// connection that never sends).
    private var spans: [Span] = []

    init(maxFrameSize: Int) {
        self.maxFrameSize = maxFrameSize
    }

    /// Takes the next bytes read and calls `body` with every frame they complete, in order.
    /// `body` returns false to stop (the connection is closing). Then, if a frame is left
    /// incomplete and more of its payload has arrived, calls `partial` with its header and those
    /// new bytes of payload, unmasked (each payload byte goes to `partial` at most once, and
    /// later to `body` with the whole frame).
    mutating func parse(
        _ bytes: ByteBuffer,
        partial: (ClientFrame) throws(ProtocolFailure) -> Void = { _ in },
        _ body: (ClientFrame) throws(ProtocolFailure) -> Bool
    ) throws(ProtocolFailure) {
        var buffer: ByteBuffer
        var carried = 0
        if var waiting = pending {
            pending = nil
            carried = pendingUnmasked
            pendingUnmasked = 0
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
        /// The frame left incomplete, if its header is whole; `length` is what has arrived of its payload.
        var incomplete: Span?
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
            // Only the first frame can be the one that was incomplete before.
            let unmasked = offset == buffer.readerIndex ? carried : 0
            guard end - offset >= header + length else {
                incomplete = Span(first: first, masked: masked, key: key, payloadStart: offset + header, length: end - offset - header, unmasked: unmasked)
                break
            }
            spans.append(Span(first: first, masked: masked, key: key, payloadStart: offset + header, length: length, unmasked: unmasked))
            offset += header + length
        }

        // 2. Unmask every payload (complete, and what has come of the incomplete one) in one
        //    mutable access, skipping what was unmasked before.
        if let last = incomplete { spans.append(last) }
        if spans.contains(where: { $0.masked && $0.length > $0.unmasked }) {
            let base = buffer.readerIndex
            buffer.withUnsafeMutableReadableBytes { raw in
                for span in spans where span.masked && span.length > span.unmasked {
                    let start = span.payloadStart - base + span.unmasked
                    Self.unmask(UnsafeMutableRawBufferPointer(rebasing: raw[start..<(span.payloadStart - base + span.length)]),
                                key: Self.rotate(span.key, by: span.unmasked))
                }
            }
        }
        if incomplete != nil { spans.removeLast() }

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
            if let span = incomplete, span.length > span.unmasked {
                try partial(ClientFrame(
                    fin: span.first & 0x80 != 0, rsv1: span.first & 0x40 != 0, rsv2: span.first & 0x20 != 0,
                    rsv3: span.first & 0x10 != 0, opcode: WebSocketOpcode(encodedWebSocketOpcode: span.first & 0x0F)!,
                    masked: span.masked, payload: buffer.getSlice(at: span.payloadStart + span.unmasked, length: span.length - span.unmasked)!))
            }
            pendingUnmasked = incomplete?.length ?? 0
            buffer.moveReaderIndex(to: offset)
            if buffer.readerIndex > 4096 { buffer.discardReadBytes() }
            pending = buffer
        }
    }

    /// The masking key as it applies from payload byte `offset` on (the key is read little-endian:
    /// its low byte masks byte 0).
    static func rotate(_ key: UInt32, by offset: Int) -> UInt32 {
        let shift = UInt32(offset & 3) * 8
        return shift == 0 ? key : key >> shift | key << (32 - shift)
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
