import Foundation
import Logging
import NIOCore
import ScriptHost
import WSEngine

/// Drives the plugins for one test file: answers its `test.*` calls (`ScriptTestDriver`),
/// with a fresh server world for each case, made lazily on the case's first need.
final class TestSession: ScriptTestDriver {
    /// What a file (at its top level) or a case sets up before the plugins load.
    struct Setup {
        var scripts: String
        var names: [String]?
        var vars: [String: String]
        var stubs: [TestServices.Stub] = []
    }

    /// The virtual wall clock starts here, 2025-01-01T00:00:00Z, in every case: tests may count
    /// on exact times.
    static let epoch: Int64 = 1_735_689_600 * 1_000_000_000

    private let file: String
    private let configuration: ServerConfiguration
    private let limits: ScriptLimits
    /// The file's setup (its top level), and the running case's copy.
    private var fileSetup: Setup
    private var caseSetup: Setup?
    private var world: TestWorld?
    private var services = TestServices()
    private var sink = LogSink()
    /// `test.fails` blocks open, and the hook errors they caught.
    private var failsDepth = 0
    private var caught: [String] = []
    /// Lines the test file printed.
    private(set) var printed: [String] = []

    init(file: String, scripts: String, vars: [String: String], configuration: ServerConfiguration, limits: ScriptLimits) {
        self.file = file
        self.configuration = configuration
        self.limits = limits
        fileSetup = Setup(scripts: scripts, vars: vars)
    }

    /// The virtual time, in nanoseconds since the epoch.
    var now: Int64 { world?.now ?? Self.epoch }

    func beginCase() {
        caseSetup = fileSetup
        services = TestServices()
        for stub in fileSetup.stubs { services.addStub(stub) }
        sink = LogSink()
        failsDepth = 0
        caught = []
        printed = []
    }

    /// Ends the case; returns hook errors nobody has seen yet (a failure). `logLines` keeps
    /// what was logged until now: the connections closed by the shutdown are not the test's.
    func endCase() -> String? {
        let late = pendingErrors()
        caseLog = sink.lines
        world?.shutdown()
        world = nil
        caseSetup = nil
        return late.isEmpty ? nil : "a plugin failed: " + late.joined(separator: "\n    ")
    }

    /// What the plugins logged in the case that ended, for a failure report.
    private(set) var caseLog: [String] = []

    private func pendingErrors() -> [String] {
        sink.takeErrors() + services.takeProblems()
    }

    /// After a step: hook errors fail it (at the test's line), unless `test.fails` expects them.
    private func checked(_ value: ScriptTestValue = .nil) -> ScriptTestValue {
        let errors = pendingErrors()
        if errors.isEmpty { return value }
        if failsDepth > 0 {
            caught += errors
            return value
        }
        return .error("a plugin failed: " + errors.joined(separator: "\n    "))
    }

    private func ensureWorld() throws -> TestWorld {
        if let world { return world }
        guard let setup = caseSetup else { throw TestServiceError(message: "only inside test.case") }
        var set = try PluginSet.read(from: setup.scripts)
        if let names = setup.names {
            let known = set.plugins.map(\.name)
            for name in names where !known.contains(name) && !known.contains((name as NSString).deletingPathExtension) {
                throw TestServiceError(message: "test.plugins: no plugin '\(name)' in \(setup.scripts) (there are: \(known.joined(separator: ", ")))")
            }
            set.plugins = set.plugins.filter { names.contains($0.name) || names.contains($0.path) }
        }
        let made = try TestWorld(
            plugins: set, vars: setup.vars, configuration: configuration, limits: limits, services: services,
            logger: sink.logger, epoch: Self.epoch)
        world = made
        return made
    }

    private func path(relativeToFile path: String) -> String {
        if path.hasPrefix("/") { return path }
        let directory = (file as NSString).deletingLastPathComponent
        return ((directory.isEmpty ? "." : directory) as NSString).appendingPathComponent(path).standardizingPathForDisplay
    }

    // MARK: ScriptTestDriver

    func testLog(_ message: String) {
        printed.append(message)
    }

    func testCall(_ name: String, _ args: [ScriptTestValue]) -> ScriptTestValue {
        do {
            return try call(name, args)
        } catch let error as PluginLoadError {
            return .error("the plugins did not load: \(error.message)")
        } catch {
            return .error("\(error)")
        }
    }

