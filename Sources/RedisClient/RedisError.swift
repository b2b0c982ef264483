/// Why a command, a subscription or a URL failed. A Redis *error reply* (`-ERR ...`) is not one
/// of these: it arrives as `RedisReply.error` in a succeeded future, like any other reply.
public enum RedisError: Error, Sendable, Hashable, CustomStringConvertible {
    /// Not connected (connecting, or down and waiting to reconnect); the command was not sent.
    /// The associated text is the last connection error, if any.
    case unavailable(String?)
    /// The client was closed; the command was not sent, or its reply will never come.
    case closed
    /// The connection dropped after the command was sent; it may or may not have run.
    case connectionLost
    /// More than the configured number of commands were waiting for replies.
    case tooManyInFlight(limit: Int)
    /// A reply passed the configured size or array-length bound; the connection was reset.
    case replyTooLarge(limit: Int)
    /// Redis sent bytes hiredis could not parse; the connection was reset.
    case protocolError(String)
    /// No reply within the command timeout; the connection was reset.
    case timeout
    /// The command is refused before sending (empty, too large, or not allowed on this connection).
    case invalidCommand(String)
    /// Redis answered a step that must succeed (AUTH, SELECT, SUBSCRIBE) with an error reply.
    case errorReply(String)
    /// `RedisURL` could not parse its input.
    case invalidURL(String)

    public var description: String {
        switch self {
        case .unavailable(let why): why.map { "redis unavailable: \($0)" } ?? "redis unavailable"
        case .closed: "redis client closed"
        case .connectionLost: "redis connection lost before the reply"
        case .tooManyInFlight(let limit): "redis: too many commands in flight (limit \(limit))"
        case .replyTooLarge(let limit): "redis: reply too large (limit \(limit) bytes)"
        case .protocolError(let why): "redis protocol error: \(why)"
        case .timeout: "redis: no reply in time"
        case .invalidCommand(let why): "redis: \(why)"
        case .errorReply(let message): "redis: \(message)"
        case .invalidURL(let why): why
        }
    }
}
