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
    /// Stops (false) or restarts (true) reading from the client: while a hook waits and too
    /// many of the connection's messages queue behind it, TCP holds the rest.
    func setReading(_ reading: Bool)
}

extension ScriptConnection {
    public func setReading(_ reading: Bool) {}
}

/// What the opening request said, as plugins see it in `conn.path`, `conn.query`, `conn.headers`.
public struct ScriptRequest: Sendable {
    public var path: String
    /// The raw query string, without `?`.
    public var query: String
    public var headers: [(name: String, value: String)]
    /// The negotiated sub-protocol (`conn.protocol`), if any.
    public var subprotocol: String?
    /// The client's IP address (`conn.remote_addr`, `req.remote_addr`).
    public var remoteAddress: String?
    /// What `upgrade` accepted the request with (its `req.data` becomes `conn.data`).
    public var upgradeToken: Int64?
    /// HTTP method and body: for routes.
    public var method: String = "GET"
    public var body: [UInt8] = []

    public init(path: String, query: String, headers: [(name: String, value: String)], subprotocol: String? = nil, remoteAddress: String? = nil, upgradeToken: Int64? = nil) {
        self.path = path
        self.query = query
        self.headers = headers
        self.subprotocol = subprotocol
        self.remoteAddress = remoteAddress
        self.upgradeToken = upgradeToken
    }
}

/// What on_upgrade decided.
public enum ScriptUpgradeDecision: Sendable, Equatable {
    /// Accepted; the token goes back in `ScriptRequest.upgradeToken` when the connection opens.
    case accept(token: Int64)
    case refuse(status: Int, reason: String)
}

/// What a plugin route answered.
public struct ScriptRouteResponse: Sendable {
    public var status: Int
    public var headers: [(name: String, value: String)]
    public var body: [UInt8]
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
    /// A reference, so that the hot path reads and updates it without copying it out of and
    /// back into `connections` (its handle, path, sets and queue would be retained and
    /// released each time).
    private final class Connection {
        let handle: ScriptConnection
        /// Registry reference of the Lua `conn` object.
        let ref: Int32
        let path: String
        var channels: Set<String> = []
        var timers: Set<Int64> = []
        /// A hook of this connection is suspended: its later events wait in `waiting`.
        var busy = false
        /// Made when first used (only ever while a hook waits): an empty CircularBuffer
        /// allocates 16 slots, about 0.5 KB for every connection.
        lazy var waiting = CircularBuffer<ConnectionEvent>(initialCapacity: 4)
        /// Payload bytes of the messages in `waiting`.
        var waitingBytes = 0
        /// Reading from the client is paused because too much waits.
        var readingPaused = false

        init(handle: ScriptConnection, ref: Int32, path: String) {
            self.handle = handle
            self.ref = ref
            self.path = path
        }
    }

    /// What happens to one connection, run through its plugins' hooks one event at a time, in
    /// arrival order, even while a hook waits.
    private enum ConnectionEvent {
        case open
        case message(ByteBuffer, binary: Bool)
        case idle(timer: Int)
        /// One of the connection's own timers (`conn:after`, `conn:every`).
        case timer(Int64)
        case reload
        case close(code: UInt16, reason: String)
        /// on_upgrade for the request table `request` (no connection yet).
        case upgrade(request: Int32, path: String)
        /// The route `key` ("METHOD /path") for the request table `request`.
        case route(request: Int32, key: String)

        var timingKind: HookTimings.Kind {
            switch self {
            case .open: .onOpen
            case .message: .onMessage
            case .idle: .onIdle
            case .timer: .timer
            case .reload: .onReload
            case .close: .onClose
            case .upgrade: .onUpgrade
            case .route: .route
            }
        }

        var hookName: String {
            switch self {
            case .open: "on_open"
            case .message: "on_message"
            case .idle: "on_idle"
            case .timer: "timer"
            case .reload: "on_reload"
            case .close: "on_close"
            case .upgrade: "on_upgrade"
            case .route(_, let key): "route \(key)"
            }
        }
    }

    /// A hook that waits: where its event stands in its chain, and the coroutine it waits in.
    private final class Suspension {
        /// Its connection, or 0 for a plugin timer's callback.
        let connection: Int64
        let ref: Int32
        let event: ConnectionEvent
        /// Position in the event's chain of the hook that waits.
        let index: Int
        /// The plugin set the chain belongs to: if it was replaced meanwhile, the rest of the
        /// chain does not run (its functions are gone).
        let generation: Int
        let plugin: LoadedPlugins.Plugin?
        let thread: LuaVM.Thread
        var timeout: Scheduled<Void>?
        /// When the hook was called: its duration, waits included, is recorded when it ends.
        var started = NIODeadline.now()
        /// Its slot in `timings`.
        var timingSlot = 0
        /// For a run without a connection (upgrade, route, plugin timer): what to do once the
        /// chain is over.
        var finished: (() -> Void)?

        init(connection: Int64, ref: Int32, event: ConnectionEvent, index: Int, generation: Int, plugin: LoadedPlugins.Plugin?, thread: LuaVM.Thread) {
            self.connection = connection
            self.ref = ref
            self.event = event
            self.index = index
            self.generation = generation
            self.plugin = plugin
            self.thread = thread
        }
    }

