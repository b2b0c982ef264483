import ArgumentParser
import Dispatch
import Foundation
import Logging
import LuaWSApp
import LuaWSMetrics
import NIOCore
import RedisClient
import ScriptHost
import WSEngine

@main
struct Luaws: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "luaws",
        abstract: "A WebSocket server whose behaviour is written in Lua.",
        version: "luaws \(luawsVersion)",
        subcommands: [Serve.self, Check.self, TestCommand.self, ShowConfig.self],
        defaultSubcommand: Serve.self
    )
}

/// Printed by `luaws --version`.
let luawsVersion = "0.2.0"

extension Logger.Level: @retroactive ExpressibleByArgument {}

/// `--access-log on|off`.
enum Switch: String, ExpressibleByArgument, CaseIterable {
    case on, off
}

/// `HOST:PORT` (IPv6 in brackets: `[::1]:9090`), or nil if it is not one.
func parseHostPort(_ text: String) -> (host: String, port: Int)? {
    guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]), (0...65535).contains(port) else { return nil }
    var host = String(text[..<colon])
    if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
    guard !host.isEmpty else { return nil }
    return (host, port)
}
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

/// A `--var-file`: NAME=VALUE lines; blank lines and lines starting with # are skipped.
func readVarFile(_ path: String) throws -> [String: String] {
    guard let data = FileManager.default.contents(atPath: path) else {
        throw ValidationError("--var-file \(path): cannot read")
    }
    var vars: [String: String] = [:]
    for (number, line) in String(decoding: data, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
        let trimmed = line.trimmingCharacters(in: .whitespaces)
        if trimmed.isEmpty || trimmed.hasPrefix("#") { continue }
        guard let equals = trimmed.firstIndex(of: "="), equals != trimmed.startIndex else {
            throw ValidationError("--var-file \(path):\(number + 1): expected NAME=VALUE")
        }
        vars[String(trimmed[..<equals]).trimmingCharacters(in: .whitespaces)] = String(trimmed[trimmed.index(after: equals)...])
    }
    return vars
}

extension TimeAmount {
    /// Seconds from a validated option (see `Serve.validate`: finite, positive, at most 1e9).
    static func option(_ value: Double) -> TimeAmount { TimeAmount(seconds: min(max(value, 0), 1e9)) ?? TimeAmount.nanoseconds(1_000_000_000 * 1_000_000_000) }
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

    @Option(help: "Memory cap of the shared store (luaws.shared), in MiB (0 = no limit).")
    var sharedMemoryMb = ScriptLimits().sharedMemoryLimit >> 20

    @Option(help: "Seconds a shutdown (SIGTERM, SIGINT) may take before the process exits anyway.")
    var shutdownTimeout = 10.0

    @Option(help: "Seconds a hook may wait (luaws.sleep, luaws.http, luaws.redis) before it is cancelled.")
    var hookTimeout = 30.0

    @Option(help: "Messages of one connection that may wait behind its waiting hook before the server stops reading from it.")
    var maxPendingMessages = ScriptLimits().maxPendingMessages

    @Option(help: "Bytes of messages that may wait behind a waiting hook before the server stops reading from its connection.")
    var maxPendingBytes = ScriptLimits().maxPendingBytes

    @Option(help: "Seconds an HTTP request from a script may take when it gives no timeout.")
    var httpTimeout = 10.0

    @Option(help: "Largest HTTP response body a script may receive, in bytes.")
    var httpMaxResponse = LiveServices.Settings().maxResponseBytes

    @Option(help: "Redis for luaws.redis: redis://[:PASSWORD@]HOST:PORT[/DB] (the password is never logged).")
    var redis: String?

    @Flag(help: "Spread publish, broadcast, subscriptions and luaws.shared over Redis (needs --redis): every luaws process on the same Redis is one server.")
    var cluster = false

    @Option(help: "Prefix of every Redis key and channel luaws uses with --cluster.")
    var redisPrefix = "luaws:"

    @Flag(help: "With --redis: refuse to start while Redis cannot be reached (by default luaws starts and keeps retrying).")
    var redisRequired = false

    @Flag(help: "Set SO_REUSEPORT, so that several luaws processes can share one port.")
    var reusePort = false

    @Option(name: .customLong("trust-proxy"), help: "A proxy (IP or CIDR) whose X-Forwarded-For is believed for conn.remote_addr (repeatable).")
    var trustedProxies: [String] = []

