import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore

/// What the last reload did, for logs and `/luaws/status`.
public struct ReloadStatus: Sendable {
    /// Goes up by one with every plugin set that loads.
    public var version = 0
    public var plugins: [String] = []
    public var lastReloadAt: Date?
    public var lastReloadOK = true
    /// `file:line: message` of the last reload that failed, until one succeeds.
    public var lastError: String?
}

/// Everything the Lua states of one server share: the plugin set and its reloads, channels and
/// broadcast across event loops, and the shared store. Thread-safe; each `PluginHost` stays on
/// its own loop and is reached only through that loop.
public final class ScriptCluster: Sendable {
    private struct Member: Sendable {
        let eventLoop: EventLoop
        let host: NIOLoopBound<PluginHost>
    }

    public let vars: [String: String]
    public let limits: ScriptLimits
    /// HTTP, Redis: what hooks may wait for.
    public let services: ScriptServices?
    /// With `--cluster`: publish, broadcast and subscriptions across processes, and the store
    /// over Redis.
    public let bus: MessageBus?
    public let remoteStore: RemoteStore?
    /// Channels the process's loops subscribe to, with how many loops do.
    private let channelRefs = NIOLockedValueBox<[String: (loops: Int, acknowledged: EventLoopFuture<Void>?, failed: Bool)]>([:])
    private let logger: Logger
    private let members = NIOLockedValueBox<[Member]>([])
    private let store = NIOLockedValueBox(SharedStore())
    /// Bytes of published and broadcast messages not yet handed to every loop.
    private let pendingDelivery = NIOLockedValueBox(0)
    private let state: NIOLockedValueBox<(set: PluginSet, status: ReloadStatus)>

    /// Paths plugin routes may not take.
    public let reservedPaths: [String]

    public init(
        plugins: PluginSet, vars: [String: String] = [:], limits: ScriptLimits = .init(), logger: Logger, services: ScriptServices? = nil,
        reservedPaths: [String] = [], bus: MessageBus? = nil, remoteStore: RemoteStore? = nil
    ) {
        self.services = services
        self.bus = bus
        self.remoteStore = remoteStore
        self.reservedPaths = reservedPaths
        self.vars = vars
        self.limits = limits
        self.logger = logger
        var status = ReloadStatus()
        status.version = 1
        status.plugins = plugins.plugins.map(\.name)
        self.state = NIOLockedValueBox((plugins, status))
        // Messages from the other processes reach this process's loops like local ones (but
        // are not sent on again).
        bus?.start(
            onMessage: { [weak self] channel, text in _ = self?.fanOut(text, remote: false) { $0.deliver(channel: channel, message: $1) } },
            onBroadcast: { [weak self] path, text in _ = self?.fanOut(text, remote: false) { $0.deliver(path: path, message: $1) } })
    }

    /// The store is over Redis: its calls wait.
    public var storeWaits: Bool { remoteStore != nil }

    /// Makes the plugin host of `eventLoop`, on that loop, with the current plugin set;
    /// `clock` as for `PluginHost.init` (nil: the system clock).
    public func makeHost(on eventLoop: EventLoop, clock: (() -> Int64)? = nil) throws -> PluginHost {
        let set = state.withLockedValue { $0.set }
        // The first loop's host is the primary: it alone runs top-level plugin timers.
        let isPrimary = members.withLockedValue { $0.isEmpty }
        let host = try PluginHost(plugins: set, vars: vars, limits: limits, logger: logger, cluster: self, eventLoop: eventLoop, isPrimary: isPrimary, services: services, reservedPaths: reservedPaths, clock: clock)
        members.withLockedValue { $0.append(Member(eventLoop: eventLoop, host: NIOLoopBound(host, eventLoop: eventLoop))) }
        return host
    }

    public var status: ReloadStatus { state.withLockedValue { $0.status } }

    /// Each loop's host, in the order they were made (the first is the primary).
    var hosts: [(EventLoop, NIOLoopBound<PluginHost>)] {
        members.withLockedValue { $0.map { ($0.eventLoop, $0.host) } }
    }