    /// What a hook may wait for (`core.wait`'s first argument); the prelude has the same
    /// numbers (WAIT_*).
    private enum WaitOperation: Int64 {
        case sleep = 1, http, redis, store, subscribe
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
        case timerStart = 1, timerCancel, subscribe, unsubscribe, publish, broadcast, store
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
    @exclusivity(unchecked) private var active: LoadedPlugins
    /// Sets loaded but not (yet) serving, by generation.
    private var prepared: [Int: LoadedPlugins] = [:]
    private var nextGeneration = 0
    /// The generation being loaded: timers started now are its top-level timers.
    private var loadingGeneration: Int?
    private var connections: [Int64: Connection] = [:]
    // The properties marked @exclusivity(unchecked) are read or written on every message. They
    // belong to this loop's thread, and every access to them is instantaneous (none is held
    // across a call that could reach them again: Lua never re-enters the host, see `depth`),
    // so Swift's run-time exclusivity check can only cost there (about 90 instructions an
    // access, walking the set of accesses in progress), never catch anything.
    /// The connection looked up last: a read batch brings several messages of one connection
    /// in a row, and a hook mostly sends to the connection it runs for, so most lookups are
    /// this one (no hashing). Cleared when that connection goes.
    @exclusivity(unchecked) private var cachedID: Int64 = 0
    @exclusivity(unchecked) private var cachedConnection: Connection?
    /// `conn:send`'s bytes are copied here for the engine (which copies small messages into its
    /// own batch buffer and keeps no reference): no allocation per send.
    @exclusivity(unchecked) private var sendBuffer = ByteBuffer()
    /// Lua is not re-entered: events that arrive while a hook runs (a send that fails and
    /// closes another connection, say) wait here until it returns.
    @exclusivity(unchecked) private var depth = 0
    @exclusivity(unchecked) private var deferred: [Event] = []
    /// The coroutine the next hook runs in; a hook that waits takes it along.
    @exclusivity(unchecked) private var readyThread: LuaVM.Thread?
    /// Coroutines whose hooks are done, for reuse.
    private var spareThreads: [LuaVM.Thread] = []
    /// Hooks that wait, by operation.
    private var suspensions: [Int64: Suspension] = [:]
    private var nextOperation: Int64 = 0
    /// Set by `stop()`: waits end at once.
    private var stopping = false
    private let limits: ScriptLimits
    private let services: ScriptServices?

    // Prelude functions, as registry references.
    private let fnNewSet, fnAddPlugin, fnPluginField, fnNewConn, fnFireTimer, fnDropConn, fnProtocols, fnRetireSet, fnForgetTimer: Int32
    private let fnPluginPaths, fnPluginRouteKeys, fnPluginRoute, fnNewRequest, fnCallUpgrade, fnUpgradeOutcome, fnCallRoute, fnRouteResponse: Int32
    /// Paths routes may not take (WebSocket paths, the server's own pages).
    private let reservedPaths: [String]
    /// Request tables of accepted upgrades, until their connection opens (their `data`
    /// becomes `conn.data`); dropped if it never does.
    private var upgrades: [Int64: (ref: Int32, at: NIODeadline)] = [:]
    private var nextUpgrade: Int64 = 0
    /// Request tables whose on_upgrade or route failed: refused with 500.
    private var failedRequests: Set<Int32> = []

    /// Script errors (of any hook or load) since start.
    public private(set) var errorCount = 0
    /// The same by plugin name (see `ScriptFigures.errors`).
    private var errorsByPlugin: [String: Int] = [:]
    /// Hook durations.
    @exclusivity(unchecked) private var timings = HookTimings()
    /// The slots of hooks that belong to no plugin (the prelude's timer dispatcher).
    private lazy var preludeTimingSlot = timings.slots(for: "(prelude)")

    /// This state's figures for `/metrics`.
    public var figures: ScriptFigures {
        var figures = ScriptFigures()
        figures.connections = connectionCount
        figures.luaMemory = memoryInUse
        figures.errors = errorsByPlugin
        figures.hooks = timings.histograms
        return figures
    }
    /// Sub-protocols the loaded plugins declare (`protocols = {...}`), in plugin order.
    public var subprotocols: [String] { active.subprotocols }
    /// Names of the loaded plugins, in order (a plugin's `name` field, else its file name).
    public var pluginNames: [String] { active.plugins.map(\.name) }
    /// Bytes the Lua state holds now.
    public var memoryInUse: Int { vm.memoryInUse }

