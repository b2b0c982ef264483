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

/// The Lua plugins of one event loop: one Lua state, the plugin set that serves, and the
/// connections of that loop. Every method must be called on that loop's thread; instances are
/// never shared.
///
/// A plugin set has a lifecycle of its own, the same for start, `luaws check` and reload:
/// **prepare** (compile and run every plugin in this state, next to the set that serves; its
/// top-level timers are recorded, not started) → **activate** (it serves; its top-level timers
/// start, on the primary host only) → **retire** (replaced: its references are dropped and its
/// plugin timers cancelled). A prepared set that is not wanted after all (another loop failed
/// to load it) is discarded, which is retiring a set that never served. Connections, their
/// timers and their subscriptions belong to the host, not to a set: they survive reloads.
public final class PluginHost {
    private struct Connection {
        let handle: ScriptConnection
        /// Registry reference of the Lua `conn` object.
        let ref: Int32
        let path: String
        var channels: Set<String> = []
        var timers: Set<Int64> = []
    }

    /// A timer scripts started. `task` is nil while it waits for its set to be activated.
    private struct Timer {
        var task: Scheduled<Void>?
        /// The connection that owns it, 0 for a plugin timer.
        let connection: Int64
        /// The plugin set that owns a plugin timer.
        let generation: Int
        let seconds: Double
        let repeating: Bool
    }

    /// `core.command` operations; the prelude has the same numbers (OP_*).
    private enum Command: Int32 {
        case timerStart = 1, timerCancel, subscribe, unsubscribe, publish, broadcast, sharedGet, sharedSet, sharedIncrement
    }

    private let vm: LuaVM
    private let logger: Logger
    private let cluster: ScriptCluster?
    private let eventLoop: EventLoop?
    /// Whether top-level timers (started while a plugin loads) run here: one host per process
    /// runs them, so that a plugin's `luaws.every(60, tick)` ticks once, not once per loop.
    private let isPrimary: Bool
    /// Connections subscribed to each channel.
    private var subscribers: [String: Set<Int64>] = [:]
    private var timers: [Int64: Timer] = [:]
    /// The set that serves.
    private var active: LoadedPlugins
    /// Sets loaded but not (yet) serving, by generation.
    private var prepared: [Int: LoadedPlugins] = [:]
    private var nextGeneration = 0
    /// The generation being loaded: timers started now are its top-level timers.
    private var loadingGeneration: Int?
    private var connections: [Int64: Connection] = [:]
    /// Lua is not re-entered: events that arrive while a hook runs (a send that fails and
    /// closes another connection, say) wait here until it returns.
    private var depth = 0
    private var deferred: [Event] = []

    // Prelude functions, as registry references.
    private let fnNewSet, fnAddPlugin, fnPluginField, fnNewConn, fnFireTimer, fnDropConn, fnProtocols, fnRetireSet, fnForgetTimer: Int32

    /// Script errors (of any hook or load) since start.
    public private(set) var errorCount = 0
    /// Sub-protocols the loaded plugins declare (`protocols = {...}`), in plugin order.
    public var subprotocols: [String] { active.subprotocols }
    /// Names of the loaded plugins, in order (a plugin's `name` field, else its file name).
    public var pluginNames: [String] { active.plugins.map(\.name) }
    /// Bytes the Lua state holds now.
    public var memoryInUse: Int { vm.memoryInUse }