    // MARK: reload

    /// Loads `set` everywhere, or nowhere: every loop first prepares it in its own state (beside
    /// the plugins that serve), and only when every loop has it are they all switched to it;
    /// if any loop fails, every loop discards it and the previous plugins keep serving.
    @discardableResult
    public func reload(_ set: PluginSet) async -> Result<ReloadStatus, PluginLoadError> {
        let all = members.withLockedValue { $0 }
        var prepared: [(member: Member, generation: Int)] = []
        var failure: PluginLoadError?
        for member in all {
            do {
                let generation = try await member.eventLoop.submit { try member.host.value.prepare(set) }.get()
                prepared.append((member, generation))
            } catch let error as PluginLoadError {
                failure = error
                break
            } catch {
                failure = PluginLoadError(file: "", message: "\(error)")
                break
            }
        }
        for (member, generation) in prepared {
            let wanted = failure == nil
            _ = try? await member.eventLoop.submit {
                if wanted { member.host.value.activate(generation) } else { member.host.value.discard(generation) }
            }.get()
        }
        let outcome: Result<Void, PluginLoadError> = failure.map { .failure($0) } ?? .success(())
        return state.withLockedValue { state in
            state.status.lastReloadAt = Date()
            switch outcome {
            case .success:
                state.set = set
                state.status.version += 1
                state.status.plugins = set.plugins.map(\.name)
                state.status.lastReloadOK = true
                state.status.lastError = nil
                return .success(state.status)
            case .failure(let error):
                state.status.lastReloadOK = false
                state.status.lastError = error.message
                return .failure(error)
            }
        }
    }

    /// The plugin routes that serve ("METHOD /path"), as the first loop has them.
    public func routes() async -> [String] {
        guard let first = members.withLockedValue({ $0.first }) else { return [] }
        return (try? await first.eventLoop.submit { first.host.value.routeKeys }.get()) ?? []
    }

    /// Per-loop figures: connections, script errors, Lua memory.
    public func loopFigures() async -> [(connections: Int, scriptErrors: Int, luaMemory: Int)] {
        var figures: [(Int, Int, Int)] = []
        for member in members.withLockedValue({ $0 }) {
            if let f = try? await member.eventLoop.submit({
                let host = member.host.value
                return (host.connectionCount, host.errorCount, host.memoryInUse)
            }).get() {
                figures.append(f)
            }
        }
        return figures
    }

    /// Per-loop figures for `/metrics` (errors by plugin, hook durations, memory), each read on
    /// its loop, as `loopFigures` does.
    public func scriptFigures() async -> [ScriptFigures] {
        var figures: [ScriptFigures] = []
        for member in members.withLockedValue({ $0 }) {
            if let f = try? await member.eventLoop.submit({ member.host.value.figures }).get() {
                figures.append(f)
            }
        }
        return figures
    }

    // MARK: across loops

    /// Sends `text` to `channel`'s subscribers on every loop; an error message if too much is
    /// already waiting to be delivered (a hook that publishes in a loop must not make the
    /// process hold gigabytes: each loop gets its copy only after the hook returns).
    /// With `--cluster`, it also goes to the other processes; if Redis is down it is delivered
    /// here only, and the answer says so (`unavailable`).
    func publish(channel: String, text: String) -> PublishOutcome {
        if let error = fanOut(text, remote: false, { host, message in host.deliver(channel: channel, message: message) }) { return .refused(error) }
        return bus.map { $0.publish(channel: channel, text: text).map { .unavailable($0) } ?? .sent } ?? .sent
    }

    /// Sends `text` to the connections on `path` on every loop (and process); as `publish`.
    func broadcast(path: String, text: String) -> PublishOutcome {
        if let error = fanOut(text, remote: false, { host, message in host.deliver(path: path, message: message) }) { return .refused(error) }
        return bus.map { $0.broadcast(path: path, text: text).map { .unavailable($0) } ?? .sent } ?? .sent
    }

    enum PublishOutcome {
        case sent
        /// Delivered in this process only: the link to the others is down.
        case unavailable(String)
        /// Too much waiting for delivery: nothing was sent (a Lua error in the script).
        case refused(String)
    }