    /// A host for one event loop. Without `eventLoop` (unit tests, `luaws check`) timers are
    /// recorded but never run; without `cluster`, publish, broadcast and the shared store do
    /// nothing. `clock` is the time scripts see (`luaws.now`, `luaws.utcnow_iso`, `os.time`),
    /// in nanoseconds since the Unix epoch: nil reads the system clock; `luaws test` passes its
    /// virtual clock.
    public init(
        plugins set: PluginSet, vars: [String: String] = [:], limits: ScriptLimits = .init(), logger: Logger,
        cluster: ScriptCluster? = nil, eventLoop: EventLoop? = nil, isPrimary: Bool = true, services: ScriptServices? = nil,
        reservedPaths: [String] = [], clock: (() -> Int64)? = nil
    ) throws {
        self.services = services
        self.reservedPaths = reservedPaths
        self.logger = logger
        self.cluster = cluster
        self.eventLoop = eventLoop
        self.isPrimary = isPrimary
        self.limits = limits
        vm = try LuaVM(memoryLimit: limits.memoryLimit, instructionBudget: limits.instructionBudget)
        vm.clock = clock
        fnNewSet = try vm.apiFunction("new_set")
        fnAddPlugin = try vm.apiFunction("add_plugin")
        fnPluginField = try vm.apiFunction("plugin_field")
        fnNewConn = try vm.apiFunction("new_conn")
        fnFireTimer = try vm.apiFunction("fire_timer")
        fnDropConn = try vm.apiFunction("drop_conn")
        fnProtocols = try vm.apiFunction("protocols")
        fnRetireSet = try vm.apiFunction("retire_set")
        fnForgetTimer = try vm.apiFunction("forget_timer")
        fnPluginPaths = try vm.apiFunction("plugin_paths")
        fnPluginRouteKeys = try vm.apiFunction("plugin_route_keys")
        fnPluginRoute = try vm.apiFunction("plugin_route")
        fnNewRequest = try vm.apiFunction("new_request")
        fnCallUpgrade = try vm.apiFunction("call_upgrade")
        fnUpgradeOutcome = try vm.apiFunction("upgrade_outcome")
        fnCallRoute = try vm.apiFunction("call_route")
        fnRouteResponse = try vm.apiFunction("route_response")
        if cluster?.storeWaits == true { try vm.call(try vm.apiFunction("set_store_waits"), [.bool(true)]) }
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
        let setRef = try vm.call(fnNewSet, [.string(set.libraryDirectory), .int(Int64(generation)), .string(reservedPaths.joined(separator: "\n"))], wantRef: true).ref!
        let loaded = LoadedPlugins(generation: generation, setRef: setRef)
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
                var plugin = LoadedPlugins.Plugin(
                    name: try field("name", ref: false).string ?? source.name, path: source.path,
                    onOpen: try field("on_open", ref: true).ref,
                    onMessage: try field("on_message", ref: true).ref,
                    onClose: try field("on_close", ref: true).ref,
                    onIdle: try field("on_idle", ref: true).ref,
                    onReload: try field("on_reload", ref: true).ref,
                    onUpgrade: try field("on_upgrade", ref: true).ref,
                    idle: try field("idle", ref: false).number
                )
                plugin.timingSlot = timings.slots(for: plugin.name)
                let index = Int64(index + 1)
                plugin.paths = try vm.call(fnPluginPaths, [.ref(setRef), .int(index)]).string.map { Set($0.split(separator: "\n").map(String.init)) }
                for key in (try vm.call(fnPluginRouteKeys, [.ref(setRef), .int(index)]).string ?? "").split(separator: "\n").map(String.init) {
                    plugin.routes[key] = try vm.call(fnPluginRoute, [.ref(setRef), .int(index), .string(key)], wantRef: true).ref
                }
                loaded.plugins.append(plugin)
            }
        } catch {
            retire(loaded)
            errorCount += 1
            errorsByPlugin["(load)", default: 0] += 1
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
        for connection in connections.values { connection.handle.setIdleTimers(idleTimers(for: connection.path)) }
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

    /// The idle timers of a connection on `path`, in seconds.
    private func idleTimers(for path: String) -> [Double] {
        active.chains(for: path).idleTimerPlugins.map { active.plugins[$0].idle! }
    }

    // MARK: events from the engine

    /// An event for the plugins. Events that arrive while Lua runs wait in `deferred`.
    private enum Event {
        case open(ScriptConnection, Int64, ScriptRequest)
        case connection(Int64, ConnectionEvent)
        /// A plugin timer (not a connection's) fired.
        case pluginTimer(Int64)
        case reloaded
        /// What a waiting hook waited for is here.
        case resumed(Int64, [LuaArg])
        /// A waiting hook waited longer than `limits.hookTimeout`.
        case hookTimedOut(Int64)
        case upgrade(ScriptRequest, (ScriptUpgradeDecision) -> Void)
        case route(ScriptRequest, key: String, (ScriptRouteResponse?) -> Void)
    }

    /// Runs the plugins' on_upgrade for a valid upgrade request (they may wait), then calls
    /// `decided` on this loop: the first plugin that returns a status refuses; a plugin that
    /// fails refuses with 500 (an auth check that breaks must not let everyone in).
    public func upgrade(_ request: ScriptRequest, decided: @escaping (ScriptUpgradeDecision) -> Void) {
        deliver(.upgrade(request, decided))
    }

    /// Whether a plugin has the route `METHOD path`.
    public func hasRoute(method: String, path: String) -> Bool {
        active.routes["\(method) \(path)"] != nil
    }

    /// Runs the route for `request` (it may wait), then calls `answered` on this loop with
    /// the response, or nil if the route failed (500).
    public func route(_ request: ScriptRequest, answered: @escaping (ScriptRouteResponse?) -> Void) {
        deliver(.route(request, key: "\(request.method) \(request.path)", answered))
    }

    /// The route keys of the plugins that serve, for /luaws/status.
    public var routeKeys: [String] { active.routes.keys.sorted() }

    /// A request table for on_upgrade or a route.
    private func makeRequest(_ request: ScriptRequest, upgrade: Bool) -> Int32? {
        let headerBlock = Self.headerBlock(request.headers)
        do {
            return try vm.call(fnNewRequest, [
                .string(request.method), .string(request.path), .string(request.query), .string(headerBlock),
                request.remoteAddress.map { .string($0) } ?? .nil, .bytes(request.body), .bool(upgrade),
            ], wantRef: true).ref
        } catch {
            report(error, plugin: nil, hook: upgrade ? "on_upgrade" : "route")
            return nil
        }
    }

    public func open(_ handle: ScriptConnection, id: Int64, request: ScriptRequest) {
        deliver(.open(handle, id, request))
    }

    /// The connection `id`, if open (see `cachedConnection`).
    @inline(__always)
    private func connection(_ id: Int64) -> Connection? {
        if id == cachedID, let cached = cachedConnection { return cached }
        guard let found = connections[id] else { return nil }
        cachedID = id
        cachedConnection = found
        return found
    }

    public func message(id: Int64, data: ByteBuffer, binary: Bool) {
        // The hot path: like deliver(.connection(id, .message(…))) without building the event.
        guard depth == 0 else {
            deferred.append(.connection(id, .message(data, binary: binary)))
            return
        }
        depth = 1
        handle(.message(data, binary: binary), of: id)
        drainDeferred()
        depth = 0
    }

    public func idle(id: Int64, timer: Int) {
        deliver(.connection(id, .idle(timer: timer)))
    }

    /// The connection is gone. `code` is the close code the client sent (1005 if it sent none,
    /// 1006 if the connection dropped without a close frame). If one of its hooks waits,
    /// on_close runs after that hook (and whatever waited behind it), once.
    public func closed(id: Int64, code: UInt16, reason: String) {
        deliver(.connection(id, .close(code: code, reason: reason)))
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
            let headerBlock = Self.headerBlock(request.headers.filter { !Self.handshakeHeaders.contains($0.name.lowercased()) })
            let made: Int32?
            let upgrade = request.upgradeToken.flatMap { upgrades.removeValue(forKey: $0)?.ref }
            defer { if let upgrade { vm.unref(upgrade) } }
            do {
                made = try vm.call(
                    fnNewConn, [.int(id), .string(request.path), .string(request.query), .string(headerBlock), request.subprotocol.map { .string($0) } ?? .nil,
                                request.remoteAddress.map { .string($0) } ?? .nil, upgrade.map { .ref($0) } ?? .nil], wantRef: true
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
            handle.setIdleTimers(idleTimers(for: request.path))
            self.handle(.open, of: id)

        case .connection(let id, let event):
            handle(event, of: id)

        case .pluginTimer(let timer):
            guard timers[timer] != nil else { return }
            _ = run(.timer(timer), connection: 0, ref: 0, from: 0)

        case .reloaded:
            for id in connections.keys { handle(.reload, of: id) }

        case .resumed(let operation, let results):
            guard let suspension = suspensions.removeValue(forKey: operation) else { return }  // timed out meanwhile
            suspension.timeout?.cancel()
            proceed(suspension, vm.resume(suspension.thread, with: results))

        case .upgrade(let request, let decided):
            // Request tables of upgrades whose connection never opened.
            let stale = (eventLoop?.now ?? .now()) - .seconds(120)
            for (token, entry) in upgrades where entry.at < stale {
                upgrades[token] = nil
                vm.unref(entry.ref)
            }
            guard let ref = makeRequest(request, upgrade: true) else { return decided(.refuse(status: 500, reason: "Internal server error")) }
            let finished = { [unowned self] in
                let failed = failedRequests.remove(ref) != nil
                let outcome = try? vm.call(fnUpgradeOutcome, [.ref(ref)]).string
                if failed || outcome != nil {
                    vm.unref(ref)
                    let parts = outcome?.split(separator: "\n", maxSplits: 1, omittingEmptySubsequences: false)
                    let status = parts.flatMap { Int($0[0]) } ?? 500
                    let reason = parts.map { $0.count > 1 ? String($0[1]) : "" } ?? "Internal server error"
                    decided(.refuse(status: status, reason: reason))
                } else {
                    nextUpgrade += 1
                    upgrades[nextUpgrade] = (ref, eventLoop?.now ?? .now())
                    decided(.accept(token: nextUpgrade))
                }
            }
            if run(.upgrade(request: ref, path: request.path), connection: 0, ref: ref, from: 0, finished: finished) { finished() }

        case .route(let request, let key, let answered):
            guard let ref = makeRequest(request, upgrade: false) else { return answered(nil) }
            let finished = { [unowned self] in
                defer { vm.unref(ref) }
                guard failedRequests.remove(ref) == nil, let packed = try? vm.callForBytes(fnRouteResponse, [.ref(ref)]), packed.count >= 10 else {
                    return answered(nil)
                }
                answered(Self.unpackRoute(packed))
            }
            if run(.route(request: ref, key: key), connection: 0, ref: ref, from: 0, finished: finished) { finished() }

        case .hookTimedOut(let operation):
            guard let suspension = suspensions.removeValue(forKey: operation) else { return }
            vm.reset(suspension.thread)
            discard(suspension.thread)
            errorCount += 1
            let seconds = limits.hookTimeout
            logger.error("script error in \(suspension.plugin?.path ?? "timer") \(suspension.event.hookName): waited longer than \(seconds) s (--hook-timeout); cancelled")
            switch suspension.event {
            case .upgrade, .route:
                failedRequests.insert(suspension.ref)
                finish(suspension, stop: true)
            default:
                finish(suspension, stop: false)
            }
        }
    }

    // MARK: running hooks

    /// Runs `event` now, or queues it behind the connection's waiting hook.
    private func handle(_ event: ConnectionEvent, of id: Int64) {
        guard let connection = connection(id) else { return }
        if connection.busy {
            enqueue(event, on: id)
            return
        }
        if run(event, connection: id, ref: connection.ref, path: connection.path, from: 0) { done(event, of: id) }
    }

    /// The functions `event` runs through, in order, with the plugin (index) of each; -1 for
    /// the prelude's timer dispatcher.
    private func chain(for event: ConnectionEvent, path: String, in set: LoadedPlugins) -> [(plugin: Int, function: Int32)] {
        switch event {
        case .open: set.hooks(.onOpen, for: path)
        case .message: set.hooks(.onMessage, for: path)
        case .close: set.hooks(.onClose, for: path)
        case .reload: set.hooks(.onReload, for: path)
        case .idle(let timer):
            set.chains(for: path).idleTimerPlugins.indices.contains(timer)
                ? set.plugins[set.chains(for: path).idleTimerPlugins[timer]].onIdle.map { [(set.chains(for: path).idleTimerPlugins[timer], $0)] } ?? []
                : []
        case .timer: [(-1, fnFireTimer)]
        case .upgrade(_, let upgradePath): set.hooks(.onUpgrade, for: upgradePath)
        case .route(_, let key): set.routes[key].map { [($0.plugin, $0.function)] } ?? []
        }
    }

    /// Runs `event`'s chain from position `start` until a hook returns true, the chain ends, or
    /// a hook waits. Returns false if a hook waits: the rest runs when it resumes. A hook that
    /// fails is reported and the next plugin still sees the event. `connection` is 0 for a
    /// plugin timer (which has no connection and no queue).
    private func run(_ event: ConnectionEvent, connection id: Int64, ref: Int32, path: String = "", from start: Int, finished: (() -> Void)? = nil) -> Bool {
        let set = active
        let functions = chain(for: event, path: path, in: set)
        var index = start
        // One clock reading per hook: each one's end is the next one's start.
        var started = NIODeadline.now()
        while index < functions.count {
            guard let thread = takeReadyThread() else {
                errorCount += 1
                logger.error("script error in \(event.hookName): no memory left for a coroutine")
                return true
            }
            let (plugin, function) = functions[index]
            let timingSlot = (plugin >= 0 ? set.plugins[plugin].timingSlot : preludeTimingSlot) + event.timingKind.rawValue
            let outcome: LuaVM.HookOutcome = switch event {
            case .message(let data, let binary):
                vm.runHook(function, in: thread, connection: ref, payload: data, binary: binary)
            case .open, .reload, .idle:
                vm.runHook(function, in: thread, connection: ref)
            case .close(let code, let reason):
                vm.run(function, in: thread, [.ref(ref), .int(Int64(code)), .string(reason)])
            case .timer(let timer):
                vm.run(function, in: thread, [.int(timer)])
            case .upgrade:
                vm.run(fnCallUpgrade, in: thread, [.ref(function), .ref(ref)])
            case .route:
                vm.run(fnCallRoute, in: thread, [.ref(function), .ref(ref)])
            }
            if case .suspended = outcome {} else {
                let ended = NIODeadline.now()
                timings.record(slot: timingSlot, seconds: Double((ended - started).nanoseconds) / 1e9)
                started = ended
            }
            switch outcome {
            case .done(let stop):
                if stop { return true }
            case .failed(let error):
                discard(thread)
                report(error, plugin: plugin >= 0 ? set.plugins[plugin] : nil, hook: event.hookName)
                if case .upgrade = event { failedRequests.insert(ref); return true }
                if case .route = event { failedRequests.insert(ref); return true }
            case .suspended(let op, let args):
                readyThread = nil  // it goes with the waiting hook
                let suspension = Suspension(
                    connection: id, ref: ref, event: event, index: index, generation: set.generation,
                    plugin: plugin >= 0 ? set.plugins[plugin] : nil, thread: thread)
                suspension.finished = finished
                suspension.started = started
                suspension.timingSlot = timingSlot
                if id != 0 { connections[id]?.busy = true }
                wait(suspension, op: op, args: args)
                return false
            }
            index += 1
        }
        return true
    }

    /// A resumed hook ran again: it waits once more, or it is done and its chain goes on.
    private func proceed(_ suspension: Suspension, _ outcome: LuaVM.HookOutcome) {
        if case .suspended = outcome {} else {
            timings.record(slot: suspension.timingSlot, seconds: Double((NIODeadline.now() - suspension.started).nanoseconds) / 1e9)
        }
        switch outcome {
        case .suspended(let op, let args):
            wait(suspension, op: op, args: args)
        case .done(let stop):
            recycle(suspension.thread)
            finish(suspension, stop: stop)
        case .failed(let error):
            discard(suspension.thread)
            report(error, plugin: suspension.plugin, hook: suspension.event.hookName)
            switch suspension.event {
            case .upgrade, .route:
                failedRequests.insert(suspension.ref)
                finish(suspension, stop: true)
            default:
                finish(suspension, stop: false)
            }
        }
    }

    /// The waiting hook is over: the rest of its chain runs, then the connection's queue.
    private func finish(_ suspension: Suspension, stop: Bool) {
        let id = suspension.connection
        if id == 0 {
            var completed = true
            if !stop, suspension.generation == active.generation {
                completed = run(suspension.event, connection: 0, ref: suspension.ref, from: suspension.index + 1, finished: suspension.finished)
            }
            if completed { suspension.finished?() }
            return
        }
        guard let connection = connections[id] else { return }
        connections[id]?.busy = false
        var completed = true
        if !stop, suspension.generation == active.generation {
            completed = run(suspension.event, connection: id, ref: connection.ref, path: connection.path, from: suspension.index + 1)
        }
        if completed {
            done(suspension.event, of: id)
            drainWaiting(of: id)
        }
    }

    /// Runs what waited behind a hook, in order, until one waits again.
    private func drainWaiting(of id: Int64) {
        while let connection = connections[id], !connection.busy, !connection.waiting.isEmpty {
            let event = connections[id]!.waiting.removeFirst()
            if case .message(let data, _) = event { connections[id]!.waitingBytes -= data.readableBytes }
            resumeReadingIfDrained(id)
            if run(event, connection: id, ref: connection.ref, path: connection.path, from: 0) { done(event, of: id) }
        }
    }

    /// Queues `event` behind the connection's waiting hook; past the limits, stops reading
    /// from the client (TCP back-pressure: nothing is dropped, memory stays bounded).
    private func enqueue(_ event: ConnectionEvent, on id: Int64) {
        guard let connection = connections[id] else { return }
        // An idle timer or a repeating timer that fires again while its last firing still
        // waits in the queue fires once: a long wait must not end in a burst of pushes.
        switch event {
        case .idle(let timer) where connection.waiting.contains(where: { if case .idle(timer) = $0 { true } else { false } }):
            return
        case .timer(let timer) where connection.waiting.contains(where: { if case .timer(timer) = $0 { true } else { false } }):
            return
        default:
            break
        }
        connection.waiting.append(event)
        if case .message(let data, _) = event { connection.waitingBytes += data.readableBytes }
        if !connection.readingPaused,
           connection.waiting.count >= limits.maxPendingMessages || connection.waitingBytes >= limits.maxPendingBytes {
            connection.readingPaused = true
            connection.handle.setReading(false)
        }
    }

    private func resumeReadingIfDrained(_ id: Int64) {
        guard let connection = connections[id], connection.readingPaused,
              connection.waiting.count <= limits.maxPendingMessages / 2, connection.waitingBytes <= limits.maxPendingBytes / 2
        else { return }
        connections[id]?.readingPaused = false
        connection.handle.setReading(true)
    }

    /// An event has been through its whole chain.
    private func done(_ event: ConnectionEvent, of id: Int64) {
        guard case .close = event else { return }
        // After on_close, so that it may still look at what it subscribed to; and read again,
        // so that what on_close itself started (timers, subscriptions) goes too.
        guard let connection = connections.removeValue(forKey: id) else { return }
        if cachedID == id { cachedConnection = nil }
        for channel in connection.channels { unsubscribe(id, from: channel) }
        for timer in connection.timers { timers.removeValue(forKey: timer)?.task?.cancel() }
        do { try vm.call(fnDropConn, [.ref(connection.ref)]) } catch { report(error, plugin: nil, hook: "close") }
        vm.unref(connection.ref)
    }

    /// The server is stopping: every waiting hook is resumed with nil, "server stopping", and
    /// so is every later wait, so that chains end, queues drain and on_close runs.
    public func stop() {
        stopping = true
        for operation in suspensions.keys.sorted() { deliver(.resumed(operation, [.nil, .string("server stopping")])) }
    }

    /// Starts what a hook waits for; its answer resumes the hook (`Event.resumed`).
    private func wait(_ suspension: Suspension, op: Int64, args: [LuaValue]) {
        nextOperation += 1
        let operation = nextOperation
        suspensions[operation] = suspension
        guard !stopping else {
            deliver(.resumed(operation, [.nil, .string("server stopping")]))
            return
        }
        guard let eventLoop else {
            deliver(.resumed(operation, [.nil, .string("waiting calls need an event loop")]))
            return
        }
        let loopBound = NIOLoopBound(self, eventLoop: eventLoop)
        suspension.timeout?.cancel()
        suspension.timeout = eventLoop.scheduleTask(in: .script(seconds: limits.hookTimeout)) {
            loopBound.value.deliver(.hookTimedOut(operation))
        }
        switch WaitOperation(rawValue: op) {
        case .sleep:
            let seconds: Double = switch args.first {
            case .integer(let n): Double(n)
            case .number(let n): n
            default: -1
            }
            guard seconds.isFinite, seconds >= 0, seconds <= 1e9 else {
                deliver(.resumed(operation, [.nil, .string("sleep: bad number of seconds")]))
                return
            }
            eventLoop.scheduleTask(in: .script(seconds: seconds)) {
                loopBound.value.deliver(.resumed(operation, [.bool(true)]))
            }
        case .http:
            guard let request = Self.httpRequest(args) else {
                deliver(.resumed(operation, [.nil, .string("http: bad request")]))
                return
            }
            guard let services else {
                deliver(.resumed(operation, [.nil, .string("http: not available here")]))
                return
            }
            services.http(request, on: eventLoop).hop(to: eventLoop).whenComplete { result in
                switch result {
                case .success(let response):
                    let headers = Self.headerBlock(response.headers)
                    loopBound.value.deliver(.resumed(operation, [.int(Int64(response.status)), .string(headers), .bytes(response.body)]))
                case .failure(let error):
                    loopBound.value.deliver(.resumed(operation, [.nil, .string("\(error)")]))
                }
            }
        case .redis:
            guard case .bytes(let packed)? = args.first, let command = Self.redisArguments(packed) else {
                deliver(.resumed(operation, [.nil, .string("redis: bad command")]))
                return
            }
            guard let future = services?.redis(command, on: eventLoop) else {
                deliver(.resumed(operation, [.nil, .string("redis not configured")]))
                return
            }
            future.hop(to: eventLoop).whenComplete { result in
                switch result {
                case .success(let reply):
                    loopBound.value.deliver(.resumed(operation, [.bytes(reply.packed)]))
                case .failure(let error):
                    loopBound.value.deliver(.resumed(operation, [.nil, .string("\(error)")]))
                }
            }
        case .store:
            guard let storeOperation = Self.storeOperation(args), let future = cluster?.storeRemote(storeOperation, on: eventLoop) else {
                deliver(.resumed(operation, [.nil, .string("shared: bad arguments")]))
                return
            }
            future.hop(to: eventLoop).whenComplete { result in
                switch result {
                case .success(let reply): loopBound.value.deliver(.resumed(operation, [.bytes(reply.packed)]))
                case .failure(let error): loopBound.value.deliver(.resumed(operation, [.nil, .string("\(error)")]))
                }
            }
        case .subscribe:
            guard case .bytes(let name)? = args.first, let future = cluster?.acknowledged(channel: String(decoding: name, as: UTF8.self)) else {
                deliver(.resumed(operation, [.bool(true)]))
                return
            }
            future.hop(to: eventLoop).whenComplete { result in
                switch result {
                case .success: loopBound.value.deliver(.resumed(operation, [.bool(true)]))
                case .failure(let error): loopBound.value.deliver(.resumed(operation, [.nil, .string("\(error)")]))
                }
            }
        case nil:
            deliver(.resumed(operation, [.nil, .string("unknown operation \(op)")]))
        }
    }

    /// core.command(OP_STORE, op, key, a, b, ttl) or core.wait(WAIT_STORE, …): the prelude's
    /// STORE_* numbers.
    private static func storeOperation(_ args: [LuaValue]) -> StoreOperation? {
        func text(_ i: Int) -> String? {
            switch args.indices.contains(i) ? args[i] : .nil {
            case .string(let s): s
            case .bytes(let b): String(decoding: b, as: UTF8.self)
            default: nil
            }
        }
        func number(_ i: Int) -> Double? {
            switch args.indices.contains(i) ? args[i] : .nil {
            case .integer(let n): Double(n)
            case .number(let n): n.isFinite ? n : nil
            default: nil
            }
        }
        guard case .integer(let op)? = args.first, let key = text(1) else { return nil }
        switch op {
        case 1: return .get(key)
        case 2: return text(2).map { .set(key, $0, ttl: number(4)) }
        case 3: return text(2).map { .add(key, $0, ttl: number(4)) }
        case 4: return text(3).map { .cas(key, old: text(2), new: $0) }
        case 5:
            switch args.indices.contains(2) ? args[2] : .nil {
            case .integer(let n): return .incr(key, by: .integer(n))
            case .number(let n) where n.isFinite: return .incr(key, by: .float(n))
            case .nil: return .incr(key, by: .integer(1))
            default: return nil
            }
        case 6: return .delete(key)
        case 7: return number(2).map { .expire(key, ttl: $0) }
        case 8: return .keys(prefix: key)
        case 9: return text(2).map { .sadd(key, $0) }
        case 10: return text(2).map { .srem(key, $0) }
        case 11: return .smembers(key)
        case 12: return .scard(key)
        default: return nil
        }
    }

    /// core.wait(WAIT_HTTP, method, url, header lines, body, timeout, follow redirects).
    private static func httpRequest(_ args: [LuaValue]) -> ScriptHTTPRequest? {
        guard args.count >= 6, case .bytes(let methodBytes) = args[0], case .bytes(let urlBytes) = args[1],
              case .bytes(let headerBytes) = args[2], case .bytes(let body) = args[3]
        else { return nil }
        let method = String(decoding: methodBytes, as: UTF8.self), url = String(decoding: urlBytes, as: UTF8.self)
        // The prelude checks these; checked again, since only core.wait's arguments reach here.
        let lowered = url.lowercased()
        guard ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"].contains(method),
              lowered.hasPrefix("http://") || lowered.hasPrefix("https://")
        else { return nil }
        let headerBlock = String(decoding: headerBytes, as: UTF8.self)
        let timeout: Double? = switch args[4] {
        case .number(let n): n
        case .integer(let n): Double(n)
        default: nil
        }
        let headers = Self.headers(fromBlock: headerBlock)
        return ScriptHTTPRequest(method: method, url: url, headers: headers, body: body, timeout: timeout, followRedirects: args[5] == .bool(true))
    }

    /// Splits core.wait(WAIT_REDIS, packed)'s arguments: each a 4-byte little-endian length and
    /// its bytes (`string.pack("<s4", …)`), so that any byte, NUL included, can be sent.
    static func redisArguments(_ bytes: [UInt8]) -> [[UInt8]]? {
        var arguments: [[UInt8]] = []
        var at = 0
        while at < bytes.count {
            guard at + 4 <= bytes.count else { return nil }
            let length = Int(bytes[at]) | Int(bytes[at + 1]) << 8 | Int(bytes[at + 2]) << 16 | Int(bytes[at + 3]) << 24
            at += 4
            guard at + length <= bytes.count else { return nil }
            arguments.append(Array(bytes[at..<at + length]))
            at += length
        }
        return arguments.isEmpty ? nil : arguments
    }

    /// api.call_route's `string.pack("<I2s4s4", status, header lines, body)`.
    private static func unpackRoute(_ packed: [UInt8]) -> ScriptRouteResponse? {
        func u32(_ at: Int) -> Int { Int(packed[at]) | Int(packed[at + 1]) << 8 | Int(packed[at + 2]) << 16 | Int(packed[at + 3]) << 24 }
        let status = Int(packed[0]) | Int(packed[1]) << 8
        let headerLength = u32(2)
        guard 6 + headerLength + 4 <= packed.count else { return nil }
        let headerBlock = String(decoding: packed[6..<6 + headerLength], as: UTF8.self)
        let bodyLength = u32(6 + headerLength)
        let bodyStart = 10 + headerLength
        guard bodyStart + bodyLength == packed.count else { return nil }
        let headers = Self.headers(fromBlock: headerBlock)
        return ScriptRouteResponse(status: status, headers: headers, body: Array(packed[bodyStart...]))
    }

    /// Headers as "Name: value" lines: how they cross into and out of Lua.
    /// The handshake's own headers: not kept for `conn.headers` (the block stays in the Lua state
    /// for the connection's life, and these say nothing a plugin can use once it is open: the key
    /// alone differs for every connection). on_upgrade's `req.headers` has them.
    static let handshakeHeaders: Set<String> = ["connection", "upgrade", "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions"]

    static func headerBlock(_ headers: [(name: String, value: String)]) -> String {
        headers.map { "\($0.name): \($0.value)" }.joined(separator: "\n")
    }

    /// The other way round; a line without a colon is skipped.
    static func headers(fromBlock block: String) -> [(name: String, value: String)] {
        block.split(separator: "\n").compactMap { line in
            guard let colon = line.firstIndex(of: ":") else { return nil }
            return (String(line[..<colon]), String(line[line.index(after: colon)...].drop { $0 == " " }))
        }
    }

    private func takeReadyThread() -> LuaVM.Thread? {
        if let readyThread { return readyThread }
        readyThread = spareThreads.popLast() ?? vm.newThread()
        return readyThread
    }

    /// A coroutine whose hook failed is not reused: Lua 5.4.4 leaves hooks disallowed on a
    /// coroutine that an error raised inside a hook (the budget's) ended, and lua_resetthread
    /// does not allow them again, so it would run unbudgeted.
    private func discard(_ thread: LuaVM.Thread) {
        if let ready = readyThread, ready.isSame(as: thread) { readyThread = nil }
        vm.release(thread)
    }

    /// A coroutine whose hook is over goes back to the pool (a few are kept).
    private func recycle(_ thread: LuaVM.Thread) {
        if spareThreads.count < 64 { spareThreads.append(thread) } else { vm.release(thread) }
    }

    public var connectionCount: Int { connections.count }

    /// Timers scripts have running (or waiting for their set) on this loop.
    public var timerCount: Int { timers.count }

    /// Hooks waiting for something on this loop.
    public var waitingHooks: Int { suspensions.count }

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
        guard subscribers[channel]?.remove(id) != nil else { return }
        if subscribers[channel]?.isEmpty == true {
            subscribers[channel] = nil
            cluster?.release(channel: channel)
        }
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
        let interval = TimeAmount.script(seconds: seconds)
        let loopBound = NIOLoopBound(self, eventLoop: eventLoop)
        if repeating {
            let repeated = eventLoop.scheduleRepeatedTask(initialDelay: interval, delay: interval) { _ in loopBound.value.timerFired(timer) }
            let promise = eventLoop.makePromise(of: Void.self)
            return Scheduled(promise: promise, cancellationTask: { repeated.cancel() })
        }
        return eventLoop.scheduleTask(in: interval) { loopBound.value.timerFired(timer, once: true) }
    }

    private func timerFired(_ timer: Int64, once: Bool = false) {
        guard let entry = timers[timer] else { return }
        if entry.connection != 0 {
            deliver(.connection(entry.connection, .timer(timer)))
        } else {
            deliver(.pluginTimer(timer))
        }
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

    private func report(_ error: Error, plugin: LoadedPlugins.Plugin?, hook: String) {
        errorCount += 1
        errorsByPlugin[plugin?.name ?? "(prelude)", default: 0] += 1
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
        guard let connection = connection(id) else { return false }
        sendBuffer.clear()  // no allocation while the engine holds no reference to it
        sendBuffer.writeBytes(bytes)
        let sent = connection.handle.send(sendBuffer, binary: binary)
        // Not kept large: a 16 MiB message once must not stay held.
        if sendBuffer.capacity > 64 * 1024 { sendBuffer = ByteBuffer() }
        return sent
    }

    func luaClose(connection id: Int64, code: UInt16, reason: String) -> Bool {
        guard let connection = connection(id) else { return false }
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
            guard connections[id]?.channels.insert(channel).inserted == true else { return .bool(true) }
            let first = subscribers[channel] == nil
            subscribers[channel, default: []].insert(id)
            // The first subscriber of the loop takes a reference on the process's subscription;
            // with --cluster, the first of the process waits for Redis to acknowledge it.
            if first, cluster?.retain(channel: channel) == true { return .integer(1) }
            if !first, cluster?.retryIfFailed(channel: channel) == true { return .integer(1) }
            return .bool(true)
        case .unsubscribe:
            guard let id = integer(0), let channel = string(1) else { return .bool(false) }
            unsubscribe(id, from: channel)
            return .bool(true)
        case .publish:
            guard let channel = string(0), let text = string(1) else { return .nil }
            return Self.reply(cluster?.publish(channel: channel, text: text))
        case .broadcast:
            guard let path = string(0), let text = string(1) else { return .nil }
            return Self.reply(cluster?.broadcast(path: path, text: text))
        case .store:
            guard let cluster else { return .error("the shared store is not available here") }
            guard let operation = Self.storeOperation(args) else { return .error("shared: bad arguments") }
            switch cluster.storeNow(operation, now: eventLoop?.now ?? .now()) {
            case .success(let reply): return .bytes(reply.packed)
            case .failure(let full): return .error(full.message)
            }
        case nil:
            return .error("unknown command \(op)")
        }
    }

    /// publish and broadcast answer true, or nil and why (delivered here only), or raise.
    private static func reply(_ outcome: ScriptCluster.PublishOutcome?) -> LuaValue {
        switch outcome {
        case .sent, nil: .bool(true)
        case .unavailable(let why): .string(why)
        case .refused(let why): .error(why)
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
