import Logging
import NIOCore

/// What a plugin can do to a connection. The embedding (the luaws executable) implements it
/// over the engine's connection; ScriptHost never sees a socket.
public protocol ScriptConnection: AnyObject {
    /// Queues a text (or binary) message. False when the connection can no longer send.
    func send(_ data: ByteBuffer, binary: Bool) -> Bool
    /// Starts the closing handshake. False when it is already closing.
    func close(code: UInt16, reason: String) -> Bool
    /// The connection's idle timers, in seconds, by index: each fires after that long without a
    /// message from the client (and again after each firing); `PluginHost.idle` gets the index.
    func setIdleTimers(_ seconds: [Double])
}

/// What the opening request said, as plugins see it in `conn.path`, `conn.query`, `conn.headers`.
public struct ScriptRequest: Sendable {
    public var path: String
    /// The raw query string, without `?`.
    public var query: String
    public var headers: [(name: String, value: String)]
    /// The negotiated sub-protocol (`conn.protocol`), if any.
    public var subprotocol: String?

    public init(path: String, query: String, headers: [(name: String, value: String)], subprotocol: String? = nil) {
        self.path = path
        self.query = query
        self.headers = headers
        self.subprotocol = subprotocol
    }
}

/// The Lua plugins of one event loop: one Lua state, the loaded plugin set, and the connections
/// of that loop. Every method must be called on that loop's thread; instances are never shared.
public final class PluginHost {
    private struct Plugin {
        var name: String
        var path: String
        var onOpen: Int32?
        var onMessage: Int32?
        var onClose: Int32?
        var onIdle: Int32?
        var onReload: Int32?
        var idle: Double?

        var refs: [Int32] { [onOpen, onMessage, onClose, onIdle, onReload].compactMap { $0 } }
    }

    private struct Connection {
        let handle: ScriptConnection
        /// Registry reference of the Lua `conn` object.
        let ref: Int32
        let path: String
        var channels: Set<String> = []
        var timers: Set<Int64> = []
    }

    /// `core.command` operations; the prelude has the same numbers (OP_*).
    private enum Command: Int32 {
        case timerStart = 1, timerCancel, subscribe, unsubscribe, publish, broadcast, sharedGet, sharedSet, sharedIncrement
    }

    private let vm: LuaVM
    private let logger: Logger
    private let cluster: ScriptCluster?
    private let eventLoop: EventLoop?
    /// Connections subscribed to each channel.
    private var subscribers: [String: Set<Int64>] = [:]
    /// Scheduled Lua timers by id, with the connection that owns each (0: the plugin).
    private var timers: [Int64: (task: Scheduled<Void>, connection: Int64)] = [:]
    private var plugins: [Plugin] = []
    /// For each hook (by `Hook.rawValue`), the plugins that have it (index into `plugins`,
    /// function), in order: dispatch walks only these.
    private var hooks: [[(plugin: Int, function: Int32)]] = Array(repeating: [], count: Hook.allCases.count)

    private enum Hook: Int, CaseIterable {
        case onOpen, onMessage, onClose, onReload

        var name: String {
            switch self {
            case .onOpen: "on_open"
            case .onMessage: "on_message"
            case .onClose: "on_close"
            case .onReload: "on_reload"
            }
        }

        func function(of plugin: Plugin) -> Int32? {
            switch self {
            case .onOpen: plugin.onOpen
            case .onMessage: plugin.onMessage
            case .onClose: plugin.onClose
            case .onReload: plugin.onReload
            }
        }
    }
    private var setRef: Int32?
    /// Index into `plugins` of the plugin behind each idle timer.
    private var idleTimerPlugins: [Int] = []
    private var connections: [Int64: Connection] = [:]
    /// Lua is not re-entered: events that arrive while a hook runs (a send that fails and
    /// closes another connection, say) wait here until it returns.
    private var depth = 0
    private var deferred: [Event] = []

