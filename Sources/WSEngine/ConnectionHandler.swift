import Logging
import NIOCore
import NIOWebSocket

/// Serves one upgraded connection: turns frames into messages for the application, answers
/// pings, runs the closing handshake and the idle timers.
///
/// Reads the raw bytes after the upgrade: `FrameParser` splits them into frames (refusing bad
/// lengths and oversized or fragmented control frames) and this handler checks everything else
/// RFC 6455 asks of a server: masking, reserved bits, opcodes, fragment order, UTF-8, close
/// payloads.
///
/// States: `open` → `closing` (a close frame was sent; data frames are discarded while the
/// client's close is awaited) → `closed` (the channel is going away). The application hears
/// `opened` once when the handler is added and `closed` once when the channel goes inactive.
final class WebSocketConnectionHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private enum State { case open, closing, closed }

    private struct IdleTimer {
        var interval: TimeAmount
        /// When it last fired (or was set): with the last message, the start of the current wait.
        var anchor: NIODeadline
    }

    private let loop: LoopState
    /// The loop's (one copy per loop, not per connection), borrowed: no copy per access.
    private var configuration: ServerConfiguration { _read { yield loop.configuration } }
    /// The server's connection slots: this connection holds one (taken when its upgrade was
    /// accepted) until `finish`.
    private let slots: ConnectionCounter
    private var state = State.open
    private var parser: FrameParser
    /// Modified for each frame, by calls that never reach the handler again: no run-time
    /// exclusivity check needed (it cost one walk of the set of accesses in progress per frame).
    @exclusivity(unchecked) private var assembler: MessageAssembler
    private var context: ChannelHandlerContext?
    private(set) var connection: WebSocketConnection!
    /// Only until the application has seen it in `opened`; boxed, so that it costs one word of
    /// the handler for the connection's life instead of its ~100 bytes.
    private var request: Box<WebSocketRequest>?
    private let id: Int64

    /// The client's close frame, once received: reported to the application on close.
    private var clientClose: (code: UInt16, reason: String)?
    private var closeTimeout: Scheduled<Void>?

    private var idleTimers: [IdleTimer] = []
    /// Bumped by every `setIdleTimers`: queue entries of an older generation are ignored.
    private var timerGeneration = 0
    /// Read from the loop (`eventLoop.now`), never from `NIODeadline.now()`: on an embedded loop
    /// (`luaws test`) time is virtual, and every deadline must follow the same clock. Set for
    /// real in `handlerAdded`.
    private var lastMessage = NIODeadline.uptimeNanoseconds(0)

    // Keep-alive: a ping after `pingInterval` of silence, a drop after `pongTimeout` more.
    private var lastHeard = NIODeadline.uptimeNanoseconds(0)
    private var pingSentAt: NIODeadline?
    /// Frames are being dropped for this slow consumer (policy .drop): logged once per episode.
    private var dropping = false
    /// The channel's writability, as last reported (asking the channel each send costs).
    private var writable = true

    /// Set while the handler is calling the application: writes are flushed once afterwards.
    private var dispatching = false
    /// Set between a read and the end of its batch: writes are flushed once in channelReadComplete.
    private var reading = false
    private var needsFlush = false

    /// Reading stopped by the application (`setReading(false)`): TCP pushes back on the client.
    private var readingPaused = false

    /// The small frames of the current batch (a read's messages, or one application call's
    /// sends), encoded back to back: written to the channel as one buffer when the batch is
    /// flushed, or as soon as it holds `corkLimit` bytes. One allocation, one trip through the
    /// pipeline and one iovec per batch instead of per frame (and one TLS record). Nil between
    /// batches, so an idle connection holds no buffer. Not yet counted by the channel's
    /// writability: `corkLimit` bounds what it holds beyond `maxOutboundBytes`.
    @exclusivity(unchecked) private var corked: ByteBuffer?
    private static let corkLimit = 64 * 1024

    /// permessage-deflate, if negotiated.
    private let deflate: DeflateParameters?

    /// Messages and bytes each way: plain fields, so counting costs a few additions per message.
    /// Private, so that the optimiser sees every access (an internal one would get a dynamic
    /// exclusivity check per addition); `figures` reads it.
    private var counts = ConnectionCounts()
    var figures: ConnectionCounts { counts }
    /// For the access log line.
    private let remoteAddress: String?
    private var openedAt = NIODeadline.now()

    init(id: Int64, request: WebSocketRequest, deflate: DeflateParameters?, loop: LoopState, slots: ConnectionCounter) {
        self.id = id
        self.deflate = deflate
        self.request = Box(request)
        self.remoteAddress = request.remoteAddress
        self.loop = loop
        self.slots = slots
        self.parser = FrameParser(maxFrameSize: loop.configuration.maxFrameSize)
        self.assembler = MessageAssembler(maxMessageSize: loop.configuration.maxMessageSize)
    }

    // MARK: channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        let request = self.request!.value
        self.request = nil
        connection = WebSocketConnection(id: id, request: request, handler: self)
        loop.connections[id] = self
        loop.closedFigures.paths[request.path, default: EngineFigures.PathFigures()].opened += 1
        lastMessage = context.eventLoop.now
        lastHeard = lastMessage
        openedAt = lastMessage
        dispatch { $0.opened(connection, request: request) }
    }

    func channelInactive(context: ChannelHandlerContext) {
        finish()
        context.fireChannelInactive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        finish()
        self.context = nil
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        reading = false
        flushIfNeeded()
        context.fireChannelReadComplete()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        loop.logger.debug("connection \(id): \(error)")
        context.close(promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard state != .closed else { return }
        reading = true
        lastHeard = context.eventLoop.now  // once per read, not per frame
        pingSentAt = nil
        let bytes = unwrapInboundIn(data)
        counts.bytesReceived &+= bytes.readableBytes
        // The parser is moved out for the parse and back after: the application runs inside
        // it, and a modify access to `parser` held that long would sit in Swift's set of
        // ongoing accesses, making every dynamic exclusivity check of the message path (in
        // NIO's ByteBuffer and the script host alike) walk past it. Nothing else touches the
        // parser meanwhile (reads are not re-entered).
        var parser = FrameParser(maxFrameSize: configuration.maxFrameSize)
        swap(&parser, &self.parser)
        defer { swap(&parser, &self.parser) }
        do {
            try parser.parse(bytes, partial: { frame throws(ProtocolFailure) in
                try receivePartial(frame)
            }) { frame throws(ProtocolFailure) in
                try receive(frame)
                return state != .closed
            }
        } catch {
            fail(error)
        }
    }

    // MARK: frames

    private func receive(_ frame: ClientFrame) throws(ProtocolFailure) {
        guard frame.masked else {
            throw ProtocolFailure(code: ProtocolFailure.protocolError, reason: "unmasked frame from a client")
        }
        // RSV1 marks a compressed message, on its first frame only, when permessage-deflate
        // was negotiated; any other reserved bit is an error.
        let compressed = frame.rsv1
        guard !frame.rsv2, !frame.rsv3,
              !compressed || (deflate != nil && (frame.opcode == .text || frame.opcode == .binary))
        else {
            throw ProtocolFailure(code: ProtocolFailure.protocolError, reason: "reserved bit set that no extension defines")
        }
        let payload = frame.payload

        switch frame.opcode {
        case .text, .binary, .continuation:
            guard state == .open else { return }  // after our close frame, data is discarded
            guard let assembled = try assembler.append(opcode: frame.opcode, fin: frame.fin, compressed: compressed, data: payload) else { return }
            var message = WebSocketMessage(kind: assembled.kind, data: assembled.data)
            if assembled.compressed {
                let limit = configuration.inflateLimit(compressedBytes: assembled.data.readableBytes)
                message.data = try loop.deflate.decompress(assembled.data, limit: limit, allocator: context!.channel.allocator)
                if message.kind == .text { try MessageAssembler.validateText(message.data) }
            }
            lastMessage = lastHeard
            if message.kind == .text { counts.textReceived &+= 1 } else { counts.binaryReceived &+= 1 }
            dispatch { $0.received(message, on: connection) }

        case .ping:
            // A pong is queued like a message: a client that pings but does not read is a slow
            // consumer like any other (else its pongs would pile up without bound).
            guard state == .open, let context, admit(context, message: false) else { return }
            write(.pong, payload)
            needsFlush = true

        case .pong:
            break

        case .connectionClose:
            try receiveClose(payload)

        default:
            throw ProtocolFailure(code: ProtocolFailure.protocolError, reason: "unknown opcode \(frame.opcode)")
        }
    }

    /// The payload so far of a frame still arriving: text is validated as it comes (Autobahn
    /// 6.4.x), so invalid UTF-8 fails the connection without waiting for the rest of the frame.
    /// What only the whole frame can tell (masking, reserved bits, order) is judged by `receive`.
    private func receivePartial(_ frame: ClientFrame) throws(ProtocolFailure) {
        guard state == .open, frame.masked, !frame.rsv2, !frame.rsv3 else { return }
        try assembler.validatePartial(opcode: frame.opcode, compressed: frame.rsv1, data: frame.payload)
    }

    private func receiveClose(_ payload: ByteBuffer) throws(ProtocolFailure) {
        var payload = payload
        var code: UInt16 = 1005
        var reason = ""
        if payload.readableBytes == 1 {
            throw ProtocolFailure(code: ProtocolFailure.protocolError, reason: "close frame with a 1-byte payload")
        }
        if let sent = payload.readInteger(as: UInt16.self) {
            guard Self.isValidCloseCode(sent) else {
                throw ProtocolFailure(code: ProtocolFailure.protocolError, reason: "invalid close code \(sent)")
            }
            code = sent
            try MessageAssembler.validateText(payload)
            reason = payload.readString(length: payload.readableBytes) ?? ""
        }
        clientClose = (code, reason)
        switch state {
        case .open:
            // Echo the code (none if the client sent none), then close the TCP connection.
            state = .closing
            var reply = context!.channel.allocator.buffer(capacity: 2)
            if code != 1005 { reply.writeInteger(code) }
            writeCloseAndShutdown(reply)
        case .closing:
            // The answer to our close frame: the handshake is complete.
            state = .closed
            closeTimeout?.cancel()
            context?.close(promise: nil)
        case .closed:
            break
        }
    }

    /// Codes a peer may send in a close frame (RFC 6455 §7.4, IANA registry).
    static func isValidCloseCode(_ code: UInt16) -> Bool {
        switch code {
        case 1000...1003, 1007...1014, 3000...4999: return true
        default: return false
        }
    }

    /// Fails the connection: a close frame with the failure's code, then the TCP connection closes.
    private func fail(_ failure: ProtocolFailure) {
        loop.logger.debug("connection \(id) failed: \(failure.code) \(failure.reason)")
        guard state == .open, let context else {
            state = .closed
            context?.close(promise: nil)
            return
        }
        state = .closing
        writeCloseAndShutdown(Self.closePayload(code: failure.code, reason: "", allocator: context.channel.allocator))
    }

    private func writeCloseAndShutdown(_ payload: ByteBuffer) {
        guard let context else { return }
        state = .closed
        guard writable else {
            // Over the bound already: the frame would wait behind bytes the client does not
            // read, holding the connection. Best effort, then the TCP connection goes.
            write(.connectionClose, payload)
            flushOutput()
            context.close(promise: nil)
            return
        }
        let loopContext = context.loopBound
        let written = context.eventLoop.makePromise(of: Void.self)
        write(.connectionClose, payload, promise: written)
        flushOutput()
        written.futureResult.whenComplete { _ in loopContext.value.close(promise: nil) }
        // And should the client stop reading before the frame is out, not for longer than this.
        closeTimeout = context.eventLoop.assumeIsolated().scheduleTask(in: configuration.closeTimeout) {
            loopContext.value.close(promise: nil)
        }
    }

    private static func closePayload(code: UInt16, reason: String, allocator: ByteBufferAllocator) -> ByteBuffer {
        var buffer = allocator.buffer(capacity: 2 + reason.utf8.count)
        buffer.writeInteger(code)
        buffer.writeString(reason)
        return buffer
    }

    // MARK: what the application asks for

    func send(_ data: ByteBuffer, binary: Bool) -> Bool {
        guard state == .open, let context, admit(context, message: true) else { return false }
        if binary { counts.binarySent &+= 1 } else { counts.textSent &+= 1 }
        let opcode: WebSocketOpcode = binary ? .binary : .text
        if let deflate, data.readableBytes >= configuration.compressionThreshold,
           let compressed = try? loop.deflate.compress(data, windowBits: deflate.serverWindowBits, allocator: context.channel.allocator) {
            write(opcode, compressed, rsv1: true)
        } else {
            write(opcode, data)
        }
        if dispatching { needsFlush = true } else { flushOutput() }
        return true
    }

    /// Whether one more frame (a message or a pong) may be queued. Not while the channel is not
    /// writable: what is queued for the client is over `maxOutboundBytes` (the high water mark),
    /// so it is a slow consumer and its policy applies (`close`: 1008 and the TCP connection
    /// closes; `drop`: the frame is dropped until the queue drains below half the bound).
    /// `message`: it is a message (not a pong), which counts as dropped when refused.
    private func admit(_ context: ChannelHandlerContext, message: Bool) -> Bool {
        if writable { return true }
        if message { loop.closedFigures.dropped += 1 }
        switch configuration.slowConsumerPolicy {
        case .drop:
            if !dropping { loop.logger.debug("connection \(id): slow consumer, dropping what is sent to it") }
            dropping = true
            return false
        case .close:
            loop.logger.info("connection \(id): slow consumer (over \(configuration.maxOutboundBytes) bytes queued), closing with 1008")
            state = .closed
            let payload = Self.closePayload(code: 1008, reason: "slow consumer", allocator: context.channel.allocator)
            write(.connectionClose, payload)
            flushOutput()
            context.close(promise: nil)
            return false
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        writable = context.channel.isWritable
        if writable { dropping = false }
        context.fireChannelWritabilityChanged()
    }

    func startClose(code: UInt16, reason: String) -> Bool {
        guard state == .open, let context else { return false }
        state = .closing
        var reasonBytes = reason
        while reasonBytes.utf8.count > 123 { reasonBytes.removeLast() }
        let payload = Self.closePayload(code: code, reason: reasonBytes, allocator: context.channel.allocator)
        write(.connectionClose, payload)
        flushOutput()
        let loopContext = context.loopBound
        closeTimeout = context.eventLoop.assumeIsolated().scheduleTask(in: configuration.closeTimeout) {
            loopContext.value.close(promise: nil)
        }
        return true
    }

    /// Stops or restarts reading from the client. While stopped, bytes already read keep being
    /// parsed, nothing more is read, and keep-alive and idle-timeout deadlines pause.
    func setReading(_ reading: Bool) {
        guard let context, readingPaused == reading else { return }
        readingPaused = !reading
        try? context.channel.syncOptions?.setOption(ChannelOptions.autoRead, value: reading)
        if reading {
            let now = context.eventLoop.now
            lastHeard = now
            pingSentAt = nil
            context.read()
        }
    }

    func setIdleTimers(_ intervals: [TimeAmount]) {
        guard let context else { return }
        let now = context.eventLoop.now
        loop.timers.retire(idleTimers.count)
        idleTimers = intervals.enumerated().map { index, interval in
            IdleTimer(interval: interval, anchor: idleTimers.indices.contains(index) ? idleTimers[index].anchor : now)
        }
        timerGeneration += 1
        for index in idleTimers.indices { schedule(timer: index) }
    }

    // MARK: keep-alive and idle timeout

    /// Called by the loop's sweep (`LoopState.sweep`), every fraction of the shortest of these
    /// intervals: one timer per loop instead of one per connection. It pings a silent client,
    /// drops one whose ping went unanswered, and closes one that sent no message for `idleTimeout`.
    func checkKeepAlive(now: NIODeadline) {
        // While the application holds reading back, silence is ours, not the client's.
        guard state == .open, !readingPaused, let context else { return }
        if let sent = pingSentAt, now >= sent + configuration.pongTimeout {
            loop.logger.debug("connection \(id): no answer to ping, dropping")
            state = .closed
            context.close(promise: nil)
            return
        }
        if let idle = configuration.idleTimeout, now >= lastMessage + idle {
            _ = startClose(code: 1001, reason: "idle timeout")
            return
        }
        if pingSentAt == nil, now >= lastHeard + configuration.pingInterval {
            pingSentAt = now
            // Not queued behind bytes the client does not read (that would grow the queue by a
            // ping per interval forever): the pong timeout runs all the same, and drops it if it
            // stays silent.
            guard writable else { return }
            write(.ping, context.channel.allocator.buffer(capacity: 0))
            flushOutput()
        }
    }

    // MARK: idle timers

    /// The wait of timer `index` ends `interval` after the later of its anchor and the last message.
    private func schedule(timer index: Int) {
        let timer = idleTimers[index]
        loop.timers.add(due: max(timer.anchor, lastMessage) + timer.interval, handler: self, timer: index, generation: timerGeneration)
    }

    /// Whether a TimerQueue entry of `generation` is still wanted.
    func wantsTimer(generation: Int) -> Bool {
        state == .open && generation == timerGeneration
    }

    /// From the loop's TimerQueue. Messages do not move queue entries (that would cost work per
    /// message): when an entry comes due early because a message moved the deadline, the timer
    /// just waits for the rest.
    func idleTimerDue(_ index: Int, generation: Int, now: NIODeadline) {
        guard state == .open, generation == timerGeneration, idleTimers.indices.contains(index) else { return }
        let due = max(idleTimers[index].anchor, lastMessage) + idleTimers[index].interval
        if due <= now {
            idleTimers[index].anchor = now
            dispatch { $0.idle(connection, timer: index) }
        }
        if state == .open, generation == timerGeneration { schedule(timer: index) }
    }

    /// Completes when the channel has closed.
    var closeFuture: EventLoopFuture<Void> {
        context?.channel.closeFuture ?? loop.eventLoop.makeSucceededVoidFuture()
    }

    /// Closes the TCP connection without a handshake (one is already under way or done).
    func closeNow() {
        context?.close(promise: nil)
    }

    // MARK: helpers

    /// One line per closed connection, key=value pairs (logfmt), at info.
    private func logAccess(path: String, code: UInt16) {
        let milliseconds = max(0, (NIODeadline.now() - openedAt).nanoseconds / 1_000_000)
        let seconds = "\(milliseconds / 1000)." + String(milliseconds % 1000 + 1000).dropFirst()
        loop.logger.info("access id=\(id) remote=\(remoteAddress ?? "-") path=\(path) duration=\(seconds)s messages_in=\(counts.messagesReceived) bytes_in=\(counts.bytesReceived) messages_out=\(counts.messagesSent) bytes_out=\(counts.bytesSent) code=\(code)")
    }

    /// Encodes and queues one frame (flushed later); `promise` completes when it is written.
    /// Small frames without a promise join `corked`; anything else goes after what is corked.
    private func write(_ opcode: WebSocketOpcode, _ payload: ByteBuffer, rsv1: Bool = false, promise: EventLoopPromise<Void>? = nil) {
        guard let out = self.context else {
            promise?.fail(ChannelError.ioOnClosedChannel)
            return
        }
        let length = payload.readableBytes
        if promise == nil, length <= FrameWriter.copyLimit {
            var buffer = corked ?? out.channel.allocator.buffer(capacity: max(FrameWriter.headerSize(length) + length, 1024))
            corked = nil  // the buffer is unique while it is written to: no copy
            counts.bytesSent &+= FrameWriter.append(opcode: opcode, rsv1: rsv1, payload: payload, to: &buffer)
            if buffer.readableBytes >= Self.corkLimit {
                out.write(wrapOutboundOut(buffer), promise: nil)
            } else {
                corked = buffer
            }
            return
        }
        uncork(out)
        FrameWriter.frame(opcode: opcode, rsv1: rsv1, payload: payload, allocator: out.channel.allocator) { bytes, last in
            counts.bytesSent &+= bytes.readableBytes
            out.write(wrapOutboundOut(bytes), promise: last ? promise : nil)
        }
    }

    /// Hands what is corked to the channel (not flushed).
    private func uncork(_ out: ChannelHandlerContext) {
        guard let buffer = corked else { return }
        corked = nil
        out.write(wrapOutboundOut(buffer), promise: nil)
    }

    /// Writes what is corked and flushes.
    private func flushOutput() {
        guard let out = self.context else {
            corked = nil
            return
        }
        uncork(out)
        out.flush()
    }

    private func flushIfNeeded() {
        if needsFlush {
            needsFlush = false
            flushOutput()
        }
    }

    /// Calls the application with writes batched; a nested call (the application sending to
    /// this connection from its own callback) just joins the batch.
    private func dispatch(_ body: (WebSocketApplication) -> Void) {
        let outer = !dispatching
        dispatching = true
        body(loop.application)
        if outer {
            dispatching = false
            if !reading { flushIfNeeded() }
        }
    }

    /// Runs once, when the channel goes away: timers stop and the application hears `closed`.
    private func finish() {
        guard loop.connections.removeValue(forKey: id) != nil else { return }
        slots.release()
        state = .closed
        closeTimeout?.cancel()
        loop.timers.retire(idleTimers.count)
        idleTimers = []
        timerGeneration += 1  // its queue entries are now ignored
        let code = clientClose?.code ?? 1006
        let reason = clientClose?.reason ?? ""
        let connection = self.connection!
        loop.closedFigures.paths[connection.path, default: EngineFigures.PathFigures()].add(counts)
        loop.closedFigures.closed[EngineFigures.closeCodeLabel(code), default: 0] += 1
        if configuration.accessLog { logAccess(path: connection.path, code: code) }
        connection.handler = nil  // the handler and its connection refer to each other until now
        let application = loop.application
        if dispatching {
            // Never re-enter the application from inside its own call.
            context?.eventLoop.assumeIsolated().execute { application.closed(connection, code: code, reason: reason) }
        } else {
            application.closed(connection, code: code, reason: reason)
        }
    }
}

/// A value kept out of line (see `WebSocketConnectionHandler.request`).
final class Box<Value> {
    let value: Value
    init(_ value: Value) { self.value = value }
}
