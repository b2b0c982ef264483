import Foundation
import Logging
import LuaWSApp
import NIOConcurrencyHelpers
import NIOCore
import NIOEmbedded
import ScriptHost
import WSEngine
import WSEngineTesting

/// What plugins log during a test: script errors (which fail the step that caused them) and
/// the rest (shown under a failing case, and by `test.logs()`).
final class LogSink: Sendable {
    private struct State {
        var lines: [String] = []
        var errors: [String] = []
    }
    private let state = NIOLockedValueBox(State())

    var logger: Logger {
        let sink = self
        var logger = Logger(label: "luaws.test") { _ in Handler(sink: sink) }
        logger.logLevel = .info
        return logger
    }

    var lines: [String] { state.withLockedValue { $0.lines } }

    func takeErrors() -> [String] {
        state.withLockedValue { state in
            defer { state.errors = [] }
            return state.errors
        }
    }

    fileprivate func add(_ level: Logger.Level, _ message: String) {
        state.withLockedValue { state in
            state.lines.append("\(level): \(message)")
            // PluginHost reports every failing hook, timer or route as "script error in ...".
            if level >= .error, message.hasPrefix("script error in ") {
                state.errors.append(String(message.dropFirst("script error in ".count)))
            }
        }
    }

    private struct Handler: LogHandler {
        let sink: LogSink
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .info

        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }

        func log(event: LogEvent) {
            sink.add(event.level, "\(event.message)")
        }
    }
}

/// The server as one test case sees it: one event loop of the real engine on an
/// `EmbeddedEventLoop` (virtual time), its Lua plugin host made as the server makes it, and
/// the test's client connections. No socket anywhere.
final class TestWorld {
    let server: EmbeddedServerLoop
    let host: PluginHost
    private(set) var clients: [TestClient] = []
    private let configuration: ServerConfiguration
    /// Where the virtual wall clock started (nanoseconds since the epoch).
    let epoch: Int64

    var loop: EmbeddedEventLoop { server.loop }

    init(plugins: PluginSet, vars: [String: String], configuration: ServerConfiguration, limits: ScriptLimits,
         services: TestServices, logger: Logger, epoch: Int64) throws {
        self.configuration = configuration
        self.epoch = epoch
        let cluster = ScriptCluster(
            plugins: plugins, vars: vars, limits: limits, logger: logger, services: services,
            reservedPaths: Array(configuration.webSocketPaths).sorted() + ["/luaws/status"])
        var made: PluginHost?
        server = try EmbeddedServerLoop(configuration: configuration, logger: logger) { loop in
            // luaws.now, utcnow_iso and os.time follow the loop's clock, as the engine's timers do.
            let host = try cluster.makeHost(on: loop, clock: { [weak loop] in epoch + Int64(loop?.now.uptimeNanoseconds ?? 0) })
            made = host
            return LuaApplication(plugins: host)
        }
        host = made!
    }

    /// The virtual time, in nanoseconds since the epoch.
    var now: Int64 { epoch + Int64(loop.now.uptimeNanoseconds) }

    /// A client that sends the opening handshake for `path`.
    func connect(path: String, headerLines: String, remoteAddress: String?) throws -> Int {
        let channel = try server.connect(remoteAddress: remoteAddress ?? "127.0.0.1")
        let client = TestClient(channel: channel)
        clients.append(client)
        try client.handshake(path: path, headerLines: headerLines)
        settle()
        return clients.count
    }

    /// A client that sends one plain HTTP request (for plugin routes).
    func request(method: String, path: String, headerLines: String, body: [UInt8], remoteAddress: String?) throws -> Int {
        let channel = try server.connect(remoteAddress: remoteAddress ?? "127.0.0.1")
        let client = TestClient(channel: channel)
        clients.append(client)
        try client.request(method: method, path: path, headerLines: headerLines, body: body)
        settle()
        return clients.count
    }

    func client(_ id: Int) -> TestClient? {
        clients.indices.contains(id - 1) ? clients[id - 1] : nil
    }

    /// Runs everything that can run at the current virtual time: the loop's tasks, then the
    /// clients' answers to what the server wrote, and again, until nothing moves.
    func settle() {
        for _ in 0..<100_000 {
            loop.run()
            var progressed = false
            for client in clients where client.collect() { progressed = true }
            if !progressed { return }
        }
    }

    /// Moves the virtual clock by `seconds`: tasks run in time order, and the clients answer
    /// (pings, close frames) at least once a virtual second, as a live client would, well
    /// within the server's pong and close timeouts.
    func advance(seconds: Double) {
        settle()
        var remaining = Int64((seconds * 1e9).rounded())
        let step: Int64 = 1_000_000_000
        while remaining > 0 {
            let now = min(step, remaining)
            loop.advanceTime(by: .nanoseconds(now))
            remaining -= now
            settle()
        }
    }

    /// Ends every connection and the loop (on_close hooks run; what they do is not judged).
    func shutdown() {
        for client in clients { _ = try? client.channel.finish(acceptAlreadyClosed: true) }
        loop.run()
        server.shutdown()
    }
}