    /// A host for one event loop. Without `eventLoop` (unit tests, `luaws check`) timers are
    /// recorded but never run; without `cluster`, publish, broadcast and the shared store do
    /// nothing.
    public init(
        plugins set: PluginSet, vars: [String: String] = [:], limits: ScriptLimits = .init(), logger: Logger,
        cluster: ScriptCluster? = nil, eventLoop: EventLoop? = nil, isPrimary: Bool = true
    ) throws {
        self.logger = logger
        self.cluster = cluster
        self.eventLoop = eventLoop
        self.isPrimary = isPrimary
        vm = try LuaVM(memoryLimit: limits.memoryLimit, instructionBudget: limits.instructionBudget)
        fnNewSet = try vm.apiFunction("new_set")
        fnAddPlugin = try vm.apiFunction("add_plugin")
        fnPluginField = try vm.apiFunction("plugin_field")
        fnNewConn = try vm.apiFunction("new_conn")
        fnFireTimer = try vm.apiFunction("fire_timer")
        fnDropConn = try vm.apiFunction("drop_conn")
        fnProtocols = try vm.apiFunction("protocols")
        fnRetireSet = try vm.apiFunction("retire_set")
        fnForgetTimer = try vm.apiFunction("forget_timer")
        let setVar = try vm.apiFunction("set_var")
        for (name, value) in vars.sorted(by: { $0.key < $1.key }) {
            try vm.call(setVar, [.string(name), .string(value)])
        }
        active = LoadedPlugins()
        vm.delegate = self
        activate(try prepare(set), reloading: false)
    }

    // MARK: the plugin set's lifecycle

    /// Compiles and runs every plugin of `set` in this state, beside the set that serves, and
    /// returns its generation for `activate` or `discard`. On error nothing is left behind and
    /// the error names the file (and line).
    public func prepare(_ set: PluginSet) throws -> Int {
        nextGeneration += 1
        let generation = nextGeneration
        let setRef = try vm.call(fnNewSet, [.string(set.libraryDirectory), .int(Int64(generation))], wantRef: true).ref!
        var loaded = LoadedPlugins(generation: generation, setRef: setRef)
        loadingGeneration = generation
        defer { loadingGeneration = nil }
        do {
            for source in set.plugins {
                do {
                    try vm.call(fnAddPlugin, [.ref(setRef), .string(source.name), .string(source.path), .string(source.source)])
                } catch let error as LuaError {
                    throw PluginLoadError(file: source.path, message: error.summary)
                }
            }
            let protocols = try vm.call(fnProtocols, [.ref(setRef)]).string ?? ""
            loaded.subprotocols = protocols.split(separator: ",").map(String.init)
            for (index, source) in set.plugins.enumerated() {
                func field(_ name: String, ref: Bool) throws -> LuaResult {
                    try vm.call(fnPluginField, [.ref(setRef), .int(Int64(index + 1)), .string(name)], wantRef: ref)
                }
                loaded.plugins.append(LoadedPlugins.Plugin(
                    name: try field("name", ref: false).string ?? source.name, path: source.path,
                    onOpen: try field("on_open", ref: true).ref,
                    onMessage: try field("on_message", ref: true).ref,
                    onClose: try field("on_close", ref: true).ref,
                    onIdle: try field("on_idle", ref: true).ref,
                    onReload: try field("on_reload", ref: true).ref,
                    idle: try field("idle", ref: false).number
                ))
            }
        } catch {
            retire(loaded)
            errorCount += 1
            if let error = error as? PluginLoadError { throw error }
            throw PluginLoadError(file: "", message: "\(error)")
        }
        loaded.finish()
        prepared[generation] = loaded
        return generation
    }

    /// Makes prepared set `generation` the one that serves and retires the previous one. With
    /// `reloading`, every connection's `on_reload` runs.
    public func activate(_ generation: Int, reloading: Bool = true) {
        guard let next = prepared.removeValue(forKey: generation) else { return }
        let previous = active
        active = next
        retire(previous)
        // Its top-level timers: started on the primary host, forgotten elsewhere.
        for (id, timer) in timers where timer.generation == generation && timer.task == nil && timer.connection == 0 {
            if isPrimary, eventLoop != nil {
                timers[id]?.task = schedule(id, seconds: timer.seconds, repeating: timer.repeating)
            } else {
                timers[id] = nil
                do { try vm.call(fnForgetTimer, [.int(id)]) } catch { report(error, plugin: nil, hook: "timer") }
            }
        }
        let seconds = idleTimers
        for connection in connections.values { connection.handle.setIdleTimers(seconds) }
        if reloading { deliver(.reloaded) }
    }