    // Prelude functions, as registry references.
    private let fnNewSet, fnAddPlugin, fnPluginField, fnNewConn, fnFireTimer, fnDropConn, fnProtocols: Int32

    /// Script errors (of any hook or load) since start.
    public private(set) var errorCount = 0
    /// Sub-protocols the loaded plugins declare (`protocols = {...}`), in plugin order.
    public private(set) var subprotocols: [String] = []
    /// Names of the loaded plugins, in order.
    public var pluginNames: [String] { plugins.map(\.name) }
    /// Bytes the Lua state holds now.
    public var memoryInUse: Int { vm.memoryInUse }

    /// A host for one event loop. Without `eventLoop` (unit tests, `luaws check`) timers are
    /// refused; without `cluster`, publish, broadcast and the shared store do nothing.
    public init(
        plugins set: PluginSet, vars: [String: String] = [:], limits: ScriptLimits = .init(), logger: Logger,
        cluster: ScriptCluster? = nil, eventLoop: EventLoop? = nil
    ) throws {
        self.logger = logger
        self.cluster = cluster
        self.eventLoop = eventLoop
        vm = try LuaVM(memoryLimit: limits.memoryLimit, instructionBudget: limits.instructionBudget)
        fnNewSet = try vm.apiFunction("new_set")
        fnAddPlugin = try vm.apiFunction("add_plugin")
        fnPluginField = try vm.apiFunction("plugin_field")
        fnNewConn = try vm.apiFunction("new_conn")
        fnFireTimer = try vm.apiFunction("fire_timer")
        fnDropConn = try vm.apiFunction("drop_conn")
        fnProtocols = try vm.apiFunction("protocols")
        let setVar = try vm.apiFunction("set_var")
        for (name, value) in vars.sorted(by: { $0.key < $1.key }) {
            try vm.call(setVar, [.string(name), .string(value)])
        }
        vm.delegate = self
        try load(set)
    }

    /// Compiles and runs every plugin of `set` and makes them the ones that serve. All or nothing:
    /// on error the previous plugins stay and the error names the file (and line).
    public func load(_ set: PluginSet, reloading: Bool = false) throws {
        let newSet = try vm.call(fnNewSet, [.string(set.libraryDirectory)], wantRef: true).ref!
        var loaded: [Plugin] = []
        var loadedProtocols: [String] = []
        do {
            for source in set.plugins {
                do {
                    try vm.call(fnAddPlugin, [.ref(newSet), .string(source.name), .string(source.path), .string(source.source)])
                } catch let error as LuaError {
                    throw PluginLoadError(file: source.path, message: error.summary)
                }
            }
            let protocols = try vm.call(fnProtocols, [.ref(newSet)]).string ?? ""
            loadedProtocols = protocols.split(separator: ",").map(String.init)
            for (index, source) in set.plugins.enumerated() {
                func field(_ name: String, ref: Bool) throws -> LuaResult {
                    try vm.call(fnPluginField, [.ref(newSet), .int(Int64(index + 1)), .string(name)], wantRef: ref)
                }
                loaded.append(Plugin(
                    name: source.name, path: source.path,
                    onOpen: try field("on_open", ref: true).ref,
                    onMessage: try field("on_message", ref: true).ref,
                    onClose: try field("on_close", ref: true).ref,
                    onIdle: try field("on_idle", ref: true).ref,
                    onReload: try field("on_reload", ref: true).ref,
                    idle: try field("idle", ref: false).number
                ))
            }
        } catch {
            for plugin in loaded { plugin.refs.forEach(vm.unref) }
            vm.unref(newSet)
            errorCount += 1
            if let error = error as? PluginLoadError { throw error }
            throw PluginLoadError(file: "", message: "\(error)")
        }
        for plugin in plugins { plugin.refs.forEach(vm.unref) }
        if let setRef { vm.unref(setRef) }
        plugins = loaded
        hooks = Hook.allCases.map { hook in
            plugins.indices.compactMap { index in hook.function(of: plugins[index]).map { (index, $0) } }
        }
        subprotocols = loadedProtocols
        setRef = newSet
        idleTimerPlugins = plugins.indices.filter { plugins[$0].onIdle != nil && plugins[$0].idle != nil }
        let seconds = idleTimers
        for connection in connections.values { connection.handle.setIdleTimers(seconds) }
        if reloading { deliver(.reloaded) }
    }

