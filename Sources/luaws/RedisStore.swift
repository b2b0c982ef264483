import NIOCore
import RedisClient
import ScriptHost

/// `luaws.shared` over Redis (`--cluster`): the same operations as the in-process store, as
/// Redis commands on the hook's loop's connection (LiveServices), keys under `--redis-prefix`.
/// `cas` runs as one server-side script; `keys` scans with the prefix escaped.
final class RedisStore: RemoteStore {
    private let services: LiveServices
    private let prefix: String

    init(services: LiveServices, prefix: String) {
        self.services = services
        self.prefix = prefix
    }

    /// GET, compare, SET keeping the remaining TTL: atomic because Redis runs scripts alone.
    private static let casScript = """
        local v = redis.call('GET', KEYS[1])
        if ARGV[1] == '0' then
          if v then return 0 end
        elseif v ~= ARGV[2] then
          return 0
        end
        local ttl = redis.call('PTTL', KEYS[1])
        if ttl > 0 then redis.call('SET', KEYS[1], ARGV[3], 'PX', ttl) else redis.call('SET', KEYS[1], ARGV[3]) end
        return 1
        """

    private static func milliseconds(_ seconds: Double) -> String { String(max(1, Int64((seconds * 1000).rounded()))) }

    func perform(_ operation: StoreOperation, on eventLoop: EventLoop) -> EventLoopFuture<ScriptRedisReply> {
        func k(_ key: String) -> String { prefix + key }
        let command: [String]
        switch operation {
        case .get(let key): command = ["GET", k(key)]
        case .set(let key, let value, let ttl): command = ["SET", k(key), value] + (ttl.map { ["PX", Self.milliseconds($0)] } ?? [])
        case .add(let key, let value, let ttl):
            command = ["SET", k(key), value, "NX"] + (ttl.map { ["PX", Self.milliseconds($0)] } ?? [])
            return run(command, on: eventLoop).map { reply in
                if case .status = reply { return .integer(1) }
                if case .null = reply { return .integer(0) }
                return reply
            }
        case .cas(let key, let old, let new): command = ["EVAL", Self.casScript, "1", k(key), old == nil ? "0" : "1", old ?? "", new]
        case .incr(let key, let by):
            switch by {
            case .integer(let n): command = ["INCRBY", k(key), String(n)]
            case .float(let d): command = ["INCRBYFLOAT", k(key), String(d)]
            }
        case .delete(let key): command = ["DEL", k(key)]
        case .expire(let key, let ttl): command = ["PEXPIRE", k(key), Self.milliseconds(ttl)]
        case .keys(let userPrefix): return scan(pattern: Self.escapeGlob(k(userPrefix)) + "*", on: eventLoop)
        case .sadd(let key, let member): command = ["SADD", k(key), member]
        case .srem(let key, let member): command = ["SREM", k(key), member]
        case .smembers(let key): command = ["SMEMBERS", k(key)]
        case .scard(let key): command = ["SCARD", k(key)]
        }
        return run(command, on: eventLoop)
    }

    private func run(_ command: [String], on eventLoop: EventLoop) -> EventLoopFuture<ScriptRedisReply> {
        guard let future = services.redis(command.map { Array($0.utf8) }, on: eventLoop) else {
            return eventLoop.makeFailedFuture(ServiceError("redis not configured"))
        }
        return future
    }

    /// SCAN until the cursor comes back to 0; at most 100,000 keys.
    private func scan(pattern: String, on eventLoop: EventLoop) -> EventLoopFuture<ScriptRedisReply> {
        let prefixLength = prefix.utf8.count
        @Sendable func step(_ cursor: String, _ found: [ScriptRedisReply]) -> EventLoopFuture<ScriptRedisReply> {
            self.run(["SCAN", cursor, "MATCH", pattern, "COUNT", "1000"], on: eventLoop).flatMap { reply in
                guard case .array(let parts) = reply, parts.count == 2, case .string(let next) = parts[0], case .array(let keys) = parts[1] else {
                    return eventLoop.makeSucceededFuture(reply)
                }
                var found = found
                for case .string(let key) in keys { found.append(.string(Array(key.dropFirst(prefixLength)))) }
                let nextCursor = String(decoding: next, as: UTF8.self)
                if nextCursor == "0" || found.count >= 100_000 { return eventLoop.makeSucceededFuture(.array(found)) }
                return step(nextCursor, found)
            }
        }
        return step("0", [])
    }

    /// Redis's MATCH is a glob: its special characters in a prefix match only themselves.
    static func escapeGlob(_ text: String) -> String {
        var out = ""
        for c in text {
            if "*?[]\\".contains(c) { out.append("\\") }
            out.append(c)
        }
        return out
    }
}
