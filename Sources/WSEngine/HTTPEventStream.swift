import NIOConcurrencyHelpers
import NIOCore

/// A Server-Sent Events endpoint (`text/event-stream`): every event published reaches each client
/// subscribed at the stream's path (`ServerConfiguration.eventStreams`,
/// `AdminListener.eventStreams`), and the last ones are replayed to a client that subscribes
/// later. What the events mean is the publisher's business; `publish` may be called from any
/// thread.
///
/// Everything it holds is bounded, since a client that stops reading must cost the server a
/// known amount of memory, not what the publisher produces meanwhile:
/// - the history: the last `Limits.history` events, at most `Limits.historyBytes` together;
/// - each subscriber's queue: at most `Limits.maxQueuedBytes` of encoded events. A subscriber
///   whose queue is full skips events until it has read half of it; it then gets an
///   `event: skipped` whose data is how many it missed, where they would have been;
/// - the subscribers: at most `Limits.maxSubscribers` (more get 503);
/// - an event: at most `Limits.maxEventBytes` encoded (a larger one is not published).
///
/// A subscriber's events are written only while its channel is writable (what the socket has not
/// taken stays under the listener's outbound bound); one whose channel stays unwritable for
/// `Limits.stallTimeout` is closed. Events carry ids (`EPOCH-N`, the epoch random per stream), so
/// a client that reconnects with `Last-Event-ID` (as `EventSource` does) gets only what it missed
/// from the history, and one that saw another stream (the process before a restart) all of it.
public final class HTTPEventStream: Sendable {
    public struct Limits: Sendable {
        /// Events kept for clients that subscribe later …
        public var history = 200
        /// … and their encoded bytes at most.
        public var historyBytes = 256 << 10
        /// Clients subscribed at once; one more gets 503.
        public var maxSubscribers = 16
        /// Encoded bytes waiting for one subscriber; past this it skips events. At least
        /// `historyBytes`, so that the whole history can be replayed.
        public var maxQueuedBytes = 512 << 10
        /// Largest encoded event; a larger one is not published.
        public var maxEventBytes = 16 << 10
        /// A comment line goes to a subscriber that got nothing for this long, so that proxies
        /// and the client see the stream alive (and a vanished client is noticed).
        public var keepAlive: TimeAmount = .seconds(15)
        /// A subscriber whose channel stays unwritable this long (it reads nothing) is closed.
        public var stallTimeout: TimeAmount = .seconds(60)
        /// The delay `EventSource` waits before reconnecting (`retry:`); nil: the client's own.
        public var reconnectDelay: TimeAmount? = .seconds(2)

        public init() {}
    }

    /// An entry of a subscriber's queue: an encoded event, or events skipped there.
    enum Item {
        case event(ByteBuffer)
        case skipped(Int)

        /// What a skip marker is counted as.
        static let skipCost = 32
        var cost: Int {
            switch self {
            case .event(let buffer): buffer.readableBytes
            case .skipped: Self.skipCost
            }
        }
    }

    private struct Subscriber {
        let eventLoop: EventLoop
        var queue = CircularBuffer<Item>()
        var queuedBytes = 0
        /// Full: events are skipped until the queue drains below half.
        var skipping = false
        /// The subscriber must be woken for the next event (it has taken everything).
        var needsWake = false
        var wake: (@Sendable () -> Void)?

        mutating func enqueue(_ buffer: ByteBuffer, limit: Int) {
            // Once full, skip until half is read: one marker per gap, not one per event that
            // happens to fit in between (the markers stay a handful, their bytes bounded too).
            if skipping && queuedBytes > limit / 2 { return skip() }
            skipping = false
            guard queuedBytes + buffer.readableBytes <= limit else {
                skipping = true
                return skip()
            }
            queue.append(.event(buffer))
            queuedBytes += buffer.readableBytes
        }

        mutating func skip() {
            if case .skipped(let count) = queue.last {
                queue[queue.index(before: queue.endIndex)] = .skipped(count + 1)
            } else {
                queue.append(.skipped(1))
                queuedBytes += Item.skipCost
            }
        }

        mutating func wakeIfNeeded() {
            guard needsWake, let wake else { return }
            needsWake = false
            // Under the stream's lock: `close` cannot run between the check and this, so no task
            // reaches a loop after the server stopped it (the server closes its streams first).
            eventLoop.execute(wake)
        }
    }

    private struct State {
        var nextID: UInt64 = 1
        var history = CircularBuffer<(id: UInt64, event: ByteBuffer)>()
        var historyBytes = 0
        var subscribers: [Int: Subscriber] = [:]
        var nextSubscriber = 0
        var closed = false
        /// Events not published because they were larger than `maxEventBytes`.
        var oversized = 0
    }

    public let limits: Limits
    private let state = NIOLockedValueBox(State())
    /// The first part of this stream's event ids.
    private let epoch = String(UInt32.random(in: 1...UInt32.max), radix: 16)

    public init(limits: Limits = Limits()) {
        var limits = limits
        limits.maxQueuedBytes = max(limits.maxQueuedBytes, limits.historyBytes, 1)
        limits.maxSubscribers = max(limits.maxSubscribers, 0)
        self.limits = limits
    }