    @Option(help: "Largest request body a plugin route accepts, in bytes (larger: 413).")
    var maxBodySize = ServerConfiguration().maxBodySize

    @Option(name: .customLong("var-file"), help: "A file of NAME=VALUE lines (# comments) for luaws.var, so that secrets stay off the command line (repeatable; --var wins).")
    var varFiles: [String] = []

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

    @Option(help: "A compressed message may inflate to this many times its size, or to 1 MiB (larger: closed with 1009; 0 = no ratio limit).")
    var maxCompressedRatio = ServerConfiguration().maxCompressedRatio

    @Flag(help: .hidden)
    var builtinEcho = false

    @Option(name: .customLong("tls-cert"), help: "PEM certificate chain (leaf first): serve https:// and wss:// (with --tls-key; re-read on SIGHUP).")
    var tlsCertificate: String?

    @Option(name: .customLong("tls-key"), help: "PEM private key of --tls-cert.")
    var tlsKey: String?

    @Option(help: "HOST:PORT of a separate plain-HTTP listener for /luaws/status, /metrics, /healthz, /readyz and the dev console, /luaws/console (port 0 picks a free one).")
    var admin: String?

    @Flag(help: "Also serve /luaws/status, /metrics, /healthz, /readyz and the dev console (/luaws/console) on the public listener (for development).")
    var adminOnPublic = false

    // Seconds between the console's keep-alive comments (/luaws/events): tests shorten it.
    @Option(help: .hidden)
    var consoleKeepAlive = 15.0

    @Option(help: "on or off: one log line per closed WebSocket connection, at info.")
    var accessLog = Switch.on

    @Option(help: "trace, debug, info, notice, warning, error or critical.")
    var logLevel: Logger.Level = .info

    @Option(help: "text or json (one object per line: ts, level, label, message, metadata).")
    var logFormat = LogFormat.text

    // Read before parsing (see ConfigSources): here so that help shows it and parsing accepts it.
    @Option(help: "A TOML (.toml) or YAML (.yaml, .yml) file of these options, keys as the long names (max-connections or max_connections). Command line > LUAWS_* environment variables > file.")
    var config: String?

    func validate() throws {
        for item in vars where !item.contains("=") {
            throw ValidationError("--var takes NAME=VALUE, got '\(item)'")
        }
        for value in [handshakeTimeout, pingInterval, pongTimeout, shutdownTimeout, hookTimeout, httpTimeout, consoleKeepAlive] where !(value > 0 && value <= 1e9) {
            throw ValidationError("timeouts and intervals must be positive numbers of seconds, at most 1e9")
        }
        if !(idleTimeout >= 0 && idleTimeout <= 1e9) {
            throw ValidationError("--idle-timeout must be between 0 and 1e9 seconds")
        }
        for value in [luaMemoryMb, sharedMemoryMb] where value < 0 || value > 1 << 30 {
            throw ValidationError("memory caps must be between 0 and \(1 << 30) MiB")
        }
        if instructionBudget < 0 {
            throw ValidationError("--instruction-budget must be 0 (no limit) or more")
        }
        for value in [maxPendingMessages, maxPendingBytes, httpMaxResponse] where value < 1 {
            throw ValidationError("--max-pending-messages, --max-pending-bytes and --http-max-response must be at least 1")
        }
        for proxy in trustedProxies where IPRange(proxy) == nil {
            throw ValidationError("--trust-proxy takes an IP address or a CIDR range, e.g. 10.0.0.0/8, got '\(proxy)'")
        }
        if maxBodySize < 0 { throw ValidationError("--max-body-size must be 0 or more") }
        if let redis {
            do { _ = try RedisURL(redis) } catch { throw ValidationError("--redis: \(error)") }
        }
        if cluster && redis == nil { throw ValidationError("--cluster needs --redis redis://HOST:PORT") }
        if redisRequired && redis == nil { throw ValidationError("--redis-required needs --redis") }
        if (tlsCertificate == nil) != (tlsKey == nil) {
            throw ValidationError("--tls-cert and --tls-key go together")
        }
        if let admin, parseHostPort(admin) == nil {
            throw ValidationError("--admin takes HOST:PORT, e.g. 127.0.0.1:9090, got '\(admin)'")
        }
        for path in webSocketPaths where !path.hasPrefix("/") {
            throw ValidationError("--ws-path must start with /, got '\(path)'")
        }
    }

