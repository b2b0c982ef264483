import Logging
import NIOCore

/// What one event loop owns: its application instance and its open connections.
/// Touched only on that loop (it is handed around inside `NIOLoopBound`).
final class LoopState {
    let application: WebSocketApplication
    let logger: Logger
    let eventLoop: EventLoop
    /// The server's configuration, held once here rather than by each connection handler (a
    /// copy per connection cost ~0.25 KB).
    let configuration: ServerConfiguration
    var connections: [Int64: WebSocketConnectionHandler] = [:]
    /// The idle timers of the loop's connections.
    let timers: TimerQueue
    /// permessage-deflate streams shared by the loop's connections (no context takeover).
    let deflate: DeflateStreams
    /// Connection ids are `loopIndex << 48 | counter`, unique across loops without atomics.
    private var nextID: Int64
    /// What the loop's closed connections did, connections opened, handshakes refused, messages
    /// dropped. Open connections count on their own fields: see `figures()`.
    var closedFigures = EngineFigures()

    init(index: Int, eventLoop: EventLoop, application: WebSocketApplication, logger: Logger, configuration: ServerConfiguration) {
        self.deflate = DeflateStreams(level: configuration.compressionLevel)
        self.eventLoop = eventLoop
        self.configuration = configuration
        self.timers = TimerQueue(eventLoop: eventLoop)
        self.application = application
        self.logger = logger
        self.nextID = Int64(index) << 48
    }

    private var sweep: RepeatedTask?

    /// Starts the keep-alive sweep: every `interval`, each connection checks its ping, pong
    /// and idle deadlines (`WebSocketConnectionHandler.checkKeepAlive`).
    func startSweep(every interval: TimeAmount) {
        let state = NIOLoopBound(self, eventLoop: eventLoop)
        sweep = eventLoop.scheduleRepeatedTask(initialDelay: interval, delay: interval) { _ in
            let now = state.value.eventLoop.now  // the loop's clock: virtual on an embedded loop
            for handler in state.value.connections.values { handler.checkKeepAlive(now: now) }
        }
    }

    /// Stops the sweep and closes every connection of the loop with `code` (those already
    /// closing just close); completes, on this loop, when all are closed. Clients that have not
    /// answered within `grace` are disconnected.
    func closeAll(code: UInt16, reason: String, grace: TimeAmount) -> EventLoopFuture<Void> {
        sweep?.cancel()
        sweep = nil
        // First, so that work the application is waiting for ends now and what queued behind
        // it (the connections' closes) runs before the loop stops.
        application.stopping()
        let closed = connections.values.map { handler in
            let closed = handler.closeFuture
            if !handler.connection.close(code: code, reason: reason) { handler.closeNow() }
            return closed
        }
        let all = EventLoopFuture.andAllComplete(closed, on: eventLoop)
        let state = NIOLoopBound(self, eventLoop: eventLoop)
        let deadline = eventLoop.assumeIsolated().scheduleTask(in: grace) {
            for handler in state.value.connections.values { handler.closeNow() }
        }
        all.whenComplete { _ in deadline.cancel() }
        return all
    }

    /// The loop's figures so far: those of closed connections plus those of open ones.
    func figures() -> EngineFigures {
        var figures = closedFigures
        for handler in connections.values {
            let path = handler.connection.path
            figures.paths[path, default: EngineFigures.PathFigures()].add(handler.figures)
            figures.paths[path]!.connections += 1
        }
        return figures
    }

    func makeID() -> Int64 {
        nextID += 1
        return nextID
    }
}
