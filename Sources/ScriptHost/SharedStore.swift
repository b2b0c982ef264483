import NIOCore

/// A number to add with `incr`: integers are added as integers (as Redis's INCRBY does),
/// anything else as a float (INCRBYFLOAT).
public enum StoreIncrement: Sendable, Equatable {
    case integer(Int64)
    case float(Double)
}

/// One operation of `luaws.shared`. Keys and values are UTF-8 strings (numbers are stored in
/// their string form; the prelude refuses other bytes); a key holds a string or a set of strings.
/// Keys compare by their bytes, not by Unicode equivalence, as in Redis.
public enum StoreOperation: Sendable, Equatable {
    case get(String)
    case set(String, String, ttl: Double?)
    /// Sets only if the key is absent.
    case add(String, String, ttl: Double?)
    /// Sets `new` only if the value is `old` (nil: absent).
    case cas(String, old: String?, new: String)
    case incr(String, by: StoreIncrement)
    case delete(String)
    case expire(String, ttl: Double)
    case keys(prefix: String)
    case sadd(String, String)
    case srem(String, String)
    case smembers(String)
    case scard(String)
}

/// The store over Redis (`--cluster`): the embedding provides it. Answers have the shape of
/// Redis's replies (`ScriptRedisReply`), which the in-process store imitates, so the prelude
/// reads both the same way.
public protocol RemoteStore: Sendable {
    func perform(_ operation: StoreOperation, on eventLoop: EventLoop) -> EventLoopFuture<ScriptRedisReply>
}

/// The in-process store behind `luaws.shared` (without `--cluster`), with its size counted so
/// that scripts cannot grow the process without bound (it lives outside every Lua state's
/// memory cap). Not thread-safe: `ScriptCluster` keeps it behind a lock, which makes every
/// operation atomic. Keys, values and members are kept as bytes: Swift's String equality is
/// Unicode canonical equivalence, and two different byte strings must be two keys.
struct SharedStore {
    struct Full: Error {
        var message: String
    }

    private enum Value {
        case string([UInt8])
        case set(Set<[UInt8]>)
    }

    private struct Entry {
        var value: Value
        var expires: NIODeadline?
        /// What the entry is charged (kept, so that a set's member is charged alone).
        var cost: Int
    }

    /// What one entry (or set member) is charged besides its bytes, roughly.
    static let entryOverhead = 64

    private var entries: [[UInt8]: Entry] = [:]
    /// Bytes charged for everything held now.
    private(set) var bytes = 0

    private static func bytes(_ s: String) -> [UInt8] { Array(s.utf8) }

    /// The live entry of `key` (an expired one is dropped here).
    private mutating func entry(_ key: [UInt8], now: NIODeadline) -> Entry? {
        guard let entry = entries[key] else { return nil }
        if let expires = entry.expires, expires <= now {
            remove(key)
            return nil
        }
        return entry
    }

    private mutating func remove(_ key: [UInt8]) {
        if let old = entries.removeValue(forKey: key) { bytes -= old.cost }
    }

    private mutating func sweep(now: NIODeadline) {
        for (key, entry) in entries where entry.expires.map({ $0 <= now }) == true { remove(key) }
    }

    private static func full(_ limits: ScriptLimits) -> Full {
        Full(message: "shared: the store is full (\(limits.sharedMemoryLimit >> 20) MiB, --shared-memory-mb)")
    }

    /// Whether `extra` more bytes fit (expired entries are swept first if need be).
    private mutating func fits(_ extra: Int, limits: ScriptLimits, now: NIODeadline) -> Bool {
        guard limits.sharedMemoryLimit > 0, extra > 0 else { return true }
        if bytes + extra <= limits.sharedMemoryLimit { return true }
        sweep(now: now)
        return bytes + extra <= limits.sharedMemoryLimit
    }

    /// Stores the string `value` under `key`; throws, changing nothing, if it does not fit.
    private mutating func put(_ key: [UInt8], _ value: [UInt8], expires: NIODeadline?, limits: ScriptLimits, now: NIODeadline) throws(Full) {
        if key.count + value.count > limits.sharedValueLimit {
            throw Full(message: "shared: key and value of \(key.count + value.count) bytes are over the limit of \(limits.sharedValueLimit) bytes")
        }
        let cost = key.count + value.count + Self.entryOverhead
        let old = entries[key]?.cost ?? 0
        guard fits(cost - old, limits: limits, now: now) else { throw Self.full(limits) }
        remove(key)
        entries[key] = Entry(value: .string(value), expires: expires, cost: cost)
        bytes += cost
    }

    private static func deadline(_ ttl: Double?, now: NIODeadline) -> NIODeadline? {
        guard let ttl, ttl.isFinite, ttl > 0 else { return nil }
        return now + .script(seconds: ttl)
    }

    private static let wrongType = ScriptRedisReply.error("WRONGTYPE Operation against a key holding the wrong kind of value")
    private static let notANumber = ScriptRedisReply.error("ERR value is not a number")

    /// A stored number: an integer in decimal, or a float in decimal notation (no hex, no
    /// infinities), as Redis reads them.
    private static func number(_ bytes: [UInt8]) -> StoreIncrement? {
        let text = String(decoding: bytes, as: UTF8.self)
        if let n = Int64(text) { return .integer(n) }
        guard !text.isEmpty, text.utf8.allSatisfy({ "0123456789+-.eE".utf8.contains($0) }), let d = Double(text), d.isFinite else { return nil }
        return .float(d)
    }

