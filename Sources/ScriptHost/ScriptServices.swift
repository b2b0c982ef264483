import NIOCore

/// What hooks can reach outside the process, declared here and provided by the embedding (the
/// luaws executable, over AsyncHTTPClient and RedisClient). Each call returns a future that
/// completes on `eventLoop`, the loop of the hook that waits for it; a failed future is an I/O
/// failure, which the hook sees as `nil, message` (never a Lua error).
public protocol ScriptServices: Sendable {
    func http(_ request: ScriptHTTPRequest, on eventLoop: EventLoop) -> EventLoopFuture<ScriptHTTPResponse>
    /// `nil` when Redis is not configured (`--redis`): the hook gets `nil, "redis not configured"`.
    func redis(_ arguments: [[UInt8]], on eventLoop: EventLoop) -> EventLoopFuture<ScriptRedisReply>?
}

/// `luaws.http.request{...}`, validated by the prelude.
public struct ScriptHTTPRequest: Sendable {
    public var method: String
    public var url: String
    public var headers: [(name: String, value: String)]
    public var body: [UInt8]
    /// Seconds; nil for the server's default (`--http-timeout`).
    public var timeout: Double?
    public var followRedirects: Bool
}

public struct ScriptHTTPResponse: Sendable {
    public var status: Int
    public var headers: [(name: String, value: String)]
    public var body: [UInt8]

    public init(status: Int, headers: [(name: String, value: String)], body: [UInt8]) {
        self.status = status
        self.headers = headers
        self.body = body
    }
}

/// A Redis reply as hooks see it (RESP2).
public indirect enum ScriptRedisReply: Sendable, Equatable {
    case string([UInt8])
    case status(String)
    case integer(Int64)
    case array([ScriptRedisReply])
    case null
    case error(String)

    /// The reply as one string the prelude unpacks (`string.unpack`): a tag byte and its
    /// payload, arrays in pre-order. One resume argument, whatever the reply's size.
    var packed: [UInt8] {
        var out: [UInt8] = []
        pack(into: &out)
        return out
    }

    private func pack(into out: inout [UInt8]) {
        func length(_ n: Int) { withUnsafeBytes(of: UInt32(truncatingIfNeeded: n).littleEndian) { out += $0 } }
        switch self {
        case .string(let bytes): out.append(UInt8(ascii: "s")); length(bytes.count); out += bytes
        case .status(let text): out.append(UInt8(ascii: "t")); length(text.utf8.count); out += text.utf8
        case .error(let text): out.append(UInt8(ascii: "e")); length(text.utf8.count); out += text.utf8
        case .integer(let n): out.append(UInt8(ascii: "i")); withUnsafeBytes(of: n.littleEndian) { out += $0 }
        case .null: out.append(UInt8(ascii: "n"))
        case .array(let elements):
            out.append(UInt8(ascii: "a"))
            length(elements.count)
            for element in elements { element.pack(into: &out) }
        }
    }
}
