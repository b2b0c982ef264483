import ArgumentParser
import Dispatch
import Foundation
import Logging
import LuaWSApp
import NIOCore
import ScriptHost
import WSEngine

@main
struct Luaws: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "luaws",
        abstract: "A WebSocket server whose behaviour is written in Lua.",
        subcommands: [Serve.self, Check.self],
        defaultSubcommand: Serve.self
    )
}

extension Logger.Level: @retroactive ExpressibleByArgument {}
extension SlowConsumerPolicy: ExpressibleByArgument {}

/// `--var NAME=VALUE` items as a dictionary (a missing `=VALUE` gives an empty value).
func parseVars(_ items: [String]) -> [String: String] {
    var vars: [String: String] = [:]
    for item in items {
        let parts = item.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
        vars[String(parts[0])] = parts.count > 1 ? String(parts[1]) : ""
    }
    return vars
}

extension TimeAmount {
    static func seconds(_ value: Double) -> TimeAmount { .nanoseconds(Int64((value * 1e9).rounded())) }
}

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Serve WebSockets with the Lua plugins of a scripts folder (the default command).")

    @Option(help: "Address to listen on.")
    var host = "127.0.0.1"

    @Option(help: "Port to listen on (0 picks a free one and prints it).")
    var port = 8000

    @Option(help: "Plugins: a folder of *.lua files (loaded in name order) or one .lua file.")
    var scripts = "./scripts"

    @Option(name: .customLong("public"), help: "Folder served over HTTP (/ is index.html).")
    var publicDirectory = "./public"

    @Option(name: .customLong("ws-path"), help: "Path that upgrades to a WebSocket (repeatable).")
    var webSocketPaths: [String] = ["/ws"]

    @Option(name: .customLong("var"), help: "NAME=VALUE made available to scripts as luaws.var(NAME) (repeatable).")
    var vars: [String] = []

    @Option(help: "Event loops (threads), each with its own Lua state. Default: one per core.")
    var threads: Int?

    @Option(help: "Lua VM instructions one hook call may run before it is stopped (0 = no limit).")
    var instructionBudget = ScriptLimits().instructionBudget

    @Option(help: "Memory cap of each Lua state, in MiB (0 = no limit).")
    var luaMemoryMb = ScriptLimits().memoryLimit >> 20

    @Option(help: "Largest message accepted, in bytes (larger: closed with 1009).")
    var maxMessageSize = ServerConfiguration().maxMessageSize

    @Option(name: .customLong("allow-origin"), help: "Browser Origin allowed to connect, e.g. https://example.com (repeatable; default: any).")
    var allowedOrigins: [String] = []

    @Option(help: "Open WebSocket connections at most (more get 503).")
    var maxConnections = ServerConfiguration().maxConnections

    @Option(help: "Seconds an HTTP connection may take to send a complete request.")
    var handshakeTimeout = 10.0

    @Option(help: "Seconds of silence from a client before the server pings it.")
    var pingInterval = 30.0

    @Option(help: "Seconds to wait for anything after a ping before dropping the client.")
    var pongTimeout = 30.0

    @Option(help: "Close (1001) a client that sent no message for this many seconds (0 = never).")
    var idleTimeout = 0.0

    @Option(help: "Bytes queued for one client before it counts as a slow consumer.")
    var maxOutboundBytes = ServerConfiguration().maxOutboundBytes

    @Option(help: "close (1008) or drop: what happens to a slow consumer.")
    var slowConsumer = SlowConsumerPolicy.close

    @Flag(inversion: .prefixedNo, help: "Offer permessage-deflate compression (RFC 7692).")
    var compression = true

    @Flag(help: .hidden)
    var builtinEcho = false

    @Option(help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel: Logger.Level = .info

    func validate() throws {
        for item in vars where !item.contains("=") {
            throw ValidationError("--var takes NAME=VALUE, got '\(item)'")
        }
        for value in [handshakeTimeout, pingInterval, pongTimeout] where !(value > 0) {
            throw ValidationError("timeouts and intervals must be positive numbers of seconds")
        }
        for path in webSocketPaths where !path.hasPrefix("/") {
            throw ValidationError("--ws-path must start with /, got '\(path)'")
        }
    }

    func run() async throws {
        let level = logLevel
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "luaws")

        let plugins: PluginSet
        do {
            plugins = try PluginSet.read(from: scripts)
        } catch {
            logger.critical("cannot read scripts: \(error)")
            throw ExitCode(1)
        }
        let pluginVars = parseVars(vars)
        let limits = ScriptLimits(instructionBudget: instructionBudget, memoryLimit: luaMemoryMb << 20)

        var configuration = ServerConfiguration()
        configuration.host = host
        configuration.port = port
        configuration.webSocketPaths = Set(webSocketPaths)
        configuration.maxMessageSize = maxMessageSize
        configuration.maxFrameSize = maxMessageSize
        configuration.compression = compression
        configuration.allowedOrigins = allowedOrigins.isEmpty ? nil : Set(allowedOrigins)
        configuration.maxConnections = maxConnections
        configuration.handshakeTimeout = .seconds(handshakeTimeout)
        configuration.pingInterval = .seconds(pingInterval)
        configuration.pongTimeout = .seconds(pongTimeout)
        configuration.idleTimeout = idleTimeout > 0 ? .seconds(idleTimeout) : nil
        configuration.maxOutboundBytes = maxOutboundBytes
        configuration.slowConsumerPolicy = slowConsumer
        if let threads { configuration.eventLoops = threads }
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: publicDirectory, isDirectory: &isDirectory), isDirectory.boolValue {
            configuration.publicDirectory = publicDirectory
        } else {
            logger.warning("public folder \(publicDirectory) not found: serving no page")
        }

        let cluster = ScriptCluster(plugins: plugins, vars: pluginVars, limits: limits, logger: logger)
        configuration.routes["/luaws/status"] = { eventLoop in
            eventLoop.makeFutureWithTask { await StatusPage.json(cluster) }
        }

        let server: WebSocketServer
        do {
            let builtin = builtinEcho
            server = try await WebSocketServer.start(configuration: configuration, logger: logger) { _, eventLoop in
                builtin ? BuiltinEcho() as WebSocketApplication : LuaApplication(plugins: try cluster.makeHost(on: eventLoop))
            }
        } catch let error as PluginLoadError {
            logger.critical("scripts did not load: \(error.message)")
            throw ExitCode(1)
        }
        let names = plugins.plugins.map(\.name).joined(separator: ", ")
        let port = server.localAddress?.port ?? port
        logger.info("plugins: \(names.isEmpty ? "(none)" : names)")
        // Watching starts before the banner, so that a change made as soon as it is out is seen.
        let reloader = Reloader(scripts: scripts, cluster: cluster, logger: logger)
        reloader.watchFiles()
        // The first line on stdout says where to connect; tests read the port from it.
        let banner = "luaws listening on http://\(host):\(port) (WebSocket paths: \(webSocketPaths.joined(separator: " ")))\n"
        FileHandle.standardOutput.write(Data(banner.utf8))

        let reloading = Task { await reloader.run() }

        for await signal in Signals.stream([SIGINT, SIGTERM, SIGHUP]) {
            if signal == SIGHUP {
                reloader.request("SIGHUP")
                continue
            }
            logger.info("signal \(signal): closing every connection with 1001")
            break
        }
        reloading.cancel()
        await server.shutdown(code: 1001)
    }
}
