import NIOCore

/// The Redis end of one TCP connection: commands go out in order, replies come back in the same
/// order (RESP has no request ids), so each reply completes the oldest waiting promise.
///
/// Commands are handed to `send(_:)` directly (on the event loop) rather than written through
/// the pipeline, so that the in-flight count is exact at the moment a command is accepted or
/// refused. Writes are flushed once per event-loop tick, so a burst of commands from one tick
/// leaves in a few large writes.
///
/// In subscriber mode (`onPush` set), `message` pushes go to `onPush` instead of the queue;
/// SUBSCRIBE/UNSUBSCRIBE acknowledgements are ordinary replies, one per channel, in order.
///
/// Any failure (reader error, unexpected reply, timeout, close) fails every waiting promise and
/// closes the channel: after that the byte stream cannot be trusted.
final class RedisChannelHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private struct Pending {
        var promise: EventLoopPromise<RedisReply>
        var sent: NIODeadline
    }

    private let reader: HiredisReader
    private let maxInFlight: Int
    private let commandTimeout: TimeAmount?
    private let onPush: (@Sendable (RedisReply) -> Void)?

    private var context: ChannelHandlerContext?
    private var pending = CircularBuffer<Pending>()
    private var flushScheduled = false
    private var timeoutTask: Scheduled<Void>?
    /// Set once the connection has failed; later commands fail with it.
    private var failure: RedisError?

    init(configuration: RedisConfiguration, onPush: (@Sendable (RedisReply) -> Void)? = nil) {
        self.reader = HiredisReader(maxReplyBytes: configuration.maxReplyBytes, maxArrayElements: configuration.maxArrayElements)
        self.maxInFlight = configuration.maxInFlight
        self.commandTimeout = configuration.commandTimeout
        self.onPush = onPush
    }

    var inFlight: Int { pending.count }

    /// False once the connection has failed (it is closing, or closed).
    var isUsable: Bool { failure == nil && context != nil }

    /// Sends one formatted command; the future completes with its reply. On the event loop only.
    func send(_ command: ByteBuffer, eventLoop: EventLoop) -> EventLoopFuture<RedisReply> {
        eventLoop.preconditionInEventLoop()
        guard let context, failure == nil else {
            return eventLoop.makeFailedFuture(failure ?? RedisError.connectionLost)
        }
        guard pending.count < maxInFlight else {
            return eventLoop.makeFailedFuture(RedisError.tooManyInFlight(limit: maxInFlight))
        }
        let promise = eventLoop.makePromise(of: RedisReply.self)
        pending.append(Pending(promise: promise, sent: .now()))
        if timeoutTask == nil { armTimeout() }
        context.write(wrapOutboundOut(command), promise: nil)
        if !flushScheduled {
            flushScheduled = true
            eventLoop.assumeIsolated().execute {
                self.flushScheduled = false
                self.context?.flush()
            }
        }
        return promise.futureResult
    }

    /// Fails every waiting command with `error` and closes the connection.
    func fail(_ error: RedisError) {
        guard failure == nil else { return }
        failure = error
        timeoutTask?.cancel()
        timeoutTask = nil
        let waiting = pending
        pending.removeAll()
        for entry in waiting { entry.promise.fail(error) }
        context?.close(promise: nil)
    }

    // MARK: ChannelInboundHandler

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        fail(.connectionLost)
        self.context = nil
    }

    func channelInactive(context: ChannelHandlerContext) {
        fail(.connectionLost)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        fail(error as? RedisError ?? .connectionLost)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard failure == nil else { return }
        let bytes = unwrapInboundIn(data)
        do throws(RedisError) {
            try reader.feed(bytes)
            while failure == nil, let reply = try reader.next() {
                deliver(reply)
            }
        } catch {
            fail(error)
        }
    }

    private func deliver(_ reply: RedisReply) {
        if let onPush, Self.isPush(reply) {
            onPush(reply)
            return
        }
        guard let entry = pending.popFirst() else {
            fail(.protocolError("a reply nobody asked for"))
            return
        }
        entry.promise.succeed(reply)
    }

    /// A pub/sub message: `["message", channel, payload]`.
    private static func isPush(_ reply: RedisReply) -> Bool {
        guard case .array(let items) = reply, items.count == 3, case .string(let kind) = items[0] else { return false }
        return kind == Array("message".utf8)
    }

    /// One timer at a time, set for the oldest waiting command. Replies do not touch it: when it
    /// fires it looks at whichever command is oldest by then and either gives up on the
    /// connection or re-arms for that command, so a burst of replies costs no timer work.
    private func armTimeout() {
        guard let commandTimeout, let context, let oldest = pending.first else { return }
        timeoutTask = context.eventLoop.assumeIsolated().scheduleTask(deadline: oldest.sent + commandTimeout) {
            self.timeoutTask = nil
            guard self.failure == nil, let oldest = self.pending.first else { return }
            if oldest.sent + commandTimeout <= .now() {
                self.fail(.timeout)
            } else {
                self.armTimeout()
            }
        }
    }
}