    /// Sends `event` to every subscriber and keeps it in the history. False if it was not
    /// published: larger than `maxEventBytes` encoded.
    @discardableResult
    public func publish(_ event: ServerSentEvent) -> Bool {
        let fields = event.encodedFields()
        let limits = self.limits
        return state.withLockedValue { state in
            let id = state.nextID
            var buffer = ByteBuffer()
            buffer.reserveCapacity(fields.utf8.count + 24)
            buffer.writeString("id: \(epoch)-\(id)\n")
            buffer.writeString(fields)
            guard buffer.readableBytes <= limits.maxEventBytes else {
                state.oversized += 1
                return false
            }
            state.nextID += 1
            state.history.append((id, buffer))
            state.historyBytes += buffer.readableBytes
            while state.history.count > limits.history || state.historyBytes > limits.historyBytes, let oldest = state.history.popFirst() {
                state.historyBytes -= oldest.event.readableBytes
            }
            // Once closed (the server stops), nothing more reaches a loop: they may be gone.
            guard !state.closed else { return true }
            for key in state.subscribers.keys {
                state.subscribers[key]!.enqueue(buffer, limit: limits.maxQueuedBytes)
                state.subscribers[key]!.wakeIfNeeded()
            }
            return true
        }
    }

    /// Clients subscribed now.
    public var subscriberCount: Int { state.withLockedValue { $0.subscribers.count } }

    /// Events refused for their size since the start.
    public var oversizedCount: Int { state.withLockedValue { $0.oversized } }

    /// Ends every subscription (their connections close) and refuses new ones: the server stops.
    public func close() {
        state.withLockedValue { state in
            state.closed = true
            for subscriber in state.subscribers.values {
                if let wake = subscriber.wake { subscriber.eventLoop.execute(wake) }
            }
        }
    }

    // MARK: the subscriber's side (EventStreamHandler)

    /// A new subscriber on `eventLoop`, its queue filled with the history (what came after
    /// `lastEventID`, if the client says what it saw last); nil if there are `maxSubscribers`
    /// already or the stream is closed.
    func subscribe(lastEventID: String?, on eventLoop: EventLoop) -> Int? {
        let limits = self.limits
        // An id of another stream (of the process before a restart, say): everything is new.
        let parts = lastEventID?.split(separator: "-", maxSplits: 1)
        let seenHere = parts.flatMap { $0.count == 2 && $0[0] == epoch ? UInt64($0[1]) : nil }
        return state.withLockedValue { state in
            guard !state.closed, state.subscribers.count < limits.maxSubscribers else { return nil }
            var subscriber = Subscriber(eventLoop: eventLoop)
            let seen = seenHere.flatMap { $0 < state.nextID ? $0 : nil } ?? 0
            if let oldest = state.history.first?.id, seen > 0, oldest > seen + 1 {
                subscriber.queue.append(.skipped(Int(oldest - seen - 1)))
                subscriber.queuedBytes += Item.skipCost
            }
            for (id, event) in state.history where id > seen {
                subscriber.enqueue(event, limit: limits.maxQueuedBytes)
            }
            let key = state.nextSubscriber
            state.nextSubscriber += 1
            state.subscribers[key] = subscriber
            return key
        }
    }

    /// Sets what wakes the subscriber (on its loop) when an event comes for it after it took
    /// everything, or when the stream closes. It is not woken for what is queued already: it
    /// takes that right after.
    func attach(_ key: Int, wake: @escaping @Sendable () -> Void) {
        state.withLockedValue { state in
            state.subscribers[key]?.wake = wake
        }
    }

    /// Up to about `bytes` of the subscriber's queue, encoded, in order; empty if there is
    /// nothing (the next event wakes it). `closed`: the stream was closed (or the subscriber is
    /// gone): the connection should end.
    func take(_ key: Int, upTo bytes: Int) -> (buffers: [ByteBuffer], closed: Bool) {
        state.withLockedValue { state in
            guard !state.closed, var subscriber = state.subscribers[key] else { return ([], true) }
            var buffers: [ByteBuffer] = []
            var taken = 0
            while taken < bytes, let item = subscriber.queue.popFirst() {
                subscriber.queuedBytes -= item.cost
                taken += item.cost
                switch item {
                case .event(let buffer): buffers.append(buffer)
                case .skipped(let count): buffers.append(ByteBuffer(string: ServerSentEvent.skipped(count)))
                }
            }
            if subscriber.queue.isEmpty { subscriber.needsWake = true }
            state.subscribers[key] = subscriber
            return (buffers, false)
        }
    }

    /// Whether the subscription is over (the stream closed).
    func isClosed(_ key: Int) -> Bool {
        state.withLockedValue { $0.closed || $0.subscribers[key] == nil }
    }

    /// The subscriber's connection is gone: its queue goes with it.
    func unsubscribe(_ key: Int) {
        state.withLockedValue { state in
            state.subscribers[key] = nil
        }
    }

    /// Bytes queued for the subscriber (tests).
    func queuedBytes(_ key: Int) -> Int {
        state.withLockedValue { $0.subscribers[key]?.queuedBytes ?? 0 }
    }
}