    func run() async throws {
        // Listened for from the start, and registered before anything else happens (see
        // Signals.stream): a SIGTERM that comes as soon as the banner is out (or before) must
        // not be lost.
        let signals = await Signals.stream([SIGINT, SIGTERM, SIGHUP])
        let level = logLevel
        let format = logFormat
        // Every log line also goes to the dev console's feed (/luaws/events), which keeps the
        // last ones for a console that opens later.
        var feedLimits = HTTPEventStream.Limits()
        feedLimits.keepAlive = .option(consoleKeepAlive)
        let feed = EventFeed(stream: HTTPEventStream(limits: feedLimits))
        LoggingSystem.bootstrap { label in FeedLogHandler(LineLogHandler(label: label, format: format, level: level), feed: feed) }
        let logger = Logger(label: "luaws")

        let plugins: PluginSet
        do {
            plugins = try PluginSet.read(from: scripts)
        } catch {
            logger.critical("cannot read scripts: \(error)")
            throw ExitCode(1)
        }
        // Before anything that must be shut down (the HTTP client) is made: a bad pair just exits.
        var certificates: CertificateStore?
        if let tlsCertificate, let tlsKey {
            do {
                certificates = try CertificateStore(certificate: tlsCertificate, key: tlsKey)
            } catch {
                logger.critical("TLS: \(error)")
                throw ExitCode(1)
            }
        }
        var pluginVars: [String: String] = [:]
        do {
            for file in varFiles { pluginVars.merge(try readVarFile(file)) { _, new in new } }
        } catch {
            logger.critical("\(error)")
            throw ExitCode(1)
        }
        pluginVars.merge(parseVars(vars)) { _, new in new }
        var limits = ScriptLimits(instructionBudget: instructionBudget, memoryLimit: luaMemoryMb << 20, sharedMemoryLimit: sharedMemoryMb << 20)
        limits.hookTimeout = hookTimeout
        limits.maxPendingMessages = maxPendingMessages
        limits.maxPendingBytes = maxPendingBytes
        var serviceSettings = LiveServices.Settings()
        serviceSettings.httpTimeout = .option(httpTimeout)
        serviceSettings.maxResponseBytes = httpMaxResponse
        serviceSettings.redis = try redis.map { try RedisURL($0) }
        let services = LiveServices(settings: serviceSettings, logger: logger)

        var configuration = ServerConfiguration()
        configuration.host = host
        configuration.port = port
        configuration.webSocketPaths = Set(webSocketPaths)
        configuration.maxMessageSize = maxMessageSize
        configuration.maxFrameSize = maxMessageSize
        configuration.compression = compression
        configuration.maxCompressedRatio = maxCompressedRatio
        configuration.allowedOrigins = allowedOrigins.isEmpty ? nil : Set(allowedOrigins)
        configuration.maxConnections = maxConnections
        configuration.handshakeTimeout = .option(handshakeTimeout)
        configuration.pingInterval = .option(pingInterval)
        configuration.pongTimeout = .option(pongTimeout)
        configuration.idleTimeout = idleTimeout > 0 ? .option(idleTimeout) : nil
        configuration.maxOutboundBytes = maxOutboundBytes
        configuration.slowConsumerPolicy = slowConsumer
        configuration.trustedProxies = trustedProxies.compactMap(IPRange.init)
        configuration.maxBodySize = maxBodySize
        configuration.reusePort = reusePort
        if let threads { configuration.eventLoops = threads }
        var isDirectory: ObjCBool = false
        if FileManager.default.fileExists(atPath: publicDirectory, isDirectory: &isDirectory), isDirectory.boolValue {
            configuration.publicDirectory = publicDirectory
        } else {
            logger.warning("public folder \(publicDirectory) not found: serving no page")
        }

        var bus: RedisBus?
        var remoteStore: RedisStore?
        if let url = serviceSettings.redis {
            if cluster {
                bus = RedisBus(url: url, prefix: redisPrefix, webSocketPaths: webSocketPaths, logger: logger)
                remoteStore = RedisStore(services: services, prefix: redisPrefix)
            }
            if redisRequired {
                let probe = bus ?? RedisBus(url: url, prefix: redisPrefix, webSocketPaths: [], logger: logger)
                let linked = await probe.waitForLink(timeout: .seconds(5))
                if bus == nil { await probe.shutdown() }
                if !linked {
                    logger.critical("Redis at \(url) cannot be reached (--redis-required)")
                    await bus?.shutdown()
                    await services.shutdown()
                    throw ExitCode(1)
                }
            }
        }
        let linkedBus = bus
        configuration.accessLog = accessLog == .on
        configuration.security = certificates

        // Plugin routes may not take the admin paths where they are served.
        let cluster = ScriptCluster(
            plugins: plugins, vars: pluginVars, limits: limits, logger: logger, services: services,
            reservedPaths: webSocketPaths + (adminOnPublic ? AdminRoutes.paths : []), bus: linkedBus, remoteStore: remoteStore)
        let reloader = Reloader(scripts: scripts, cluster: cluster, logger: logger, feed: feed)
        let exporter = MetricsExporter()
        exporter.bootstrapMetricsSystem()
        let adminRoutes = AdminRoutes(
            cluster: cluster, scripts: scripts, exporter: exporter, bus: linkedBus, requireRedis: redisRequired,
            feed: feed, publicListener: .init(host: host, tls: certificates != nil, webSocketPaths: webSocketPaths),
            reloadCounts: { reloader.reloadCounts },
            certificateReloadCounts: { [certificates] in certificates?.reloadCounts ?? [:] })
        if adminOnPublic {
            configuration.routes.merge(adminRoutes.routes) { _, new in new }
            configuration.eventStreams.merge(adminRoutes.eventStreams) { _, new in new }
        }
        if let admin, let (adminHost, adminPort) = parseHostPort(admin) {
            configuration.admin = AdminListener(host: adminHost, port: adminPort, routes: adminRoutes.routes, eventStreams: adminRoutes.eventStreams)
        }

        let server: WebSocketServer
        do {
            let builtin = builtinEcho
            let usesRedis = serviceSettings.redis != nil
            server = try await WebSocketServer.start(configuration: configuration, logger: logger) { _, eventLoop in
                if !builtin, usesRedis { services.connectRedis(on: [eventLoop]) }
                return builtin ? BuiltinEcho() as WebSocketApplication : LuaApplication(plugins: try cluster.makeHost(on: eventLoop))
            }
        } catch let error as PluginLoadError {
            logger.critical("scripts did not load: \(error.message)")
            await services.shutdown()  // an HTTP client dropped without it traps
            throw ExitCode(1)
        } catch {
            logger.critical("cannot listen: \(error)")
            await services.shutdown()
            throw ExitCode(1)
        }
        adminRoutes.serving(server)
        let names = plugins.plugins.map(\.name).joined(separator: ", ")
        let port = server.localAddress?.port ?? port
        logger.info("plugins: \(names.isEmpty ? "(none)" : names)")
        // Watching starts before the banner: an edit made as soon as the server says it listens
        // must not be missed.
        reloader.watchFiles()
        // The first line on stdout says where to connect (http:// or https://); tests read the
        // port from it. The admin listener, if any, is on the second.
        let scheme = certificates == nil ? "http" : "https"
        var banner = "luaws listening on \(scheme)://\(host):\(port) (WebSocket paths: \(webSocketPaths.joined(separator: " ")))\n"
        if let address = server.adminAddress, let (adminHost, _) = admin.flatMap(parseHostPort) {
            let shown = adminHost.contains(":") ? "[\(adminHost)]" : adminHost
            banner += "luaws admin on http://\(shown):\(address.port ?? 0)\n"
        }
        FileHandle.standardOutput.write(Data(banner.utf8))

        let reloading = Task { await reloader.run() }

        for await signal in signals {
            if signal == SIGHUP {
                reloader.request("SIGHUP")
                if let certificates {
                    do {
                        try certificates.reload()
                        logger.info("TLS: reloaded \(certificates.certificatePath) (new connections get it)")
                    } catch {
                        logger.error("TLS: reload refused, the previous certificate keeps serving: \(error)")
                    }
                }
                continue
            }
            logger.info("signal \(signal): closing every connection with 1001")
            break
        }
        reloading.cancel()
        // A loop stuck inside C (a script cannot be pre-empted there) would hold the shutdown
        // forever: past --shutdown-timeout the process exits anyway.
        let timeout = shutdownTimeout
        DispatchQueue.global().asyncAfter(deadline: .now() + timeout) {
            FileHandle.standardError.write(Data("luaws: shutdown took longer than \(timeout) s (--shutdown-timeout): exiting now\n".utf8))
            Foundation.exit(1)
        }
        // Redis and HTTP first: their reconnects must not schedule on loops that have stopped.
        await linkedBus?.shutdown()
        await services.shutdown()
        await server.shutdown(code: 1001, grace: .option(min(2, timeout)))
    }
}