    private static func text(_ d: Double) -> String {
        d == d.rounded() && abs(d) < 9.007e15 ? String(Int64(d)) : "\(d)"
    }

    /// Runs `operation` now. A reply of Redis's shape; throws if the store is full.
    mutating func perform(_ operation: StoreOperation, limits: ScriptLimits, now: NIODeadline = .now()) throws(Full) -> ScriptRedisReply {
        switch operation {
        case .get(let key):
            guard let entry = entry(Self.bytes(key), now: now) else { return .null }
            guard case .string(let s) = entry.value else { return Self.wrongType }
            return .string(s)
        case .set(let key, let value, let ttl):
            try put(Self.bytes(key), Self.bytes(value), expires: Self.deadline(ttl, now: now), limits: limits, now: now)
            return .status("OK")
        case .add(let key, let value, let ttl):
            let k = Self.bytes(key)
            guard entry(k, now: now) == nil else { return .integer(0) }
            try put(k, Self.bytes(value), expires: Self.deadline(ttl, now: now), limits: limits, now: now)
            return .integer(1)
        case .cas(let key, let old, let new):
            let k = Self.bytes(key)
            let current = entry(k, now: now)
            switch (current?.value, old) {
            case (nil, nil): break
            case (.string(let s)?, let expected?) where s == Self.bytes(expected): break
            case (.set?, _): return Self.wrongType
            default: return .integer(0)
            }
            try put(k, Self.bytes(new), expires: current?.expires, limits: limits, now: now)
            return .integer(1)
        case .incr(let key, let by):
            let k = Self.bytes(key)
            let current = entry(k, now: now)
            var value = StoreIncrement.integer(0)
            if let current {
                guard case .string(let s) = current.value else { return Self.wrongType }
                guard let n = Self.number(s) else { return Self.notANumber }
                value = n
            }
            let result: String
            switch (value, by) {
            case (.integer(let a), .integer(let b)):
                let (sum, overflow) = a.addingReportingOverflow(b)
                if overflow { return .error("ERR increment or decrement would overflow") }
                result = String(sum)
            case (.integer(let a), .float(let b)): result = Self.text(Double(a) + b)
            case (.float(let a), .integer(let b)): result = Self.text(a + Double(b))
            case (.float(let a), .float(let b)): result = Self.text(a + b)
            }
            guard result != "inf", result != "-inf", result != "nan" else { return .error("ERR increment would produce NaN or Infinity") }
            try put(k, Self.bytes(result), expires: current?.expires, limits: limits, now: now)
            return .string(Self.bytes(result))
        case .delete(let key):
            let k = Self.bytes(key)
            guard entry(k, now: now) != nil else { return .integer(0) }
            remove(k)
            return .integer(1)
        case .expire(let key, let ttl):
            let k = Self.bytes(key)
            guard entry(k, now: now) != nil else { return .integer(0) }
            if ttl <= 0 { remove(k) } else { entries[k]?.expires = Self.deadline(ttl, now: now) }
            return .integer(1)
        case .keys(let prefix):
            sweep(now: now)
            let p = Self.bytes(prefix)
            let found = entries.keys.filter { $0.starts(with: p) }.sorted { $0.lexicographicallyPrecedes($1) }
            return .array(found.map { .string($0) })
        case .sadd(let key, let member):
            let k = Self.bytes(key), m = Self.bytes(member)
            let cost = m.count + Self.entryOverhead
            guard var existing = entry(k, now: now) else {
                guard fits(k.count + Self.entryOverhead + cost, limits: limits, now: now) else { throw Self.full(limits) }
                entries[k] = Entry(value: .set([m]), expires: nil, cost: k.count + Self.entryOverhead + cost)
                bytes += k.count + Self.entryOverhead + cost
                return .integer(1)
            }
            guard case .set(var members) = existing.value else { return Self.wrongType }
            if members.contains(m) { return .integer(0) }
            guard fits(cost, limits: limits, now: now) else { throw Self.full(limits) }
            // Taken out of the dictionary while it changes, so that the set is not copied.
            existing.value = .string([])
            entries[k] = nil
            members.insert(m)
            existing.value = .set(members)
            existing.cost += cost
            entries[k] = existing
            bytes += cost
            return .integer(1)
        case .srem(let key, let member):
            let k = Self.bytes(key), m = Self.bytes(member)
            guard var existing = entry(k, now: now) else { return .integer(0) }
            guard case .set(var members) = existing.value else { return Self.wrongType }
            guard members.contains(m) else { return .integer(0) }
            existing.value = .string([])
            entries[k] = nil
            members.remove(m)
            let cost = m.count + Self.entryOverhead
            bytes -= cost
            if members.isEmpty {
                bytes -= existing.cost - cost
            } else {
                existing.value = .set(members)
                existing.cost -= cost
                entries[k] = existing
            }
            return .integer(1)
        case .smembers(let key):
            guard let current = entry(Self.bytes(key), now: now) else { return .array([]) }
            guard case .set(let members) = current.value else { return Self.wrongType }
            return .array(members.sorted { $0.lexicographicallyPrecedes($1) }.map { .string($0) })
        case .scard(let key):
            guard let current = entry(Self.bytes(key), now: now) else { return .integer(0) }
            guard case .set(let members) = current.value else { return Self.wrongType }
            return .integer(Int64(members.count))
        }
    }
}