    // MARK: subscriptions across processes

    /// A loop has its first subscriber of `channel`. True if the caller should wait for
    /// `acknowledged(channel:)` (the process's first, with a bus).
    func retain(channel: String) -> Bool {
        guard let bus else { return false }
        return channelRefs.withLockedValue { refs in
            if var entry = refs[channel] {
                entry.loops += 1
                refs[channel] = entry
                return entry.acknowledged != nil
            }
            refs[channel] = (1, watch(bus.subscribe(channel), channel), false)
            return true
        }
    }

    /// Notes a subscription that failed (Redis refused it or was down), so that the next
    /// subscriber of the channel asks again (`retryIfFailed`).
    private func watch(_ future: EventLoopFuture<Void>, _ channel: String) -> EventLoopFuture<Void> {
        future.whenFailure { [channelRefs] _ in
            channelRefs.withLockedValue { refs in
                if refs[channel] != nil { refs[channel]?.failed = true }
            }
        }
        return future
    }

    /// A loop has another subscriber of `channel`: if the process's subscription failed, it
    /// is asked for again. True if the caller should wait for `acknowledged(channel:)`.
    func retryIfFailed(channel: String) -> Bool {
        guard let bus else { return false }
        return channelRefs.withLockedValue { refs in
            guard var entry = refs[channel], entry.failed else { return false }
            entry.failed = false
            entry.acknowledged = watch(bus.subscribe(channel), channel)
            refs[channel] = entry
            return true
        }
    }

    /// A loop has no subscriber of `channel` any more.
    func release(channel: String) {
        guard let bus else { return }
        let last = channelRefs.withLockedValue { refs -> Bool in
            guard var entry = refs[channel] else { return false }
            entry.loops -= 1
            if entry.loops > 0 { refs[channel] = entry; return false }
            refs[channel] = nil
            return true
        }
        if last { bus.unsubscribe(channel) }
    }

    /// Completes when Redis has acknowledged the process's subscription to `channel`.
    func acknowledged(channel: String) -> EventLoopFuture<Void>? {
        channelRefs.withLockedValue { $0[channel]?.acknowledged }
    }

    private func fanOut(_ text: String, remote: Bool, _ deliver: @escaping @Sendable (PluginHost, ByteBuffer) -> Void) -> String? {
        let all = members.withLockedValue { $0 }
        guard !all.isEmpty else { return nil }
        let size = text.utf8.count
        let limit = limits.maxPendingDelivery
        let accepted = pendingDelivery.withLockedValue { pending in
            guard pending + size <= limit || pending == 0 else { return false }
            pending += size
            return true
        }
        guard accepted else {
            return "publish: more than \(limit >> 20) MiB of messages are waiting for delivery; try again later"
        }
        // One buffer, shared by every loop (ByteBuffer is copy-on-write), counted once.
        let message = ByteBuffer(string: text)
        let remaining = NIOLockedValueBox(all.count)
        let pending = pendingDelivery
        for member in all {
            member.eventLoop.execute {
                deliver(member.host.value, message)
                let last = remaining.withLockedValue { count in
                    count -= 1
                    return count == 0
                }
                if last { pending.withLockedValue { $0 -= size } }
            }
        }
        return nil
    }

    // MARK: shared store

    /// Runs a store operation in-process, at once (without `--cluster`). `now` is the calling
    /// loop's clock, for expiry: the system's when serving, virtual under `luaws test`.
    func storeNow(_ operation: StoreOperation, now: NIODeadline) -> Result<ScriptRedisReply, SharedStore.Full> {
        store.withLockedValue { store in
            do throws(SharedStore.Full) { return .success(try store.perform(operation, limits: limits, now: now)) } catch { return .failure(error) }
        }
    }

    /// Runs a store operation over Redis (with `--cluster`).
    func storeRemote(_ operation: StoreOperation, on eventLoop: EventLoop) -> EventLoopFuture<ScriptRedisReply>? {
        remoteStore?.perform(operation, on: eventLoop)
    }
}