    /// Drops prepared set `generation` without it ever serving.
    public func discard(_ generation: Int) {
        if let set = prepared.removeValue(forKey: generation) { retire(set) }
    }

    /// Loads `set` and makes it serve (prepare, then activate): all or nothing.
    public func load(_ set: PluginSet, reloading: Bool = false) throws {
        activate(try prepare(set), reloading: reloading)
    }

    /// Ends a set: its plugin timers stop, its Lua references go.
    private func retire(_ set: LoadedPlugins) {
        guard set.generation != 0 else { return }
        for (id, timer) in timers where timer.connection == 0 && timer.generation == set.generation {
            timer.task?.cancel()
            timers[id] = nil
        }
        do { try vm.call(fnRetireSet, [.ref(set.setRef)]) } catch { report(error, plugin: nil, hook: "reload") }
        for plugin in set.plugins { plugin.refs.forEach(vm.unref) }
        vm.unref(set.setRef)
    }

    private var idleTimers: [Double] { active.idleTimerPlugins.map { active.plugins[$0].idle! } }

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
            guard let connection = connections[id], timer < active.idleTimerPlugins.count else { return }
            let plugin = active.plugins[active.idleTimerPlugins[timer]]
            if let fn = plugin.onIdle {
                do { _ = try vm.callHook(fn, connection: connection.ref) } catch { report(error, plugin: plugin, hook: "on_idle") }
            }

        case .closed(let id, let code, let reason):
            guard let ref = connections[id]?.ref else { return }
            dispatch(.onClose, [.ref(ref), .int(Int64(code)), .string(reason)])
            // After on_close, so that it may still look at what it subscribed to; and read
            // again, so that what on_close itself started (timers, subscriptions) goes too.
            guard let connection = connections.removeValue(forKey: id) else { return }
            for channel in connection.channels { unsubscribe(id, from: channel) }
            for timer in connection.timers { timers.removeValue(forKey: timer)?.task?.cancel() }
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

    /// Timers scripts have running (or waiting for their set) on this loop.
    public var timerCount: Int { timers.count }

    /// What scripts can reach (`luaws`, `luaws.json`, `luaws.shared`, conn methods and fields,
    /// plugin fields), one "group name" pair a line: kept in step with types/luaws.lua by a test.
    func apiDescription() throws -> String {
        try vm.call(try vm.apiFunction("describe"), []).string ?? ""
    }

    // MARK: channels, broadcast, timers

    /// Sends `message` to this loop's subscribers of `channel`.
    func deliver(channel: String, message: ByteBuffer) {
        guard let ids = subscribers[channel] else { return }
        for id in ids { _ = connections[id]?.handle.send(message, binary: false) }
    }

    /// Sends `message` to this loop's connections on `path`.
    func deliver(path: String, message: ByteBuffer) {
        for connection in connections.values where connection.path == path {
            _ = connection.handle.send(message, binary: false)
        }
    }

    private func unsubscribe(_ id: Int64, from channel: String) {
        connections[id]?.channels.remove(channel)
        subscribers[channel]?.remove(id)
        if subscribers[channel]?.isEmpty == true { subscribers[channel] = nil }
    }

    private func startTimer(id timer: Int64, connection: Int64, seconds: Double, repeating: Bool, generation: Int) -> LuaValue {
        // The prelude checks too; a value that reached here unchecked must not trap below.
        guard seconds.isFinite, seconds >= 0.001, seconds <= 1e9 else { return .error("timer interval out of range") }
        if connection != 0 {
            guard connections[connection] != nil else { return .error("timer on a closed connection") }
            connections[connection]?.timers.insert(timer)
        }
        // A top-level timer (started while its set loads) waits for the set to serve.
        let waits = connection == 0 && generation == loadingGeneration
        let task = waits || eventLoop == nil ? nil : schedule(timer, seconds: seconds, repeating: repeating)
        timers[timer] = Timer(task: task, connection: connection, generation: connection == 0 ? generation : 0, seconds: seconds, repeating: repeating)
        return .nil
    }

