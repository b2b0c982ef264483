import NIOCore
import NIOHTTP1

/// Serves one subscriber of an `HTTPEventStream`: the response head, then its events for as long
/// as the connection lasts. `HTTPHandler` puts it behind itself when a GET asks for a stream's
/// path; from then on the connection is the stream's (the response never ends, so NIO's pipeline
/// handler hands over no further request).
///
/// Writes only while the channel is writable, and takes from the subscriber's queue only then:
/// what a client does not read waits in the queue, which the stream bounds. A channel that stays
/// unwritable for `stallTimeout` is closed; one that got nothing for `keepAlive` gets a comment.
final class EventStreamHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let stream: HTTPEventStream
    private let key: Int
    private let head: HTTPRequestHead
    private var keepAlive: RepeatedTask?
    private var wroteSinceTick = false
    private var stalledFor = TimeAmount.zero
    private var draining = false
    private var ended = false

    /// Takes at most this much of the queue per write (then flushes, and goes on while writable).
    static let batchBytes = 64 << 10
    /// The connection's write buffer marks while it streams: what the socket has not taken stays
    /// this small (not the listener's `maxOutboundBytes`); the rest waits in the subscriber's
    /// queue, where the stream bounds it and skips what does not fit.
    static let writeBufferWaterMark = ChannelOptions.Types.WriteBufferWaterMark(low: 32 << 10, high: 64 << 10)

    init(stream: HTTPEventStream, subscriber key: Int, head: HTTPRequestHead) {
        self.stream = stream
        self.key = key
        self.head = head
    }

    /// The `Last-Event-ID` a reconnecting client sends.
    static func lastEventID(_ head: HTTPRequestHead) -> String? {
        head.headers["Last-Event-ID"].first.map { $0.trimmingCharacters(in: .whitespaces) }
    }

    func handlerAdded(context: ChannelHandlerContext) {
        try? context.channel.syncOptions?.setOption(.writeBufferWaterMark, value: Self.writeBufferWaterMark)
        var headers = HTTPHeaders([
            ("Content-Type", "text/event-stream; charset=utf-8"),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
            // nginx buffers a proxied response unless told not to: events would arrive in lumps.
            ("X-Accel-Buffering", "no"),
        ])
        if !head.isKeepAlive { headers.add(name: "Connection", value: "close") }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: .ok, headers: headers))), promise: nil)
        // Something at once, so that the client (and any proxy) sees the stream open.
        var opening = ": luaws event stream\n"
        if let delay = stream.limits.reconnectDelay { opening += "retry: \(delay.nanoseconds / 1_000_000)\n" }
        opening += "\n"
        context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: opening)))), promise: nil)
        context.flush()

        let interval = stream.limits.keepAlive
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        keepAlive = context.eventLoop.scheduleRepeatedTask(initialDelay: interval, delay: interval) { _ in
            let (handler, context) = bound.value
            handler.tick(context: context, interval: interval)
        }
        stream.attach(key) {
            let (handler, context) = bound.value
            handler.wake(context: context)
        }
        drain(context: context)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        end()
    }

    func channelInactive(context: ChannelHandlerContext) {
        end()
        context.fireChannelInactive()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable {
            stalledFor = .zero
            drain(context: context)
        }
        context.fireChannelWritabilityChanged()
    }

    private func end() {
        guard !ended else { return }
        ended = true
        keepAlive?.cancel()
        keepAlive = nil
        stream.unsubscribe(key)
    }

    /// Events came (or the stream closed).
    private func wake(context: ChannelHandlerContext) {
        guard !ended else { return }
        if stream.isClosed(key) {
            finish(context: context)
        } else {
            drain(context: context)
        }
    }

    /// Writes what is queued while the channel takes it.
    private func drain(context: ChannelHandlerContext) {
        guard !draining, !ended else { return }
        draining = true
        defer { draining = false }
        while context.channel.isWritable {
            let (buffers, closed) = stream.take(key, upTo: Self.batchBytes)
            if closed { return finish(context: context) }
            if buffers.isEmpty { return }
            for buffer in buffers { context.write(wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil) }
            wroteSinceTick = true
            context.flush()
        }
    }

    private func tick(context: ChannelHandlerContext, interval: TimeAmount) {
        guard !ended else { return }
        if stream.isClosed(key) { return finish(context: context) }
        guard context.channel.isWritable else {
            stalledFor = stalledFor + interval
            if stalledFor >= stream.limits.stallTimeout { context.close(promise: nil) }
            return
        }
        stalledFor = .zero
        if !wroteSinceTick {
            context.writeAndFlush(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: ":\n\n")))), promise: nil)
        }
        wroteSinceTick = false
    }

    /// The stream closed (the server stops): the response ends and so does the connection.
    private func finish(context: ChannelHandlerContext) {
        end()
        // Closed right away, not once the end is written: a client that reads nothing would
        // hold the connection (and the server's shutdown) otherwise.
        context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
        context.close(promise: nil)
    }
}
