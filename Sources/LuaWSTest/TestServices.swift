import Foundation
import NIOConcurrencyHelpers
import NIOCore
import ScriptHost

/// What plugins reach outside the process, under `luaws test`: HTTP answers from stubs
/// (`test.http_stub`), never the network, and an in-process Redis. A call the test did not
/// prepare for (an unstubbed URL, a Redis command the fake does not know) answers the hook
/// with an error *and* is recorded as a problem, which fails the test step that caused it.
final class TestServices: ScriptServices {
    struct Stub: Sendable {
        var url: String
        var status: Int
        var headers: [(name: String, value: String)]
        var body: [UInt8]
        var delay: Double?
        var error: String?
    }

    struct Recorded: Sendable {
        var method: String
        var url: String
        var headers: [(name: String, value: String)]
        var body: [UInt8]
    }

    private struct State {
        var stubs: [Stub] = []
        var requests: [Recorded] = []
        var problems: [String] = []
        var redis = FakeRedis()
    }

    /// Locked only for `Sendable`: every call comes from the one thread that runs the tests.
    private let state = NIOLockedValueBox(State())

    func addStub(_ stub: Stub) {
        state.withLockedValue { $0.stubs.append(stub) }
    }

    var requests: [Recorded] { state.withLockedValue { $0.requests } }

    /// Problems since the last call, and forgets them.
    func takeProblems() -> [String] {
        state.withLockedValue { state in
            defer { state.problems = [] }
            return state.problems
        }
    }

    /// A command from the test itself (`test.redis`): not a problem if unknown, just an error.
    func redisFromTest(_ arguments: [[UInt8]], now: NIODeadline) -> ScriptRedisReply {
        state.withLockedValue { $0.redis.run(arguments, now: now) }
    }

    func http(_ request: ScriptHTTPRequest, on eventLoop: EventLoop) -> EventLoopFuture<ScriptHTTPResponse> {
        let stub: Stub? = state.withLockedValue { state in
            state.requests.append(Recorded(method: request.method, url: request.url, headers: request.headers, body: request.body))
            // The latest stub that matches wins: a case can override a file's stub.
            return state.stubs.last { stub in
                stub.url.hasSuffix("*") ? request.url.hasPrefix(String(stub.url.dropLast())) : stub.url == request.url
            }
        }
        guard let stub else {
            let message = "luaws.http.request \(request.method) \(request.url): no stub for this URL, and tests never reach the network (add test.http_stub(\"\(request.url)\", { status = 200, body = \"...\" }))"
            state.withLockedValue { $0.problems.append(message) }
            return eventLoop.makeFailedFuture(TestServiceError(message: "no stub for \(request.url) (luaws test)"))
        }
        let answer: @Sendable () throws -> ScriptHTTPResponse = {
            if let error = stub.error { throw TestServiceError(message: error) }
            return ScriptHTTPResponse(status: stub.status, headers: stub.headers, body: stub.body)
        }
        guard let delay = stub.delay, delay > 0 else {
            return eventLoop.makeCompletedFuture(Result(catching: answer))
        }
        // On the loop's clock: the hook waits `delay` seconds of virtual time.
        return eventLoop.scheduleTask(in: .nanoseconds(Int64(min(delay, 1e9) * 1e9)), answer).futureResult
    }

    func redis(_ arguments: [[UInt8]], on eventLoop: EventLoop) -> EventLoopFuture<ScriptRedisReply>? {
        let reply = state.withLockedValue { state in
            let reply = state.redis.run(arguments, now: eventLoop.now)
            if case .error(let message) = reply, message.hasPrefix(FakeRedis.unknownPrefix) {
                state.problems.append("luaws.redis: \(message)")
            }
            return reply
        }
        return eventLoop.makeSucceededFuture(reply)
    }
}

struct TestServiceError: Error, CustomStringConvertible {
    var message: String
    var description: String { message }
}

/// The Redis of `luaws test`: strings and sets in memory, with expiry on the virtual clock.
/// A few commands, enough for the usual counters, caches and presence lists; any other is an
/// error that says which ones exist.
struct FakeRedis {
    static let commands = ["PING", "GET", "SET", "SETEX", "DEL", "EXISTS", "INCR", "INCRBY", "DECR", "DECRBY", "EXPIRE", "TTL", "SADD", "SREM", "SMEMBERS", "SISMEMBER", "SCARD"]
    static let unknownPrefix = "ERR luaws test's fake Redis"

    private enum Value {
        case string([UInt8])
        case set(Set<[UInt8]>)
    }

    private var values: [[UInt8]: Value] = [:]
    private var expiry: [[UInt8]: NIODeadline] = [:]

