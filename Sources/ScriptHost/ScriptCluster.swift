import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore

/// A value in the shared store: what `luaws.shared` holds.
public enum SharedValue: Sendable, Equatable {
    case string(String)
    case integer(Int64)
    case number(Double)
    case bool(Bool)
}

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
    private let logger: Logger
    private let members = NIOLockedValueBox<[Member]>([])
    private let store = NIOLockedValueBox<[String: SharedValue]>([:])
    private let state: NIOLockedValueBox<(set: PluginSet, status: ReloadStatus)>

    public init(plugins: PluginSet, vars: [String: String] = [:], limits: ScriptLimits = .init(), logger: Logger) {
        self.vars = vars
        self.limits = limits
        self.logger = logger
        var status = ReloadStatus()
        status.version = 1
        status.plugins = plugins.plugins.map(\.name)
        self.state = NIOLockedValueBox((plugins, status))
    }

    /// Makes the plugin host of `eventLoop`, on that loop, with the current plugin set.
    public func makeHost(on eventLoop: EventLoop) throws -> PluginHost {
        let set = state.withLockedValue { $0.set }
        let host = try PluginHost(plugins: set, vars: vars, limits: limits, logger: logger, cluster: self, eventLoop: eventLoop)
        members.withLockedValue { $0.append(Member(eventLoop: eventLoop, host: NIOLoopBound(host, eventLoop: eventLoop))) }
        return host
    }

    public var status: ReloadStatus { state.withLockedValue { $0.status } }

    // MARK: reload

    /// Loads `set` everywhere, or nowhere: it is first compiled and run in a scratch Lua state,
    /// and only if every plugin loads there is it handed to each event loop's state. On failure
    /// the previous plugins keep serving and the error is in `status.lastError`.
    @discardableResult
    public func reload(_ set: PluginSet) async -> Result<ReloadStatus, PluginLoadError> {
        let outcome: Result<Void, PluginLoadError>
        do {
            _ = try PluginHost(plugins: set, vars: vars, limits: limits, logger: logger)
            var failure: PluginLoadError?
            for member in members.withLockedValue({ $0 }) {
                do {
                    try await member.eventLoop.submit { try member.host.value.load(set, reloading: true) }.get()
                } catch let error as PluginLoadError {
                    failure = error
                }
            }
            outcome = failure.map { .failure($0) } ?? .success(())
        } catch let error as PluginLoadError {
            outcome = .failure(error)
        } catch {
            outcome = .failure(PluginLoadError(file: "", message: "\(error)"))
        }
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

    // MARK: across loops

    func publish(channel: String, text: String) {
        for member in members.withLockedValue({ $0 }) {
            member.eventLoop.execute { member.host.value.deliver(channel: channel, text: text) }
        }
    }

    func broadcast(path: String, text: String) {
        for member in members.withLockedValue({ $0 }) {
            member.eventLoop.execute { member.host.value.deliver(path: path, text: text) }
        }
    }

    // MARK: shared store

    func sharedGet(_ key: String) -> SharedValue? {
        store.withLockedValue { $0[key] }
    }

    func sharedSet(_ key: String, _ value: SharedValue?) {
        store.withLockedValue { $0[key] = value }
    }

    /// Adds atomically; nil if the key holds something that is not a number.
    func sharedIncrement(_ key: String, by delta: SharedValue) -> SharedValue? {
        store.withLockedValue { store in
            let result: SharedValue?
            switch (store[key] ?? .integer(0), delta) {
            case (.integer(let a), .integer(let b)):
                let (sum, overflow) = a.addingReportingOverflow(b)
                result = overflow ? .number(Double(a) + Double(b)) : .integer(sum)
            case (.integer(let a), .number(let b)): result = .number(Double(a) + b)
            case (.number(let a), .integer(let b)): result = .number(a + Double(b))
            case (.number(let a), .number(let b)): result = .number(a + b)
            default: result = nil
            }
            if let result { store[key] = result }
            return result
        }
    }
}
