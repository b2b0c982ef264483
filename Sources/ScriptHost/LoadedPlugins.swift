/// One load of a plugin set in one Lua state: the plugins' hook functions (registry
/// references), what they declare, and the hook lists dispatch walks. Owned by `PluginHost`,
/// which prepares, activates and retires it (see there); the empty value (generation 0) is
/// the "nothing loaded yet" placeholder and owns nothing.
struct LoadedPlugins {
    struct Plugin {
        /// The plugin's `name` field, else its file name without `.lua`.
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

    enum Hook: Int, CaseIterable {
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

    /// Unique within its host; timers started by the set's plugins carry it.
    var generation = 0
    /// Registry reference of the Lua set table.
    var setRef: Int32 = 0
    var plugins: [Plugin] = []
    /// Sub-protocols the plugins declare, in order.
    var subprotocols: [String] = []
    /// For each hook (by `Hook.rawValue`), the plugins that have it (index into `plugins`,
    /// function), in order: dispatch walks only these.
    private(set) var hooks: [[(plugin: Int, function: Int32)]] = Array(repeating: [], count: Hook.allCases.count)
    /// Index into `plugins` of the plugin behind each idle timer.
    private(set) var idleTimerPlugins: [Int] = []

    init() {}

    init(generation: Int, setRef: Int32) {
        self.generation = generation
        self.setRef = setRef
    }

    /// Builds the dispatch lists once every plugin is in.
    mutating func finish() {
        let plugins = self.plugins
        hooks = Hook.allCases.map { hook in
            plugins.indices.compactMap { index in hook.function(of: plugins[index]).map { (index, $0) } }
        }
        idleTimerPlugins = plugins.indices.filter { plugins[$0].onIdle != nil && plugins[$0].idle != nil }
    }
}