    private func call(_ name: String, _ args: [ScriptTestValue]) throws -> ScriptTestValue {
        func string(_ i: Int) -> String? { args.indices.contains(i) ? args[i].string : nil }
        func number(_ i: Int) -> Double? { args.indices.contains(i) ? args[i].number : nil }
        func client(_ what: String) throws -> TestClient {
            guard let id = args.first?.integer, let client = world?.client(Int(id)) else {
                throw TestServiceError(message: "\(what): not a connection of this case")
            }
            return client
        }
        /// Setup may change until the plugins are loaded for the case.
        func setup(_ what: String, _ change: (inout Setup) -> Void) throws -> ScriptTestValue {
            if caseSetup == nil {
                change(&fileSetup)
            } else {
                guard world == nil else { throw TestServiceError(message: "test.\(what) must come before the case's first connect (the plugins are loaded by then)") }
                change(&caseSetup!)
            }
            return .nil
        }

        switch name {
        case "fails_begin":
            failsDepth += 1
            return .nil
        case "fails_end":
            _ = checked()
            failsDepth -= 1
            defer { caught = [] }
            return caught.isEmpty ? .nil : .string(caught.joined(separator: "\n"))

        case "plugins":
            let names = (string(0) ?? "").split(separator: "\n").map(String.init)
            return try setup("plugins") { $0.names = names }
        case "scripts":
            let resolved = path(relativeToFile: string(0) ?? "")
            guard FileManager.default.fileExists(atPath: resolved) else {
                throw TestServiceError(message: "test.scripts: \(resolved): no such file or folder")
            }
            return try setup("scripts") { $0.scripts = resolved; $0.names = nil }
        case "set_var":
            let (key, value) = (string(0) ?? "", string(1) ?? "")
            return try setup("set_var") { $0.vars[key] = value }
        case "http_stub":
            let headers = (string(2) ?? "").split(separator: "\n").compactMap { line -> (name: String, value: String)? in
                guard let colon = line.firstIndex(of: ":") else { return nil }
                return (String(line[..<colon]), String(line[line.index(after: colon)...].drop { $0 == " " }))
            }
            let stub = TestServices.Stub(
                url: string(0) ?? "", status: Int(args[1].integer ?? 200), headers: headers, body: Self.unhex(string(3) ?? ""),
                delay: number(5), error: string(4))
            if caseSetup == nil { fileSetup.stubs.append(stub) } else { services.addStub(stub) }
            return .nil
        case "now":
            return .number(Double(now) / 1e9)
        case "logs":
            return .string(Self.json(sink.lines))

        case "connect":
            let world = try ensureWorld()
            let id = try world.connect(path: string(0) ?? "/", headerLines: string(1) ?? "", remoteAddress: string(2))
            return checked(.integer(Int64(id)))
        case "request":
            let world = try ensureWorld()
            let id = try world.request(
                method: string(0) ?? "GET", path: string(1) ?? "/", headerLines: string(2) ?? "", body: Self.unhex(string(3) ?? ""),
                remoteAddress: string(4))
            return checked(.integer(Int64(id)))
        case "advance":
            let world = try ensureWorld()
            world.advance(seconds: number(0) ?? 0)
            return checked()
        case "send":
            let client = try client("send")
            guard client.state == .open else { throw TestServiceError(message: "send: the connection is \(Self.describe(client))") }
            try client.send(binary: string(1) == "binary", Self.unhex(string(2) ?? ""))
            world?.settle()
            return checked()
        case "close":
            let client = try client("close")
            guard client.state == .open else { throw TestServiceError(message: "close: the connection is \(Self.describe(client))") }
            try client.close(code: UInt16(clamping: args[1].integer ?? 1000), reason: string(2) ?? "")
            world?.settle()
            return checked()
        case "recv":
            guard let message = try client("recv").receive() else { return .nil }
            return .bytes([UInt8(ascii: message.binary ? "b" : "t")] + message.data)
        case "field":
            return try field(client("field"), string(1) ?? "")

        case "http_requests":
            return .string(Self.json(services.requests.map { request -> [String: Any] in
                ["method": request.method, "url": request.url, "body": String(decoding: request.body, as: UTF8.self),
                 "headers": Dictionary(request.headers.map { ($0.name.lowercased(), $0.value) }, uniquingKeysWith: { a, b in a + ", " + b })]
            }))
        case "redis":
            guard caseSetup != nil else { throw TestServiceError(message: "test.redis can only be used inside test.case") }
            let arguments = (string(0) ?? "").split(separator: " ").map { Self.unhex(String($0)) }
            let reply = services.redisFromTest(arguments, now: world?.loop.now ?? .uptimeNanoseconds(0))
            if case .error(let message) = reply { return .string(Self.json(["err": message])) }
            return .string(Self.json(["value": Self.plain(reply)]))
        case "reload":
            let world = try ensureWorld()
            let set = try reloadSet(kind: string(0) ?? "same", string(1) ?? "")
            do {
                world.host.activate(try world.host.prepare(set))
            } catch let error as PluginLoadError {
                throw TestServiceError(message: "reload failed (the previous plugins keep serving): \(error.message)")
            }
            world.settle()
            return checked()
        default:
            throw TestServiceError(message: "test.\(name) is not known to this runner")
        }
    }