    private var idleTimers: [Double] { idleTimerPlugins.map { plugins[$0].idle! } }

    // MARK: events from the engine

    /// An event for the plugins. Events that arrive while Lua runs wait in `deferred`.
    private enum Event {
        case open(ScriptConnection, Int64, ScriptRequest)
        case message(Int64, ByteBuffer, binary: Bool)
        case idle(Int64, timer: Int)
        case closed(Int64, code: UInt16, reason: String)
        case timer(Int64)
        case reloaded
    }

    public func open(_ handle: ScriptConnection, id: Int64, request: ScriptRequest) {
        deliver(.open(handle, id, request))
    }

    public func message(id: Int64, data: ByteBuffer, binary: Bool) {
        // The hot path: like deliver(.message(…)) without building the event.
        guard depth == 0 else {
            deferred.append(.message(id, data, binary: binary))
            return
        }
        depth = 1
        handleMessage(id: id, data: data, binary: binary)
        drainDeferred()
        depth = 0
    }

    private func handleMessage(id: Int64, data: ByteBuffer, binary: Bool) {
        guard let connection = connections[id] else { return }
        dispatch(.onMessage, connection: connection.ref, payload: data, kind: binary ? "binary" : "text")
    }

    public func idle(id: Int64, timer: Int) {
        deliver(.idle(id, timer: timer))
    }

    /// The connection is gone. `code` is the close code the client sent (1005 if it sent none,
    /// 1006 if the connection dropped without a close frame).
    public func closed(id: Int64, code: UInt16, reason: String) {
        deliver(.closed(id, code: code, reason: reason))
    }

    private func deliver(_ event: Event) {
        if depth > 0 {
            deferred.append(event)
            return
        }
        depth = 1
        handle(event)
        drainDeferred()
        depth = 0
    }

    private func drainDeferred() {
        while !deferred.isEmpty {
            handle(deferred.removeFirst())
        }
    }

    private func handle(_ event: Event) {
        switch event {
        case .open(let handle, let id, let request):
            let headerBlock = request.headers.map { "\($0.name): \($0.value)" }.joined(separator: "\n")
            let made: Int32?
            do {
                made = try vm.call(
                    fnNewConn, [.int(id), .string(request.path), .string(request.query), .string(headerBlock), request.subprotocol.map { .string($0) } ?? .nil], wantRef: true
                ).ref
            } catch {
                report(error, plugin: nil, hook: "open")
                made = nil
            }
            guard let ref = made else {
                _ = handle.close(code: 1011, reason: "server error")
                return
            }
            connections[id] = Connection(handle: handle, ref: ref, path: request.path)
            handle.setIdleTimers(idleTimers)
            dispatch(.onOpen, connection: ref)

        case .message(let id, let data, let binary):
            handleMessage(id: id, data: data, binary: binary)

        case .idle(let id, let timer):
            guard let connection = connections[id], timer < idleTimerPlugins.count else { return }
            let plugin = plugins[idleTimerPlugins[timer]]
            if let fn = plugin.onIdle {
                do { _ = try vm.callHook(fn, connection: connection.ref) } catch { report(error, plugin: plugin, hook: "on_idle") }
            }

        case .closed(let id, let code, let reason):
            guard let connection = connections[id] else { return }
            dispatch(.onClose, [.ref(connection.ref), .int(Int64(code)), .string(reason)])
            // After on_close, so that it may still look at what it subscribed to.
            connections[id] = nil
            for channel in connection.channels { unsubscribe(id, from: channel) }
            for timer in connection.timers { timers.removeValue(forKey: timer)?.task.cancel() }
            do { try vm.call(fnDropConn, [.ref(connection.ref)]) } catch { report(error, plugin: nil, hook: "close") }
            vm.unref(connection.ref)

        case .timer(let timer):
            guard timers[timer] != nil else { return }
            do {
                try vm.call(fnFireTimer, [.int(timer)])
            } catch {
                report(error, plugin: nil, hook: "timer")
            }

        case .reloaded:
            for connection in connections.values {
                dispatch(.onReload, connection: connection.ref)
            }
        }
    }

