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

    public init(path: String, query: String, headers: [(name: String, value: String)]) {
        self.path = path
        self.query = query
        self.headers = headers
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
        var idle: Double?

        var refs: [Int32] { [onOpen, onMessage, onClose, onIdle].compactMap { $0 } }
    }

    private struct Connection {
        let handle: ScriptConnection
        /// Registry reference of the Lua `conn` object.
        let ref: Int32
    }

    private let vm: LuaVM
    private let logger: Logger
    private var plugins: [Plugin] = []
    private var setRef: Int32?
    /// Index into `plugins` of the plugin behind each idle timer.
    private var idleTimerPlugins: [Int] = []
    private var connections: [Int64: Connection] = [:]
    /// Lua is not re-entered: events that arrive while a hook runs (a send that fails and
    /// closes another connection, say) wait here until it returns.
    private var depth = 0
    private var deferred: [Event] = []

    // Prelude functions, as registry references.
    private let fnNewSet, fnAddPlugin, fnPluginCount, fnPluginField, fnNewConn: Int32

    /// Script errors (of any hook or load) since start.
    public private(set) var errorCount = 0
    /// Names of the loaded plugins, in order.
    public var pluginNames: [String] { plugins.map(\.name) }
    /// Bytes the Lua state holds now.
    public var memoryInUse: Int { vm.memoryInUse }

    public init(plugins set: PluginSet, vars: [String: String] = [:], limits: ScriptLimits = .init(), logger: Logger) throws {
        self.logger = logger
        vm = try LuaVM(memoryLimit: limits.memoryLimit, instructionBudget: limits.instructionBudget)
        fnNewSet = try vm.apiFunction("new_set")
        fnAddPlugin = try vm.apiFunction("add_plugin")
        fnPluginCount = try vm.apiFunction("plugin_count")
        fnPluginField = try vm.apiFunction("plugin_field")
        fnNewConn = try vm.apiFunction("new_conn")
        let setVar = try vm.apiFunction("set_var")
        for (name, value) in vars.sorted(by: { $0.key < $1.key }) {
            try vm.call(setVar, [.string(name), .string(value)])
        }
        vm.delegate = self
        try load(set)
    }

    /// Compiles and runs every plugin of `set` and makes them the ones that serve. All or nothing:
    /// on error the previous plugins stay and the error names the file (and line).
    public func load(_ set: PluginSet) throws {
        let newSet = try vm.call(fnNewSet, [.string(set.libraryDirectory)], wantRef: true).ref!
        var loaded: [Plugin] = []
        do {
            for source in set.plugins {
                do {
                    try vm.call(fnAddPlugin, [.ref(newSet), .string(source.name), .string(source.path), .string(source.source)])
                } catch let error as LuaError {
                    throw PluginLoadError(file: source.path, message: error.summary)
                }
            }
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
        setRef = newSet
        idleTimerPlugins = plugins.indices.filter { plugins[$0].onIdle != nil && plugins[$0].idle != nil }
        let seconds = idleTimers
        for connection in connections.values { connection.handle.setIdleTimers(seconds) }
    }

    private var idleTimers: [Double] { idleTimerPlugins.map { plugins[$0].idle! } }

    // MARK: events from the engine

    /// An event for the plugins. Events that arrive while Lua runs wait in `deferred`.
    private enum Event {
        case open(ScriptConnection, Int64, ScriptRequest)
        case message(Int64, ByteBuffer, binary: Bool)
        case idle(Int64, timer: Int)
        case closed(Int64, code: UInt16, reason: String)
    }

    public func open(_ handle: ScriptConnection, id: Int64, request: ScriptRequest) {
        deliver(.open(handle, id, request))
    }

    public func message(id: Int64, data: ByteBuffer, binary: Bool) {
        deliver(.message(id, data, binary: binary))
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
        depth += 1
        handle(event)
        while !deferred.isEmpty {
            handle(deferred.removeFirst())
        }
        depth -= 1
    }

    private func handle(_ event: Event) {
        switch event {
        case .open(let handle, let id, let request):
            let headerBlock = request.headers.map { "\($0.name): \($0.value)" }.joined(separator: "\n")
            let made: Int32?
            do {
                made = try vm.call(
                    fnNewConn, [.int(id), .string(request.path), .string(request.query), .string(headerBlock)], wantRef: true
                ).ref
            } catch {
                report(error, plugin: nil, hook: "open")
                made = nil
            }
            guard let ref = made else {
                _ = handle.close(code: 1011, reason: "server error")
                return
            }
            connections[id] = Connection(handle: handle, ref: ref)
            handle.setIdleTimers(idleTimers)
            dispatch(\.onOpen, "on_open", [.ref(ref)])

        case .message(let id, let data, let binary):
            guard let connection = connections[id] else { return }
            dispatch(\.onMessage, "on_message", [.ref(connection.ref), .bytes(data), .string(binary ? "binary" : "text")])

        case .idle(let id, let timer):
            guard let connection = connections[id], timer < idleTimerPlugins.count else { return }
            let plugin = plugins[idleTimerPlugins[timer]]
            if let fn = plugin.onIdle { _ = invoke(plugin, "on_idle", fn, [.ref(connection.ref)]) }

        case .closed(let id, let code, let reason):
            guard let connection = connections.removeValue(forKey: id) else { return }
            dispatch(\.onClose, "on_close", [.ref(connection.ref), .int(Int64(code)), .string(reason)])
            vm.unref(connection.ref)
        }
    }

    public var connectionCount: Int { connections.count }

    // MARK: calling plugins

    /// Calls `hook` of every plugin that has it, in order, until one returns true.
    private func dispatch(_ hook: KeyPath<Plugin, Int32?>, _ name: String, _ args: [LuaArg]) {
        for plugin in plugins {
            guard let fn = plugin[keyPath: hook] else { continue }
            if invoke(plugin, name, fn, args) { break }
        }
    }

    /// One protected call; an error is logged and counted, and the connection carries on.
    private func invoke(_ plugin: Plugin, _ hook: String, _ fn: Int32, _ args: [LuaArg]) -> Bool {
        do {
            return try vm.call(fn, args).truthy
        } catch {
            report(error, plugin: plugin, hook: hook)
            return false
        }
    }

    private func report(_ error: Error, plugin: Plugin?, hook: String) {
        errorCount += 1
        let where_ = plugin.map { "\($0.path) \(hook)" } ?? hook
        if let error = error as? LuaError {
            logger.error("script error in \(where_): \(error.summary)", metadata: ["traceback": "\(error.message)"])
        } else {
            logger.error("script error in \(where_): \(error)")
        }
    }
}

extension PluginHost: LuaVMDelegate {
    func luaSend(connection id: Int64, bytes: UnsafeRawBufferPointer, binary: Bool) -> Bool {
        guard let connection = connections[id] else { return false }
        var buffer = ByteBufferAllocator().buffer(capacity: bytes.count)
        buffer.writeBytes(bytes)
        return connection.handle.send(buffer, binary: binary)
    }

    func luaClose(connection id: Int64, code: UInt16, reason: String) -> Bool {
        guard let connection = connections[id] else { return false }
        return connection.handle.close(code: code, reason: reason)
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
