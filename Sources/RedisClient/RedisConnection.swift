import Logging
import NIOCore

/// A Redis command connection: one TCP connection on one event loop, commands pipelined in
/// order, each answered by a future. It connects as soon as it is made and reconnects with
/// back-off whenever the connection drops or cannot be made; while it is not connected, commands
/// fail at once with `RedisError.unavailable` rather than wait.
///
/// Callable from any thread; futures complete on `eventLoop` (call from that loop to skip a hop).
/// Call `close()` when done: until then it keeps reconnecting.
///
///     let redis = RedisConnection(url: try RedisURL("redis://localhost:6379"), eventLoop: loop)
///     redis.send("INCR", "visits").whenSuccess { reply in ... }   // .integer(1)
public final class RedisConnection: Sendable {
    public let url: RedisURL
    public let eventLoop: EventLoop
    private let core: RedisConnectionCore

    public init(url: RedisURL, eventLoop: EventLoop, configuration: RedisConfiguration = RedisConfiguration(),
                logger: Logger = Logger(label: "luaws.redis")) {
        self.url = url
        self.eventLoop = eventLoop
        self.core = RedisConnectionCore(url: url, configuration: configuration, eventLoop: eventLoop, logger: logger)
        run { $0.start() }
    }

    /// The current state, readable from any thread.
    public var state: RedisConnectionState { core.state }

    /// Calls `callback` on the event loop after every state change.
    public func onStateChange(_ callback: @escaping @Sendable (RedisConnectionState) -> Void) {
        run { $0.onStateChange(callback) }
    }

    /// Succeeds when connected (now or at the next connect); fails if closed first. No timeout:
    /// pair it with one if Redis may stay down.
    public func whenConnected() -> EventLoopFuture<Void> {
        onLoop { $0.whenConnected() }
    }

    /// Sends one command (`["SET", "key", "value"]`). The future succeeds with Redis's reply,
    /// including error replies (`.error("ERR ...")`), and fails with a `RedisError` when the
    /// command could not be sent (not connected, too many in flight, refused by
    /// `RedisCommandPolicy`) or its reply never came (connection lost, timeout, closed).
    public func send(_ arguments: [[UInt8]]) -> EventLoopFuture<RedisReply> {
        if let why = RedisCommandPolicy.check(arguments) {
            return eventLoop.makeFailedFuture(RedisError.invalidCommand(why))
        }
        return onLoop { $0.send(arguments) }
    }

    public func send(_ arguments: [String]) -> EventLoopFuture<RedisReply> {
        send(arguments.map { Array($0.utf8) })
    }

    public func send(_ command: String, _ arguments: String...) -> EventLoopFuture<RedisReply> {
        send([command] + arguments)
    }

    /// Stops reconnecting, fails every waiting command with `RedisError.closed`, closes the
    /// connection. Later commands fail with `.closed`.
    public func close() -> EventLoopFuture<Void> {
        onLoop { $0.close() }
    }

    private func onLoop<T: Sendable>(_ body: @escaping @Sendable (RedisConnectionCore) -> EventLoopFuture<T>) -> EventLoopFuture<T> {
        let core = self.core
        if eventLoop.inEventLoop { return body(core) }
        return eventLoop.flatSubmit { body(core) }
    }

    private func run(_ body: @escaping @Sendable (RedisConnectionCore) -> Void) {
        let core = self.core
        if eventLoop.inEventLoop { body(core) } else { eventLoop.execute { body(core) } }
    }
}
