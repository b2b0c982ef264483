import CHiredis
import NIOCore

/// Owns one bounded hiredis reply reader (see CHiredis/shims.h): bytes in, `RedisReply`s out.
///
/// Not thread-safe and not Sendable: it lives in one channel handler, on its event loop. After it
/// throws, it is in error for good (the byte stream is out of step), so its connection must go.
final class HiredisReader {
    private let reader: UnsafeMutablePointer<luaws_redis_reader>
    private let maxReplyBytes: Int

    init(maxReplyBytes: Int, maxArrayElements: Int) {
        guard let reader = luaws_redis_reader_new(max(maxReplyBytes, 1), Int64(max(maxArrayElements, 0))) else {
            fatalError("hiredis: out of memory creating a reply reader")
        }
        self.reader = reader
        self.maxReplyBytes = maxReplyBytes
    }

    deinit {
        luaws_redis_reader_free(reader)
    }

    func feed(_ buffer: ByteBuffer) throws(RedisError) {
        let status = buffer.withUnsafeReadableBytes { bytes in
            luaws_redis_reader_feed(reader, bytes.baseAddress, bytes.count)
        }
        if status != 0 { throw currentError() }
    }

    /// The next complete reply, or nil until more bytes arrive.
    func next() throws(RedisError) -> RedisReply? {
        var raw: UnsafeMutablePointer<redisReply>?
        switch luaws_redis_reader_next(reader, &raw) {
        case 1:
            guard let raw else { return nil }
            defer { luaws_redis_reply_free(raw) }
            guard let reply = RedisReply.convert(UnsafePointer(raw)) else {
                throw .protocolError("reply nested too deep")
            }
            return reply
        case 0:
            return nil
        default:
            throw currentError()
        }
    }

    private func currentError() -> RedisError {
        if luaws_redis_reader_too_large(reader) != 0 { return .replyTooLarge(limit: maxReplyBytes) }
        return .protocolError(String(cString: luaws_redis_reader_error(reader)))
    }
}
