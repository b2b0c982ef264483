import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import RedisClient
import ScriptHost

/// `luaws.publish`, `luaws.broadcast` and `conn:subscribe` across processes (`--cluster`):
/// one Redis connection publishes (so one process's messages keep their order) and one
/// subscriber connection receives, subscribed to a channel while some local connection wants
/// it (ScriptCluster counts), and resubscribed after a reconnect (RedisSubscriber does that).
///
/// A message travels as `<origin> <seq> <payload>`: a process drops its own (it delivered them
/// locally already) and counts gaps in another's sequence as messages lost (an outage).
final class RedisBus: MessageBus {
    private let origin: String
    private let prefix: String
    private let paths: [String]
    private let publisher: RedisConnection
    private let subscriber = NIOLockedValueBox<RedisSubscriber?>(nil)
    private let url: RedisURL
    private let eventLoop: EventLoop
    private let logger: Logger
    private let sequence = NIOLockedValueBox<UInt64>(0)
    /// The last sequence number seen from each other process.
    private let lastSeen = NIOLockedValueBox<[String: UInt64]>([:])
    private let counters = NIOLockedValueBox((lost: 0, unsent: 0))
    /// Bytes handed to the publishing connection and not yet answered by Redis: a stalled
    /// Redis must not make the process hold every message published meanwhile.
    private let pendingBytes = NIOLockedValueBox(0)
    static let maxPendingBytes = 64 << 20

    init(url: RedisURL, prefix: String, webSocketPaths: [String], logger: Logger) {
        self.url = url
        self.prefix = prefix
        self.paths = webSocketPaths
        self.logger = logger
        eventLoop = MultiThreadedEventLoopGroup.singleton.next()
        origin = (0..<4).map { _ in String(UInt32.random(in: .min ... .max), radix: 16) }.joined()
        publisher = RedisConnection(url: url, eventLoop: eventLoop, logger: logger)
    }

    var isLinked: Bool { publisher.state == .connected }

    /// Messages other processes sent that never arrived, and messages this one could not send.
    var lostMessages: Int { counters.withLockedValue { $0.lost } }
    var unsentMessages: Int { counters.withLockedValue { $0.unsent } }
    var linkState: String {
        switch publisher.state {
        case .connected: "connected"
        case .connecting: "connecting"
        case .disconnected: "disconnected"
        case .closed: "closed"
        }
    }

    private func channelName(_ channel: String) -> String { prefix + "c:" + channel }
    private func broadcastName(_ path: String) -> String { prefix + "b:" + path }

    func publish(channel: String, text: String) -> String? { send(to: channelName(channel), text) }
    func broadcast(path: String, text: String) -> String? { send(to: broadcastName(path), text) }

    private func send(to redisChannel: String, _ text: String) -> String? {
        guard isLinked else {
            counters.withLockedValue { $0.unsent += 1 }
            return "redis unavailable: delivered in this process only"
        }
        let seq = sequence.withLockedValue { value -> UInt64 in
            value += 1
            return value
        }
        let envelope = Array("\(origin) \(seq) ".utf8) + Array(text.utf8)
        let size = envelope.count
        let accepted = pendingBytes.withLockedValue { pending in
            guard pending == 0 || pending + size <= Self.maxPendingBytes else { return false }
            pending += size
            return true
        }
        guard accepted else {
            counters.withLockedValue { $0.unsent += 1 }
            return "redis backlog full (Redis is slow): delivered in this process only"
        }
        let counters = self.counters, pendingBytes = self.pendingBytes
        publisher.send([Array("PUBLISH".utf8), Array(redisChannel.utf8), envelope]).whenComplete { result in
            pendingBytes.withLockedValue { $0 -= size }
            if case .failure = result { counters.withLockedValue { $0.unsent += 1 } }
        }
        return nil
    }

    func subscribe(_ channel: String) -> EventLoopFuture<Void> {
        guard let subscriber = subscriber.withLockedValue({ $0 }) else { return eventLoop.makeSucceededVoidFuture() }
        return subscriber.subscribe(channelName(channel))
    }

    func unsubscribe(_ channel: String) {
        _ = subscriber.withLockedValue { $0 }?.unsubscribe(channelName(channel))
    }

    func start(onMessage: @escaping @Sendable (String, String) -> Void, onBroadcast: @escaping @Sendable (String, String) -> Void) {
        let origin = self.origin, prefix = self.prefix
        let lastSeen = self.lastSeen, counters = self.counters
        let made = RedisSubscriber(url: url, eventLoop: eventLoop, logger: logger) { redisChannel, payload in
            // "<origin> <seq> <text>"
            guard let firstSpace = payload.firstIndex(of: UInt8(ascii: " ")),
                  let secondSpace = payload[(firstSpace + 1)...].firstIndex(of: UInt8(ascii: " ")),
                  let seq = UInt64(String(decoding: payload[(firstSpace + 1)..<secondSpace], as: UTF8.self))
            else { return }
            let sender = String(decoding: payload[..<firstSpace], as: UTF8.self)
            guard sender != origin else { return }
            lastSeen.withLockedValue { seen in
                if let last = seen[sender], seq > last + 1 { counters.withLockedValue { $0.lost += Int(seq - last - 1) } }
                seen[sender] = max(seen[sender] ?? 0, seq)
            }
            let text = String(decoding: payload[(secondSpace + 1)...], as: UTF8.self)
            if redisChannel.hasPrefix(prefix + "c:") {
                onMessage(String(redisChannel.dropFirst(prefix.count + 2)), text)
            } else if redisChannel.hasPrefix(prefix + "b:") {
                onBroadcast(String(redisChannel.dropFirst(prefix.count + 2)), text)
            }
        }
        subscriber.withLockedValue { $0 = made }
        for path in paths { _ = made.subscribe(broadcastName(path)) }
        let logger = self.logger
        made.onResubscribed { channels in logger.info("redis link back: \(channels.count) channel(s) subscribed again") }
    }

    /// Waits up to `timeout` for the link (`--redis-required`).
    func waitForLink(timeout: TimeAmount) async -> Bool {
        let deadline = eventLoop.scheduleTask(in: timeout) {}
        let linked = publisher.whenConnected().map { true }
        let outcome = linked.or(deadline.futureResult.map { false })
        return (try? await outcome.get()) ?? false
    }

    func shutdown() async {
        try? await publisher.close().get()
        if let made = subscriber.withLockedValue({ $0 }) { try? await made.close().get() }
    }
}

extension EventLoopFuture where Value == Bool {
    /// The first of two answers.
    fileprivate func or(_ other: EventLoopFuture<Bool>) -> EventLoopFuture<Bool> {
        let promise = eventLoop.makePromise(of: Bool.self)
        whenComplete { promise.completeWith($0) }
        other.whenComplete { promise.completeWith($0) }
        return promise.futureResult
    }
}
