import NIOCore

/// Bounds and timings of a Redis connection. The defaults suit a server talking to a nearby Redis.
public struct RedisConfiguration: Sendable {
    /// Commands sent and waiting for replies; past it a command fails at once (`tooManyInFlight`).
    public var maxInFlight: Int = 10_000
    /// One reply's size (string bytes, plus 16 bytes per element); past it the connection resets.
    public var maxReplyBytes: Int = 64 << 20
    /// One array's length, checked before hiredis allocates it.
    public var maxArrayElements: Int = 1 << 20
    /// One command's argument bytes.
    public var maxCommandBytes: Int = 64 << 20
    /// TCP connect timeout of each attempt.
    public var connectTimeout: TimeAmount = .seconds(2)
    /// How long the oldest command may wait for its reply before the connection is deemed dead
    /// and reset (failing every pending command). nil: wait forever.
    public var commandTimeout: TimeAmount? = .seconds(5)
    /// Delays between reconnect attempts.
    public var reconnectBackoff: RedisBackoff = RedisBackoff()
    /// Channels one subscriber may hold.
    public var maxSubscriptions: Int = 10_000

    public init() {}
}
