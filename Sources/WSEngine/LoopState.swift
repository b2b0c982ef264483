import Logging
import NIOCore

/// What one event loop owns: its application instance and its open connections.
/// Touched only on that loop (it is handed around inside `NIOLoopBound`).
final class LoopState {
    let application: WebSocketApplication
    let logger: Logger
    let eventLoop: EventLoop
    var connections: [Int64: WebSocketConnectionHandler] = [:]
    /// The idle timers of the loop's connections.
    let timers: TimerQueue
    /// permessage-deflate streams shared by the loop's connections (no context takeover).
    let deflate: DeflateStreams
    /// Connection ids are `loopIndex << 48 | counter`, unique across loops without atomics.
    private var nextID: Int64

    init(index: Int, eventLoop: EventLoop, application: WebSocketApplication, logger: Logger, compressionLevel: Int32) {
        self.deflate = DeflateStreams(level: compressionLevel)
        self.eventLoop = eventLoop
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
            let now = NIODeadline.now()
            for handler in state.value.connections.values { handler.checkKeepAlive(now: now) }
        }
    }

    func makeID() -> Int64 {
        nextID += 1
        return nextID
    }
}
