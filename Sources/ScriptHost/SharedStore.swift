import NIOCore

/// One operation of `luaws.shared`. Keys and values are strings (numbers are stored in their
/// string form); a key holds a string or a set of strings.
public enum StoreOperation: Sendable, Equatable {
    case get(String)
    case set(String, String, ttl: Double?)
    /// Sets only if the key is absent.
    case add(String, String, ttl: Double?)
    /// Sets `new` only if the value is `old` (nil: absent).
    case cas(String, old: String?, new: String)
    case incr(String, by: Double)
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
/// operation atomic.
struct SharedStore {
    struct Full: Error {
        var message: String
    }

    private enum Value {
        case string(String)
        case set(Set<String>)
    }

    private struct Entry {
        var value: Value
        var expires: NIODeadline?
    }

    /// What one entry (or set member) is charged besides its bytes, roughly.
    static let entryOverhead = 64

    private var entries: [String: Entry] = [:]
    /// Bytes charged for everything held now.
    private(set) var bytes = 0

    private static func cost(_ key: String, _ value: Value) -> Int {
        switch value {
        case .string(let s): key.utf8.count + s.utf8.count + entryOverhead
        case .set(let members): key.utf8.count + entryOverhead + members.reduce(0) { $0 + $1.utf8.count + entryOverhead }
        }
    }

    /// The live entry of `key` (an expired one is dropped here).
    private mutating func entry(_ key: String, now: NIODeadline) -> Entry? {
        guard let entry = entries[key] else { return nil }
        if let expires = entry.expires, expires <= now {
            remove(key)
            return nil
        }
        return entry
    }

    private mutating func remove(_ key: String) {
        if let old = entries.removeValue(forKey: key) { bytes -= Self.cost(key, old.value) }
    }

    private mutating func sweep(now: NIODeadline) {
        for (key, entry) in entries where entry.expires.map({ $0 <= now }) == true { remove(key) }
    }

    /// Stores `value` under `key`; throws, changing nothing, if it does not fit.
    private mutating func put(_ key: String, _ value: Value, expires: NIODeadline?, limits: ScriptLimits, now: NIODeadline) throws(Full) {
        let new = Self.cost(key, value)
        if case .string(let s) = value, key.utf8.count + s.utf8.count > limits.sharedValueLimit {
            throw Full(message: "shared: key and value of \(key.utf8.count + s.utf8.count) bytes are over the limit of \(limits.sharedValueLimit) bytes")
        }
        let old = entries[key].map { Self.cost(key, $0.value) } ?? 0
        if limits.sharedMemoryLimit > 0, bytes - old + new > limits.sharedMemoryLimit {
            sweep(now: now)
            let old = entries[key].map { Self.cost(key, $0.value) } ?? 0
            if bytes - old + new > limits.sharedMemoryLimit {
                throw Full(message: "shared: the store is full (\(limits.sharedMemoryLimit >> 20) MiB, --shared-memory-mb)")
            }
        }
        remove(key)
        entries[key] = Entry(value: value, expires: expires)
        bytes += new
    }

    private static func deadline(_ ttl: Double?, now: NIODeadline) -> NIODeadline? {
        guard let ttl, ttl.isFinite, ttl > 0 else { return nil }
        return now + .script(seconds: ttl)
    }

    private static let wrongType = ScriptRedisReply.error("WRONGTYPE Operation against a key holding the wrong kind of value")

    /// Runs `operation` now. A reply of Redis's shape; throws if the store is full.
    mutating func perform(_ operation: StoreOperation, limits: ScriptLimits, now: NIODeadline = .now()) throws(Full) -> ScriptRedisReply {
        switch operation {
        case .get(let key):
            guard let entry = entry(key, now: now) else { return .null }
            guard case .string(let s) = entry.value else { return Self.wrongType }
            return .string(Array(s.utf8))
        case .set(let key, let value, let ttl):
            try put(key, .string(value), expires: Self.deadline(ttl, now: now), limits: limits, now: now)
            return .status("OK")
        case .add(let key, let value, let ttl):
            guard entry(key, now: now) == nil else { return .integer(0) }
            try put(key, .string(value), expires: Self.deadline(ttl, now: now), limits: limits, now: now)
            return .integer(1)
        case .cas(let key, let old, let new):
            let current = entry(key, now: now)
            switch (current?.value, old) {
            case (nil, nil): break
            case (.string(let s)?, let expected?) where s == expected: break
            default: return .integer(0)
            }
            try put(key, .string(new), expires: current?.expires, limits: limits, now: now)
            return .integer(1)
        case .incr(let key, let by):
            let current = entry(key, now: now)
            var value = 0.0
            if let current {
                guard case .string(let s) = current.value, let n = Double(s), n.isFinite else {
                    return .error("ERR value is not a number")
                }
                value = n
            }
            let sum = value + by
            guard sum.isFinite else { return .error("ERR increment would overflow") }
            let text = sum == sum.rounded() && abs(sum) < 9.007e15 ? String(Int64(sum)) : String(sum)
            try put(key, .string(text), expires: current?.expires, limits: limits, now: now)
            return .string(Array(text.utf8))
        case .delete(let key):
            guard entry(key, now: now) != nil else { return .integer(0) }
            remove(key)
            return .integer(1)
        case .expire(let key, let ttl):
            guard entry(key, now: now) != nil else { return .integer(0) }
            entries[key]?.expires = Self.deadline(ttl, now: now) ?? now
            if ttl <= 0 { remove(key) }
            return .integer(1)
        case .keys(let prefix):
            sweep(now: now)
            return .array(entries.keys.filter { $0.hasPrefix(prefix) }.sorted().map { .string(Array($0.utf8)) })
        case .sadd(let key, let member):
            var members: Set<String> = []
            let current = entry(key, now: now)
            if let current {
                guard case .set(let existing) = current.value else { return Self.wrongType }
                members = existing
            }
            guard members.insert(member).inserted else { return .integer(0) }
            try put(key, .set(members), expires: current?.expires, limits: limits, now: now)
            return .integer(1)
        case .srem(let key, let member):
            guard let current = entry(key, now: now) else { return .integer(0) }
            guard case .set(var members) = current.value else { return Self.wrongType }
            guard members.remove(member) != nil else { return .integer(0) }
            if members.isEmpty { remove(key) } else { try put(key, .set(members), expires: current.expires, limits: limits, now: now) }
            return .integer(1)
        case .smembers(let key):
            guard let current = entry(key, now: now) else { return .array([]) }
            guard case .set(let members) = current.value else { return Self.wrongType }
            return .array(members.sorted().map { .string(Array($0.utf8)) })
        case .scard(let key):
            guard let current = entry(key, now: now) else { return .integer(0) }
            guard case .set(let members) = current.value else { return Self.wrongType }
            return .integer(Int64(members.count))
        }
    }
}