    mutating func run(_ arguments: [[UInt8]], now: NIODeadline) -> ScriptRedisReply {
        guard let first = arguments.first else { return .error("ERR empty command") }
        let name = String(decoding: first, as: UTF8.self).uppercased()
        let args = Array(arguments.dropFirst())
        // Expired keys go first, as Redis would not show them either.
        for (key, deadline) in expiry where deadline <= now {
            values[key] = nil
            expiry[key] = nil
        }
        func arity(_ n: Int, atLeast: Bool = false) -> ScriptRedisReply? {
            (atLeast ? args.count >= n : args.count == n) ? nil : .error("ERR wrong number of arguments for '\(name.lowercased())' command")
        }
        func integer(_ bytes: [UInt8]) -> Int64? { Int64(String(decoding: bytes, as: UTF8.self)) }
        let wrongType = ScriptRedisReply.error("WRONGTYPE Operation against a key holding the wrong kind of value")

        switch name {
        case "PING":
            return args.first.map { .string($0) } ?? .status("PONG")
        case "GET":
            if let bad = arity(1) { return bad }
            switch values[args[0]] {
            case .string(let v)?: return .string(v)
            case .set?: return wrongType
            case nil: return .null
            }
        case "SET", "SETEX":
            var key: [UInt8], value: [UInt8], ttl: Int64?
            var onlyIfMissing = false, onlyIfPresent = false
            if name == "SETEX" {
                if let bad = arity(3) { return bad }
                key = args[0]; value = args[2]
                guard let seconds = integer(args[1]), seconds > 0 else { return .error("ERR invalid expire time in 'setex' command") }
                ttl = seconds * 1_000_000_000
            } else {
                if let bad = arity(2, atLeast: true) { return bad }
                key = args[0]; value = args[1]
                var i = 2
                while i < args.count {
                    switch String(decoding: args[i], as: UTF8.self).uppercased() {
                    case "EX", "PX":
                        let unit: Int64 = String(decoding: args[i], as: UTF8.self).uppercased() == "EX" ? 1_000_000_000 : 1_000_000
                        guard i + 1 < args.count, let n = integer(args[i + 1]), n > 0 else { return .error("ERR invalid expire time in 'set' command") }
                        ttl = n * unit
                        i += 2
                    case "NX": onlyIfMissing = true; i += 1
                    case "XX": onlyIfPresent = true; i += 1
                    default: return .error("ERR syntax error")
                    }
                }
            }
            if onlyIfMissing && values[key] != nil || onlyIfPresent && values[key] == nil { return .null }
            values[key] = .string(value)
            expiry[key] = ttl.map { now + .nanoseconds($0) }
            return .status("OK")
        case "DEL", "EXISTS":
            if let bad = arity(1, atLeast: true) { return bad }
            var count: Int64 = 0
            for key in args where values[key] != nil {
                count += 1
                if name == "DEL" { values[key] = nil; expiry[key] = nil }
            }
            return .integer(count)
        case "INCR", "INCRBY", "DECR", "DECRBY":
            let by: Int64
            if name == "INCR" || name == "DECR" {
                if let bad = arity(1) { return bad }
                by = name == "INCR" ? 1 : -1
            } else {
                if let bad = arity(2) { return bad }
                guard let n = integer(args[1]) else { return .error("ERR value is not an integer or out of range") }
                by = name == "INCRBY" ? n : -n
            }
            let current: Int64
            switch values[args[0]] {
            case .string(let v)?:
                guard let n = integer(v) else { return .error("ERR value is not an integer or out of range") }
                current = n
            case .set?: return wrongType
            case nil: current = 0
            }
            let (sum, overflow) = current.addingReportingOverflow(by)
            if overflow { return .error("ERR increment or decrement would overflow") }
            values[args[0]] = .string(Array(String(sum).utf8))
            return .integer(sum)
        case "EXPIRE":
            if let bad = arity(2) { return bad }
            guard let seconds = integer(args[1]) else { return .error("ERR value is not an integer or out of range") }
            guard values[args[0]] != nil else { return .integer(0) }
            if seconds <= 0 {
                values[args[0]] = nil
                expiry[args[0]] = nil
            } else {
                expiry[args[0]] = now + .seconds(seconds)
            }
            return .integer(1)
        case "TTL":
            if let bad = arity(1) { return bad }
            guard values[args[0]] != nil else { return .integer(-2) }
            guard let deadline = expiry[args[0]] else { return .integer(-1) }
            return .integer((deadline - now).nanoseconds / 1_000_000_000)
        case "SADD", "SREM":
            if let bad = arity(2, atLeast: true) { return bad }
            var members: Set<[UInt8]>
            switch values[args[0]] {
            case .set(let s)?: members = s
            case .string?: return wrongType
            case nil: members = []
            }
            var changed: Int64 = 0
            for member in args.dropFirst() {
                if name == "SADD" ? members.insert(member).inserted : members.remove(member) != nil { changed += 1 }
            }
            values[args[0]] = members.isEmpty ? nil : .set(members)
            if members.isEmpty { expiry[args[0]] = nil }
            return .integer(changed)
        case "SMEMBERS", "SCARD":
            if let bad = arity(1) { return bad }
            switch values[args[0]] {
            case .set(let s)?:
                if name == "SCARD" { return .integer(Int64(s.count)) }
                // Sorted: Redis gives no order, and a test should not depend on one.
                return .array(s.sorted { $0.lexicographicallyPrecedes($1) }.map { .string($0) })
            case .string?: return wrongType
            case nil: return name == "SCARD" ? .integer(0) : .array([])
            }
        case "SISMEMBER":
            if let bad = arity(2) { return bad }
            switch values[args[0]] {
            case .set(let s)?: return .integer(s.contains(args[1]) ? 1 : 0)
            case .string?: return wrongType
            case nil: return .integer(0)
            }
        default:
            return .error("\(Self.unknownPrefix) does not know '\(name)' (it knows \(Self.commands.joined(separator: ", ")))")
        }
    }
}