    private func schedule(_ timer: Int64, seconds: Double, repeating: Bool) -> Scheduled<Void>? {
        guard let eventLoop else { return nil }
        let interval = TimeAmount.nanoseconds(Int64((seconds * 1e9).rounded()))
        let loopBound = NIOLoopBound(self, eventLoop: eventLoop)
        if repeating {
            let repeated = eventLoop.scheduleRepeatedTask(initialDelay: interval, delay: interval) { _ in loopBound.value.timerFired(timer) }
            let promise = eventLoop.makePromise(of: Void.self)
            return Scheduled(promise: promise, cancellationTask: { repeated.cancel() })
        }
        return eventLoop.scheduleTask(in: interval) { loopBound.value.timerFired(timer, once: true) }
    }

    private func timerFired(_ timer: Int64, once: Bool = false) {
        deliver(.timer(timer))
        if once { _ = forgetTimer(timer) }
    }

    private func cancelTimer(_ timer: Int64) {
        forgetTimer(timer)?.task?.cancel()
    }

    /// Drops `timer` from the host's books (and its connection's); returns it.
    private func forgetTimer(_ timer: Int64) -> Timer? {
        guard let entry = timers.removeValue(forKey: timer) else { return nil }
        if entry.connection != 0 { connections[entry.connection]?.timers.remove(timer) }
        return entry
    }

    /// Calls `hook` of every plugin that has it, in order, until one returns true. A hook that
    /// fails is reported and the next plugin still sees the event.
    private func dispatch(_ hook: LoadedPlugins.Hook, connection: Int32, payload: ByteBuffer? = nil, kind: StaticString? = nil) {
        let set = active
        for (index, function) in set.hooks[hook.rawValue] {
            do {
                if try vm.callHook(function, connection: connection, payload: payload, kind: kind) { break }
            } catch {
                report(error, plugin: set.plugins[index], hook: hook.name)
            }
        }
    }

    /// The same, for a hook whose arguments do not fit `callHook` (on_close).
    private func dispatch(_ hook: LoadedPlugins.Hook, _ args: [LuaArg]) {
        let set = active
        for (index, function) in set.hooks[hook.rawValue] {
            do {
                if try vm.call(function, args).truthy { break }
            } catch {
                report(error, plugin: set.plugins[index], hook: hook.name)
            }
        }
    }

    private func report(_ error: Error, plugin: LoadedPlugins.Plugin?, hook: String) {
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
            guard let connection = integer(0), let timer = integer(1), let seconds = number(2), let generation = integer(4) else { return .error("bad timer") }
            return startTimer(id: timer, connection: connection, seconds: seconds, repeating: args[safe: 3] == .bool(true), generation: Int(truncatingIfNeeded: generation))
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
            return cluster?.publish(channel: channel, text: text).map { .error($0) } ?? .nil
        case .broadcast:
            guard let path = string(0), let text = string(1) else { return .nil }
            return cluster?.broadcast(path: path, text: text).map { .error($0) } ?? .nil
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
            return cluster?.sharedSet(key, value).map { .error($0) } ?? .nil
        case .sharedIncrement:
            guard let key = string(0) else { return .nil }
            let delta: SharedValue = integer(1).map { .integer($0) } ?? .number(number(1) ?? 1)
            guard let cluster else { return .nil }
            switch cluster.sharedIncrement(key, by: delta) {
            case .success(.integer(let i)): return .integer(i)
            case .success(.number(let n)): return .number(n)
            case .failure(let error): return .error(error.message)
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