    public var connectionCount: Int { connections.count }

    // MARK: calling plugins

    // MARK: channels, broadcast, timers

    /// Sends `text` to this loop's subscribers of `channel`.
    func deliver(channel: String, text: String) {
        guard let ids = subscribers[channel] else { return }
        let buffer = ByteBuffer(string: text)
        for id in ids { _ = connections[id]?.handle.send(buffer, binary: false) }
    }

    /// Sends `text` to this loop's connections on `path`.
    func deliver(path: String, text: String) {
        let buffer = ByteBuffer(string: text)
        for connection in connections.values where connection.path == path {
            _ = connection.handle.send(buffer, binary: false)
        }
    }

    private func unsubscribe(_ id: Int64, from channel: String) {
        connections[id]?.channels.remove(channel)
        subscribers[channel]?.remove(id)
        if subscribers[channel]?.isEmpty == true { subscribers[channel] = nil }
    }

    private func startTimer(id timer: Int64, connection: Int64, seconds: Double, repeating: Bool) -> LuaValue {
        guard let eventLoop else { return .error("timers are not available here") }
        if connection != 0 {
            guard connections[connection] != nil else { return .error("timer on a closed connection") }
            connections[connection]?.timers.insert(timer)
        }
        let interval = TimeAmount.nanoseconds(Int64((seconds * 1e9).rounded()))
        let loopBound = NIOLoopBound(self, eventLoop: eventLoop)
        let fire: @Sendable (RepeatedTask) -> Void = { _ in loopBound.value.timerFired(timer) }
        let task: Scheduled<Void>
        if repeating {
            let repeated = eventLoop.scheduleRepeatedTask(initialDelay: interval, delay: interval, fire)
            let promise = eventLoop.makePromise(of: Void.self)
            task = Scheduled(promise: promise, cancellationTask: { repeated.cancel() })
        } else {
            task = eventLoop.scheduleTask(in: interval) { loopBound.value.timerFired(timer, once: true) }
        }
        timers[timer] = (task, connection)
        return .nil
    }

    private func timerFired(_ timer: Int64, once: Bool = false) {
        deliver(.timer(timer))
        if once { _ = forgetTimer(timer) }
    }

    private func cancelTimer(_ timer: Int64) {
        forgetTimer(timer)?.cancel()
    }

    /// Drops `timer` from the host's books (and its connection's); returns its task.
    private func forgetTimer(_ timer: Int64) -> Scheduled<Void>? {
        guard let entry = timers.removeValue(forKey: timer) else { return nil }
        if entry.connection != 0 { connections[entry.connection]?.timers.remove(timer) }
        return entry.task
    }

    /// Calls `hook` of every plugin that has it, in order, until one returns true. A hook that
    /// fails is reported and the next plugin still sees the event.
    private func dispatch(_ hook: Hook, connection: Int32, payload: ByteBuffer? = nil, kind: StaticString? = nil) {
        for (index, function) in hooks[hook.rawValue] {
            do {
                if try vm.callHook(function, connection: connection, payload: payload, kind: kind) { break }
            } catch {
                report(error, plugin: plugins[index], hook: hook.name)
            }
        }
    }

    /// The same, for a hook whose arguments do not fit `callHook` (on_close).
    private func dispatch(_ hook: Hook, _ args: [LuaArg]) {
        for (index, function) in hooks[hook.rawValue] {
            do {
                if try vm.call(function, args).truthy { break }
            } catch {
                report(error, plugin: plugins[index], hook: hook.name)
            }
        }
    }

