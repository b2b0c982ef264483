import CHiredis

/// One RESP2 reply. Error replies (`-ERR ...`) are values here, not thrown errors: the command
/// ran and Redis answered.
public enum RedisReply: Sendable, Hashable {
    /// A bulk string: bytes, not necessarily UTF-8.
    case string([UInt8])
    /// A status reply such as `OK` or `QUEUED`.
    case status(String)
    case integer(Int64)
    case array([RedisReply])
    /// A nil bulk string or nil array.
    case null
    /// An error reply, with its code: `ERR unknown command ...`, `WRONGTYPE ...`.
    case error(String)

    /// Converts hiredis's reply tree. hiredis has already bounded its size (see CHiredis); the
    /// depth bound here keeps the recursion bounded whatever the reader lets through (hiredis
    /// 0.14 itself stops at 7 levels).
    static func convert(_ reply: UnsafePointer<redisReply>, depth: Int = 0, maxDepth: Int = 16) -> RedisReply? {
        switch Int(luaws_redis_reply_type(reply)) {
        case LUAWS_REDIS_STRING:
            return .string(bytes(reply))
        case LUAWS_REDIS_STATUS:
            return .status(String(decoding: bytes(reply), as: UTF8.self))
        case LUAWS_REDIS_ERROR:
            return .error(String(decoding: bytes(reply), as: UTF8.self))
        case LUAWS_REDIS_INTEGER:
            return .integer(Int64(luaws_redis_reply_integer(reply)))
        case LUAWS_REDIS_NIL:
            return .null
        case LUAWS_REDIS_ARRAY:
            guard depth < maxDepth else { return nil }
            let count = luaws_redis_reply_count(reply)
            var elements: [RedisReply] = []
            elements.reserveCapacity(count)
            for i in 0..<count {
                guard let child = luaws_redis_reply_element(reply, i),
                      let value = convert(child, depth: depth + 1, maxDepth: maxDepth) else { return nil }
                elements.append(value)
            }
            return .array(elements)
        default:
            return nil
        }
    }

    private static func bytes(_ reply: UnsafePointer<redisReply>) -> [UInt8] {
        let count = luaws_redis_reply_length(reply)
        guard count > 0, let base = luaws_redis_reply_bytes(reply) else { return [] }
        return Array(UnsafeBufferPointer(start: base, count: count))
    }
}

extension RedisReply {
    /// The text of a bulk string or status reply (UTF-8, invalid bytes replaced).
    public var text: String? {
        switch self {
        case .string(let b): String(decoding: b, as: UTF8.self)
        case .status(let s): s
        default: nil
        }
    }

    public var isError: Bool {
        if case .error = self { return true }
        return false
    }
}
