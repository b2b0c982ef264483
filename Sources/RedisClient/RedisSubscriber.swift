import Logging
import NIOCore

/// A Redis pub/sub connection: SUBSCRIBE to channels, receive their messages.
///
/// The set of channels is the subscriber's own, not the server's: after a reconnect it
/// subscribes to every channel again *before* it counts as connected, then calls
/// `onResubscribed` with them. `subscribe` registers the channel even when Redis is down (the
/// future then fails with `unavailable`, and the channel is subscribed at the next connect), so
/// a server-wide subscription made at start-up takes effect whenever Redis comes.
///
/// Messages published while the subscriber is disconnected are lost (that is Redis pub/sub).
///
/// Callable from any thread; `onMessage` and the callbacks run on `eventLoop`.
public final class RedisSubscriber: Sendable {
    public let url: RedisURL
    public let eventLoop: EventLoop
    private let core: RedisConnectionCore
    private let channels: Channels

    /// - Parameter onMessage: called on the event loop with each message's channel and payload.
    public init(url: RedisURL, eventLoop: EventLoop, configuration: RedisConfiguration = RedisConfiguration(),
                logger: Logger = Logger(label: "luaws.redis.subscriber"),
                onMessage: @escaping @Sendable (_ channel: String, _ payload: [UInt8]) -> Void) {
        self.url = url
        self.eventLoop = eventLoop
        let core = RedisConnectionCore(url: url, configuration: configuration, eventLoop: eventLoop, logger: logger) { push in
            // RedisChannelHandler only routes ["message", channel, payload] here.
            guard case .array(let items) = push, items.count == 3,
                  case .string(let channel) = items[1], case .string(let payload) = items[2] else { return }
            onMessage(String(decoding: channel, as: UTF8.self), payload)
        }
        let channels = Channels(core: core, maxSubscriptions: configuration.maxSubscriptions)
        self.core = core
        self.channels = channels
        run {
            $0.prepare = { handler in channels.resubscribe(handler) }
            $0.didConnect = { channels.catchUp() }
            $0.didDisconnect = { channels.lostServer() }
            $0.start()
        }
    }

    public var state: RedisConnectionState { core.state }

    public func onStateChange(_ callback: @escaping @Sendable (RedisConnectionState) -> Void) {
        run { $0.onStateChange(callback) }
    }

    /// Calls `callback` on the event loop after each reconnect that subscribed to channels again,
    /// with those channels.
    public func onResubscribed(_ callback: @escaping @Sendable ([String]) -> Void) {
        let channels = self.channels
        run { _ in channels.resubscribedCallbacks.append(callback) }
    }

    public func whenConnected() -> EventLoopFuture<Void> {
        onLoop { $0.whenConnected() }
    }

    /// Adds `channel` to the subscriptions. Succeeds when Redis acknowledges the SUBSCRIBE; fails
    /// at once with `unavailable` if Redis is down (the channel stays registered and is
    /// subscribed at the next connect), or with `invalidCommand` past `maxSubscriptions`.
    public func subscribe(_ channel: String) -> EventLoopFuture<Void> {
        let channels = self.channels
        return onLoop { _ in channels.subscribe(channel) }
    }

    /// Removes `channel` from the subscriptions; succeeds when Redis acknowledges (at once if
    /// not connected, since there is nothing to undo on the server).
    public func unsubscribe(_ channel: String) -> EventLoopFuture<Void> {
        let channels = self.channels
        return onLoop { _ in channels.unsubscribe(channel) }
    }

    /// The registered channels.
    public func subscriptions() -> EventLoopFuture<[String]> {
        let channels = self.channels
        return onLoop { $0.eventLoop.makeSucceededFuture(channels.wanted.sorted()) }
    }

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

extension RedisSubscriber {
    /// The subscription bookkeeping, on the event loop only (hence `@unchecked Sendable`, as
    /// `RedisConnectionCore`).
    final class Channels: @unchecked Sendable {
        private let core: RedisConnectionCore
        private let maxSubscriptions: Int
        /// What the user asked for.
        var wanted: Set<String> = []
        /// What the server acknowledged on the current connection.
        private var onServer: Set<String> = []
        var resubscribedCallbacks: [@Sendable ([String]) -> Void] = []
        /// Channels subscribed by the last handshake, reported once connected.
        private var resubscribed: [String] = []

        init(core: RedisConnectionCore, maxSubscriptions: Int) {
            self.core = core
            self.maxSubscriptions = maxSubscriptions
        }

        private var eventLoop: EventLoop { core.eventLoop }

        func subscribe(_ channel: String) -> EventLoopFuture<Void> {
            if case .closed = core.state { return eventLoop.makeFailedFuture(RedisError.closed) }
            if !wanted.contains(channel) {
                guard wanted.count < maxSubscriptions else {
                    return eventLoop.makeFailedFuture(RedisError.invalidCommand("more than \(maxSubscriptions) subscriptions"))
                }
                wanted.insert(channel)
            }
            return acknowledged("subscribe", channel, core.send(command("SUBSCRIBE", channel)))
                .map { [self] in if wanted.contains(channel) { onServer.insert(channel) } }
        }

        func unsubscribe(_ channel: String) -> EventLoopFuture<Void> {
            wanted.remove(channel)
            guard case .connected = core.state, onServer.contains(channel) else {
                return eventLoop.makeSucceededVoidFuture()
            }
            return acknowledged("unsubscribe", channel, core.send(command("UNSUBSCRIBE", channel)))
                .map { [self] in onServer.remove(channel) }
        }

        /// Part of the handshake: SUBSCRIBE every wanted channel (pipelined), all acknowledged.
        func resubscribe(_ handler: RedisChannelHandler) -> EventLoopFuture<Void> {
            onServer.removeAll()
            let all = wanted.sorted()
            resubscribed = all
            let acks = all.map { channel in
                acknowledged("subscribe", channel, handler.send(command("SUBSCRIBE", channel), eventLoop: eventLoop))
                    .map { [self] in onServer.insert(channel) }
            }
            return EventLoopFuture.andAllSucceed(acks, on: eventLoop)
        }

        /// After connecting: subscribe what was added during the handshake, report the rest.
        func catchUp() {
            for channel in wanted.subtracting(onServer) {
                _ = subscribe(channel)
            }
            let done = resubscribed
            resubscribed = []
            guard !done.isEmpty else { return }
            core.logger.info("redis resubscribed", metadata: ["redis": "\(core.url)", "channels": "\(done.count)"])
            for callback in resubscribedCallbacks { callback(done) }
        }

        func lostServer() {
            onServer.removeAll()
        }

        private func command(_ name: String, _ channel: String) -> ByteBuffer {
            var buffer = ByteBuffer()
            // Cannot fail: two short arguments, well under any bound.
            if let formatted = try? RedisCommandFormatter.format([Array(name.utf8), Array(channel.utf8)], maxBytes: Int.max, allocator: core.allocator) {
                buffer = formatted
            }
            return buffer
        }

        /// Checks an acknowledgement: `[kind, channel, count]`.
        private func acknowledged(_ kind: String, _ channel: String, _ reply: EventLoopFuture<RedisReply>) -> EventLoopFuture<Void> {
            reply.flatMapThrowing { reply in
                switch reply {
                case .array(let items) where items.count == 3 && items[0] == .string(Array(kind.utf8)):
                    return
                case .error(let message):
                    throw RedisError.errorReply("\(kind.uppercased()) \(channel) failed: \(message)")
                default:
                    throw RedisError.protocolError("unexpected reply to \(kind.uppercased()) \(channel)")
                }
            }
        }
    }
}