    private func report(_ error: Error, plugin: Plugin?, hook: String) {
        errorCount += 1
        let where_ = plugin.map { "\($0.path) \(hook)" } ?? hook
        if let error = error as? LuaError {
            logger.error("script error in \(where_): \(error.summary)")
            logger.debug("\(error.message)")
        } else {
            logger.error("script error in \(where_): \(error)")
        }
    }
}

extension PluginHost: LuaVMDelegate {
    func luaSend(connection id: Int64, bytes: UnsafeRawBufferPointer, binary: Bool) -> Bool {
        guard let connection = connections[id] else { return false }
        return connection.handle.send(ByteBuffer(bytes: bytes), binary: binary)
    }

    func luaClose(connection id: Int64, code: UInt16, reason: String) -> Bool {
        guard let connection = connections[id] else { return false }
        return connection.handle.close(code: code, reason: reason)
    }

    func luaCommand(_ op: Int32, _ args: [LuaValue]) -> LuaValue {
        func string(_ i: Int) -> String? { if case .string(let s) = args[safe: i] { return s } else { return nil } }
        func integer(_ i: Int) -> Int64? { if case .integer(let n) = args[safe: i] { return n } else { return nil } }
        func number(_ i: Int) -> Double? {
            switch args[safe: i] {
            case .integer(let n): return Double(n)
            case .number(let n): return n
            default: return nil
            }
        }
        switch Command(rawValue: op) {
        case .timerStart:
            guard let connection = integer(0), let timer = integer(1), let seconds = number(2) else { return .error("bad timer") }
            return startTimer(id: timer, connection: connection, seconds: seconds, repeating: args[safe: 3] == .bool(true))
        case .timerCancel:
            if let timer = integer(0) { cancelTimer(timer) }
            return .nil
        case .subscribe:
            guard let id = integer(0), let channel = string(1), connections[id] != nil else { return .bool(false) }
            connections[id]?.channels.insert(channel)
            subscribers[channel, default: []].insert(id)
            return .bool(true)
        case .unsubscribe:
            guard let id = integer(0), let channel = string(1) else { return .bool(false) }
            unsubscribe(id, from: channel)
            return .bool(true)
        case .publish:
            guard let channel = string(0), let text = string(1) else { return .nil }
            cluster?.publish(channel: channel, text: text)
            return .nil
        case .broadcast:
            guard let path = string(0), let text = string(1) else { return .nil }
            cluster?.broadcast(path: path, text: text)
            return .nil
        case .sharedGet:
            guard let key = string(0) else { return .nil }
            switch cluster?.sharedGet(key) {
            case .string(let s): return .string(s)
            case .integer(let i): return .integer(i)
            case .number(let n): return .number(n)
            case .bool(let b): return .bool(b)
            case nil: return .nil
            }
        case .sharedSet:
            guard let key = string(0) else { return .nil }
            let value: SharedValue? = switch args[safe: 1] {
            case .string(let s): .string(s)
            case .integer(let i): .integer(i)
            case .number(let n): .number(n)
            case .bool(let b): .bool(b)
            default: nil
            }
            cluster?.sharedSet(key, value)
            return .nil
        case .sharedIncrement:
            guard let key = string(0) else { return .nil }
            let delta: SharedValue = integer(1).map { .integer($0) } ?? .number(number(1) ?? 1)
            guard let cluster else { return .nil }
            switch cluster.sharedIncrement(key, by: delta) {
            case .integer(let i): return .integer(i)
            case .number(let n): return .number(n)
            default: return .error("shared:incr: '\(key)' does not hold a number")
            }
        case nil:
            return .error("unknown command \(op)")
        }
    }

    func luaLog(level: Int32, message: String) {
        let logLevel: Logger.Level = switch level {
        case 0: .debug
        case 1: .info
        case 2: .warning
        default: .error
        }
        logger.log(level: logLevel, "\(message)")
    }
}

extension Array {
    fileprivate subscript(safe index: Int) -> Element? {
        indices.contains(index) ? self[index] : nil
    }
}
