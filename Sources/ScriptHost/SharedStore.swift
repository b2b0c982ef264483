/// The process-wide store behind `luaws.shared`, with its size counted so that scripts cannot
/// grow the process without bound (it lives outside every Lua state's memory cap). Not
/// thread-safe: `ScriptCluster` keeps it behind a lock.
struct SharedStore {
    struct Full: Error {
        var message: String
    }

    /// What one entry is charged besides its bytes: the dictionary slot and the two strings'
    /// headers, roughly.
    static let entryOverhead = 64

    private(set) var values: [String: SharedValue] = [:]
    /// Bytes charged for every entry now held.
    private(set) var bytes = 0

    static func cost(_ key: String, _ value: SharedValue) -> Int {
        let valueBytes = switch value {
        case .string(let s): s.utf8.count
        case .integer, .number, .bool: 8
        }
        return key.utf8.count + valueBytes + entryOverhead
    }

    /// Stores `value` under `key` (nil deletes). Returns an error message, and changes nothing,
    /// when the value is larger than `limits.sharedValueLimit` or the store would pass
    /// `limits.sharedMemoryLimit`.
    mutating func set(_ key: String, _ value: SharedValue?, limits: ScriptLimits) -> String? {
        let old = values[key].map { Self.cost(key, $0) } ?? 0
        guard let value else {
            values[key] = nil
            bytes -= old
            return nil
        }
        let new = Self.cost(key, value)
        if new - Self.entryOverhead > limits.sharedValueLimit {
            return "shared: key and value of \(new - Self.entryOverhead) bytes are over the limit of \(limits.sharedValueLimit) bytes"
        }
        if limits.sharedMemoryLimit > 0, bytes - old + new > limits.sharedMemoryLimit {
            return "shared: the store is full (\(limits.sharedMemoryLimit >> 20) MiB, --shared-memory-mb)"
        }
        values[key] = value
        bytes += new - old
        return nil
    }
}
