import NIOCore
import NIOWebSocket

/// Encodes server frames (RFC 6455 §5.2: never masked) straight into ByteBuffers.
///
/// The connection handler writes bytes itself rather than through NIO's WebSocketFrameEncoder:
/// small frames are appended back to back to one buffer per batch (`append`; header and payload
/// together, one allocation, one iovec) instead of a frame wrapped in NIOAny, a separate header
/// buffer and two iovecs each. The handler
/// writes them from its own context, last in the pipeline: nothing stands between it and the
/// socket but TLS, if any.
enum FrameWriter {
    /// Payloads up to this size are copied behind their header; larger ones go as a second buffer.
    static let copyLimit = 4096

    static func headerSize(_ length: Int) -> Int {
        length < 126 ? 2 : (length <= 0xFFFF ? 4 : 10)
    }

    static func writeHeader(opcode: WebSocketOpcode, rsv1: Bool, length: Int, into buffer: inout ByteBuffer) {
        var first: UInt8 = 0x80 | UInt8(webSocketOpcode: opcode)
        if rsv1 { first |= 0x40 }
        if length < 126 {
            buffer.writeMultipleIntegers(first, UInt8(length))
        } else if length <= 0xFFFF {
            buffer.writeMultipleIntegers(first, UInt8(126), UInt16(length))
        } else {
            buffer.writeMultipleIntegers(first, UInt8(127), UInt64(length))
        }
    }

    /// Appends the whole frame (header, then the payload copied) to `buffer`; returns its size.
    @discardableResult
    static func append(opcode: WebSocketOpcode, rsv1: Bool = false, payload: ByteBuffer, to buffer: inout ByteBuffer) -> Int {
        let length = payload.readableBytes
        writeHeader(opcode: opcode, rsv1: rsv1, length: length, into: &buffer)
        buffer.writeImmutableBuffer(payload)
        return headerSize(length) + length
    }

    /// Calls `write` once (header and payload in one buffer) or twice (header, then the payload
    /// as it is, not copied); its second argument is true for the frame's last buffer.
    static func frame(opcode: WebSocketOpcode, rsv1: Bool = false, payload: ByteBuffer, allocator: ByteBufferAllocator, write: (ByteBuffer, Bool) -> Void) {
        let length = payload.readableBytes
        if length <= copyLimit {
            var buffer = allocator.buffer(capacity: headerSize(length) + length)
            append(opcode: opcode, rsv1: rsv1, payload: payload, to: &buffer)
            write(buffer, true)
        } else {
            var header = allocator.buffer(capacity: headerSize(length))
            writeHeader(opcode: opcode, rsv1: rsv1, length: length, into: &header)
            write(header, false)
            write(payload, true)
        }
    }
}
