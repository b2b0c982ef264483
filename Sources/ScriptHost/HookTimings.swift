/// How long hooks took, per plugin and hook, in one Lua state: plain arrays indexed by a slot
/// that each loaded plugin knows (`LoadedPlugins.Plugin.timingSlot`), so that recording one
/// duration is a few comparisons and two additions, with no lookup, lock or metric object.
/// Slots are per plugin *name* and survive reloads: the figures only ever grow, as counters must.
/// Owned by `PluginHost` (loop-bound); read through `ScriptCluster.scriptFigures()`.
struct HookTimings {
    /// The kinds of hook, in slot order (a plugin's slots are `timingSlot + kind.rawValue`).
    enum Kind: Int, CaseIterable {
        case onOpen, onMessage, onIdle, timer, onReload, onClose, onUpgrade, route

        var name: String {
            switch self {
            case .onOpen: "on_open"
            case .onMessage: "on_message"
            case .onIdle: "on_idle"
            case .timer: "timer"
            case .onReload: "on_reload"
            case .onClose: "on_close"
            case .onUpgrade: "on_upgrade"
            case .route: "route"
            }
        }
    }

    private static let buckets = HookHistogram.bounds.count + 1

    /// Per slot, then per bucket: observations and their sum (seconds).
    private var counts: [Int] = []
    private var sums: [Double] = []
    private var keys: [HookKey] = []
    private var firstSlot: [String: Int] = [:]

    /// The first slot of `plugin` (made on first use; a plugin has one per `Kind`).
    mutating func slots(for plugin: String) -> Int {
        if let slot = firstSlot[plugin] { return slot }
        let slot = keys.count
        firstSlot[plugin] = slot
        for kind in Kind.allCases { keys.append(HookKey(plugin: plugin, hook: kind.name)) }
        counts += Array(repeating: 0, count: Kind.allCases.count * Self.buckets)
        sums += Array(repeating: 0, count: Kind.allCases.count * Self.buckets)
        return slot
    }

    mutating func record(slot: Int, seconds: Double) {
        var bucket = 0
        let bounds = HookHistogram.bounds
        while bucket < bounds.count && seconds > bounds[bucket] { bucket += 1 }
        let index = slot * Self.buckets + bucket
        counts[index] &+= 1
        sums[index] += seconds
    }

    /// The histograms that have observations.
    var histograms: [HookKey: HookHistogram] {
        var result: [HookKey: HookHistogram] = [:]
        for (slot, key) in keys.enumerated() {
            let range = slot * Self.buckets..<(slot + 1) * Self.buckets
            guard counts[range].contains(where: { $0 > 0 }) else { continue }
            result[key] = HookHistogram(counts: Array(counts[range]), sums: Array(sums[range]))
        }
        return result
    }
}

/// A plugin and one of its hooks (`on_message`, `route`, …).
public struct HookKey: Hashable, Sendable {
    public var plugin: String
    public var hook: String

    public init(plugin: String, hook: String) {
        self.plugin = plugin
        self.hook = hook
    }
}

/// Durations in buckets. Not cumulative, and with each bucket's own sum: whoever exports it
/// (a Prometheus histogram takes one observation at a time) can replay a bucket's new
/// observations at their mean, which lands in the same bucket and keeps the total sum exact.
public struct HookHistogram: Sendable, Equatable {
    /// Upper bounds in seconds; a last bucket holds what is above them all.
    public static let bounds: [Double] = [0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]

    public var counts: [Int]
    public var sums: [Double]

    public init(counts: [Int] = Array(repeating: 0, count: bounds.count + 1), sums: [Double] = Array(repeating: 0, count: bounds.count + 1)) {
        self.counts = counts
        self.sums = sums
    }

    public var count: Int { counts.reduce(0, +) }

    public mutating func add(_ other: HookHistogram) {
        for index in counts.indices {
            counts[index] += other.counts[index]
            sums[index] += other.sums[index]
        }
    }
}

/// What one Lua state has done, for `/metrics`: its open connections, memory, script errors by
/// plugin, and hook durations.
public struct ScriptFigures: Sendable {
    public var connections = 0
    public var luaMemory = 0
    /// Script errors by plugin name; `(load)` for a load that failed, `(prelude)` for errors
    /// outside any plugin.
    public var errors: [String: Int] = [:]
    public var hooks: [HookKey: HookHistogram] = [:]

    public init() {}

    /// Adds another state's figures to these.
    public mutating func add(_ other: ScriptFigures) {
        connections += other.connections
        luaMemory += other.luaMemory
        errors.merge(other.errors, uniquingKeysWith: +)
        for (key, histogram) in other.hooks { hooks[key, default: HookHistogram()].add(histogram) }
    }
}
