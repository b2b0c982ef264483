/// One load of a plugin set in one Lua state: the plugins' hook functions (registry
/// references), what they declare, and the hook lists dispatch walks. Owned by `PluginHost`,
/// which prepares, activates and retires it (see there); the empty value (generation 0) is
/// the "nothing loaded yet" placeholder and owns nothing. A reference: every event reads the
/// set that serves, and copying a value with arrays and dictionaries in it costs a retain and a
/// release of each.
final class LoadedPlugins {
    struct Plugin {
        /// The plugin's `name` field, else its file name without `.lua`.
        var name: String
        var path: String
        var onOpen: Int32?
        var onMessage: Int32?
        var onClose: Int32?
        var onIdle: Int32?
        var onReload: Int32?
        var onUpgrade: Int32?
        var idle: Double?
        /// The WebSocket paths whose connections this plugin sees; nil: every path.
        var paths: Set<String>?
        /// Its HTTP routes: "METHOD /path" → function.
        var routes: [String: Int32] = [:]
        /// Its first slot in the host's `HookTimings`.
        var timingSlot = 0

        var refs: [Int32] { [onOpen, onMessage, onClose, onIdle, onReload, onUpgrade].compactMap { $0 } + Array(routes.values) }

        func serves(_ path: String) -> Bool { paths?.contains(path) ?? true }
    }

    enum Hook: Int, CaseIterable {
        case onOpen, onMessage, onClose, onReload, onUpgrade

        var name: String {
            switch self {
            case .onOpen: "on_open"
            case .onMessage: "on_message"
            case .onClose: "on_close"
            case .onReload: "on_reload"
            case .onUpgrade: "on_upgrade"
            }
        }

        func function(of plugin: Plugin) -> Int32? {
            switch self {
            case .onOpen: plugin.onOpen
            case .onMessage: plugin.onMessage
            case .onClose: plugin.onClose
            case .onReload: plugin.onReload
            case .onUpgrade: plugin.onUpgrade
            }
        }
    }

    /// Unique within its host; timers started by the set's plugins carry it.
    var generation = 0
    /// Registry reference of the Lua set table.
    var setRef: Int32 = 0
    // Read by every event, written only while the set is prepared (before it serves): the
    // properties every event reads skip Swift's run-time exclusivity check (see PluginHost).
    @exclusivity(unchecked) var plugins: [Plugin] = []
    /// Sub-protocols the plugins declare, in order.
    var subprotocols: [String] = []
    /// What a connection on one path runs: for each hook (by `Hook.rawValue`), the plugins
    /// that have it and serve the path (index into `plugins`, function), in order; and the
    /// plugins behind its idle timers.
    struct Chains {
        var hooks: [[(plugin: Int, function: Int32)]] = Array(repeating: [], count: Hook.allCases.count)
        var idleTimerPlugins: [Int] = []
    }
    /// For paths that some plugin names in `paths`.
    @exclusivity(unchecked) private var chainsByPath: [String: Chains] = [:]
    /// For every other path (plugins without `paths`).
    @exclusivity(unchecked) private var defaultChains = Chains()
    /// Routes of every plugin: "METHOD /path" → (plugin, function).
    private(set) var routes: [String: (plugin: Int, function: Int32)] = [:]

    init() {}

    init(generation: Int, setRef: Int32) {
        self.generation = generation
        self.setRef = setRef
    }

    /// What a connection on `path` runs (one dictionary lookup, only if some plugin has `paths`).
    func chains(for path: String) -> Chains {
        chainsByPath.isEmpty ? defaultChains : chainsByPath[path] ?? defaultChains
    }

    /// The functions `hook` runs for a connection on `path`, without copying the whole `Chains`.
    func hooks(_ hook: Hook, for path: String) -> [(plugin: Int, function: Int32)] {
        chainsByPath.isEmpty ? defaultChains.hooks[hook.rawValue] : chains(for: path).hooks[hook.rawValue]
    }

    /// Builds the dispatch lists once every plugin is in.
    func finish() {
        let plugins = self.plugins
        func chains(_ path: String?) -> Chains {
            let serving = plugins.indices.filter { path.map(plugins[$0].serves) ?? (plugins[$0].paths == nil) }
            return Chains(
                hooks: Hook.allCases.map { hook in serving.compactMap { index in hook.function(of: plugins[index]).map { (index, $0) } } },
                idleTimerPlugins: serving.filter { plugins[$0].onIdle != nil && plugins[$0].idle != nil })
        }
        defaultChains = chains(nil)
        let named = Set(plugins.flatMap { $0.paths ?? [] })
        chainsByPath = Dictionary(uniqueKeysWithValues: named.map { ($0, chains($0)) })
        routes = [:]
        for (index, plugin) in plugins.enumerated() {
            for (key, function) in plugin.routes { routes[key] = (index, function) }
        }
    }
}