    /// The plugin set a `test.reload` asks for.
    private func reloadSet(kind: String, _ payload: String) throws -> PluginSet {
        let setup = caseSetup!
        switch kind {
        case "path":
            return try PluginSet.read(from: path(relativeToFile: payload))
        case "names":
            var set = try PluginSet.read(from: setup.scripts)
            let names = payload.split(separator: "\n").map(String.init)
            set.plugins = set.plugins.filter { names.contains($0.name) || names.contains($0.path) }
            return set
        case "sources":
            var set = try PluginSet.read(from: setup.scripts)
            let sources = (try? JSONSerialization.jsonObject(with: Data(payload.utf8))) as? [String: String] ?? [:]
            set.plugins = sources.keys.sorted().map { file in
                PluginSource(name: (file as NSString).deletingPathExtension, path: file, source: sources[file]!)
            }
            return set
        default:
            var set = try PluginSet.read(from: setup.scripts)
            if let names = setup.names { set.plugins = set.plugins.filter { names.contains($0.name) || names.contains($0.path) } }
            return set
        }
    }

    private func field(_ client: TestClient, _ name: String) -> ScriptTestValue {
        switch name {
        case "status":
            switch client.state {
            case .connecting: return .nil
            case .refused(let status): return .integer(Int64(status))
            case .open, .closed: return .integer(101)
            }
        case "refused":
            if case .refused(let status) = client.state { return .integer(Int64(status)) }
            return .nil
        case "body": return .string(client.body)
        case "pending": return .bool(client.state == .connecting)
        case "open": return .bool(client.state == .open)
        case "closed": return .bool(client.state == .closed)
        case "close_code": return client.closeCode.map { .integer(Int64($0)) } ?? .nil
        case "close_reason": return client.closeReason.map { .string($0) } ?? .nil
        case "protocol": return client.subprotocol.map { .string($0) } ?? .nil
        case "headers":
            return .string(Self.json(Dictionary(client.headers.map { ($0.name, $0.value) }, uniquingKeysWith: { a, b in a + ", " + b })))
        default: return .nil
        }
    }

    private static func describe(_ client: TestClient) -> String {
        switch client.state {
        case .connecting: "still connecting (on_upgrade waits: advance the clock)"
        case .refused(let status): "refused (\(status))"
        case .closed: "closed (code \(client.closeCode.map(String.init) ?? "none"))"
        case .open: "open"
        }
    }

    private static func plain(_ reply: ScriptRedisReply) -> Any {
        switch reply {
        case .string(let bytes): String(decoding: bytes, as: UTF8.self)
        case .status(let text): text
        case .integer(let n): n
        case .array(let items): items.map(plain)
        case .null: NSNull()
        case .error(let text): ["err": text]
        }
    }

    static func unhex(_ text: String) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(text.utf8.count / 2)
        var high: UInt8?
        for c in text.utf8 {
            let v: UInt8 = switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0")
            case UInt8(ascii: "a")...UInt8(ascii: "f"): c - UInt8(ascii: "a") + 10
            default: 0
            }
            if let h = high { bytes.append(h << 4 | v); high = nil } else { high = v }
        }
        return bytes
    }

    private static func json(_ value: Any) -> String {
        guard let data = try? JSONSerialization.data(withJSONObject: value, options: [.sortedKeys, .fragmentsAllowed]) else { return "null" }
        return String(decoding: data, as: UTF8.self)
    }
}

extension String {
    /// `a/b/../c` as `a/c`, keeping a relative path relative (NSString's standardizing would
    /// not remove `..` from a relative path).
    var standardizingPathForDisplay: String {
        var parts: [Substring] = []
        let absolute = hasPrefix("/")
        for part in split(separator: "/") {
            if part == "." { continue }
            if part == "..", let last = parts.last, last != ".." { parts.removeLast(); continue }
            parts.append(part)
        }
        return (absolute ? "/" : "") + parts.joined(separator: "/")
    }
}
