import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOWebSocket

/// The WebSocket server: binds, upgrades requests on the configured paths, serves the public
/// folder, and hands each connection to the application instance of its event loop.
public final class WebSocketServer: Sendable {
    public typealias ApplicationFactory = @Sendable (_ loopIndex: Int, _ eventLoop: EventLoop) throws -> WebSocketApplication

    private let configuration: ServerConfiguration
    private let logger: Logger
    private let group: MultiThreadedEventLoopGroup
    private let threadPool: NIOThreadPool
    private let loops: [ObjectIdentifier: NIOLoopBound<LoopState>]
    private let serverChannel: Channel
    private let adminChannel: Channel?

    /// The address the server is bound to (with the real port when 0 was asked for).
    public var localAddress: SocketAddress? { serverChannel.localAddress }
    /// The admin listener's address, if there is one.
    public var adminAddress: SocketAddress? { adminChannel?.localAddress }

    /// How often a loop's keep-alive sweep runs: a quarter of the shortest keep-alive interval,
    /// between 10 ms and 1 s.
    static func sweepInterval(_ configuration: ServerConfiguration) -> TimeAmount {
        let shortest = [configuration.pingInterval, configuration.pongTimeout, configuration.idleTimeout ?? .seconds(3600)].min()!
        return TimeAmount.nanoseconds(min(max(shortest.nanoseconds / 4, 10_000_000), 1_000_000_000))
    }

    /// Makes one application per event loop, on that loop, then binds.
    public static func start(
        configuration: ServerConfiguration,
        logger: Logger,
        makeApplication: @escaping ApplicationFactory
    ) async throws -> WebSocketServer {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, configuration.eventLoops))
        let threadPool = NIOThreadPool(numberOfThreads: 1)
        threadPool.start()
        do {
            var loops: [ObjectIdentifier: NIOLoopBound<LoopState>] = [:]
            for (index, loop) in group.makeIterator().enumerated() {
                let state = try await loop.submit {
                    NIOLoopBound(LoopState(index: index, eventLoop: loop, application: try makeApplication(index, loop), logger: logger, configuration: configuration), eventLoop: loop)
                }.get()
                loops[ObjectIdentifier(loop)] = state
                let sweep = sweepInterval(configuration)
                try await loop.submit { state.value.startSweep(every: sweep) }.get()
            }
            let channel = try await bind(configuration: configuration, group: group, loops: loops, threadPool: threadPool, logger: logger)
            var admin: Channel?
            if let listener = configuration.admin {
                do {
                    admin = try await bindAdmin(listener, configuration: configuration, group: group)
                } catch {
                    try? await channel.close()
                    throw error
                }
            }
            return WebSocketServer(configuration: configuration, logger: logger, group: group, threadPool: threadPool, loops: loops, serverChannel: channel, adminChannel: admin)
        } catch {
            try? await group.shutdownGracefully()
            try? await threadPool.shutdownGracefully()
            throw error
        }
    }

    private init(configuration: ServerConfiguration, logger: Logger, group: MultiThreadedEventLoopGroup, threadPool: NIOThreadPool, loops: [ObjectIdentifier: NIOLoopBound<LoopState>], serverChannel: Channel, adminChannel: Channel?) {
        self.adminChannel = adminChannel
        self.configuration = configuration
        self.logger = logger
        self.group = group
        self.threadPool = threadPool
        self.loops = loops
        self.serverChannel = serverChannel
    }

    private static func bind(
        configuration: ServerConfiguration,
        group: MultiThreadedEventLoopGroup,
        loops: [ObjectIdentifier: NIOLoopBound<LoopState>],
        threadPool: NIOThreadPool,
        logger: Logger
    ) async throws -> Channel {
        let files = configuration.publicDirectory.map { StaticFiles(root: $0, threadPool: threadPool) }
        let pipeline = ServerPipeline(configuration: configuration, files: files, loops: loops)
        return try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 1024)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            // SO_REUSEPORT (NIO names no constant for it): several processes on one port.
            .serverChannelOption(ChannelOptions.Types.SocketOption(level: SocketOptionLevel(SOL_SOCKET), name: SocketOptionName(SO_REUSEPORT)), value: configuration.reusePort ? 1 : 0)
            .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
            .childChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.writeBufferWaterMark, value: .init(low: configuration.maxOutboundBytes / 2, high: configuration.maxOutboundBytes))
            // Small reads until the upgrade, into a buffer that stays small if nothing follows.
            .childChannelOption(.recvAllocator, value: ReceiveBuffers.Opening())
            .childChannelOption(.maxMessagesPerRead, value: ReceiveBuffers.openingReadsPerReadiness)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try pipeline.configure(channel) }
            }
            .bind(host: configuration.host, port: configuration.port)
            .get()
    }

    /// The admin listener: plain HTTP/1.1 and `HTTPHandler` with nothing but the listener's
    /// routes (no WebSocket paths, no public folder, no application), on the same event loops.
    private static func bindAdmin(_ listener: AdminListener, configuration: ServerConfiguration, group: MultiThreadedEventLoopGroup) async throws -> Channel {
        var settings = ServerConfiguration()
        settings.webSocketPaths = []
        settings.routes = listener.routes
        settings.eventStreams = listener.eventStreams
        settings.handshakeTimeout = configuration.handshakeTimeout
        settings.maxOutboundBytes = configuration.maxOutboundBytes
        let admin = settings
        let counter = ConnectionCounter(limit: 0)
        return try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 64)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.writeBufferWaterMark, value: .init(low: admin.maxOutboundBytes / 2, high: admin.maxOutboundBytes))
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                    try channel.pipeline.syncOperations.addHandler(HTTPHandler(configuration: admin, files: nil, counter: counter, loop: nil))
                }
            }
            .bind(host: listener.host, port: listener.port)
            .get()
    }

    /// The engine's figures so far, summed over the loops (each loop is asked on the loop).
    /// Every WebSocket path is there, with zeros if nothing happened on it.
    public func figures() async -> EngineFigures {
        var total = EngineFigures()
        for path in configuration.webSocketPaths { total.paths[path] = EngineFigures.PathFigures() }
        for loop in group.makeIterator() {
            guard let state = loops[ObjectIdentifier(loop)],
                  let figures = try? await loop.submit({ state.value.figures() }).get() else { continue }
            total.add(figures)
        }
        return total
    }

    /// Stops accepting, closes every connection with `code` (1001, going away, by default),
    /// waits up to `grace` for the closing handshakes, then stops the event loops.
    ///
    /// Nothing may reach a loop after it stopped (NIO prints "Cannot schedule tasks on an
    /// EventLoop that has already shut down"): so no future here completes on one loop while
    /// another waits on it (each loop closes and waits for its own connections, timer included,
    /// and this task awaits the loops), and the thread pool, whose file reads complete on the
    /// loops, stops before they do.
    public func shutdown(code: UInt16 = 1001, reason: String = "server shutting down", grace: TimeAmount = .seconds(2)) async {
        try? await serverChannel.close()
        try? await adminChannel?.close()
        // An event stream's response never ends by itself: its connections are closed now, while
        // the loops still run (nothing else waits for them).
        for stream in configuration.eventStreams.values { stream.close() }
        for stream in (configuration.admin?.eventStreams ?? [:]).values { stream.close() }
        await withTaskGroup(of: Void.self) { tasks in
            for loop in group.makeIterator() {
                guard let state = loops[ObjectIdentifier(loop)] else { continue }
                tasks.addTask {
                    try? await loop.flatSubmit { state.value.closeAll(code: code, reason: reason, grace: grace) }.get()
                }
            }
        }
        try? await threadPool.shutdownGracefully()
        try? await group.shutdownGracefully()
    }
}

/// Open WebSocket connections across all loops, against the configured maximum.
final class ConnectionCounter: Sendable {
    private let count = NIOLockedValueBox(0)
    let limit: Int

    init(limit: Int) { self.limit = limit }

    var isFull: Bool { count.withLockedValue { $0 >= limit } }

    func acquire() -> Bool {
        count.withLockedValue { count in
            guard count < limit else { return false }
            count += 1
            return true
        }
    }

    func release() { count.withLockedValue { $0 -= 1 } }
}

extension WebSocketRequest {
    static func offeredSubprotocols(_ headers: HTTPHeaders) -> [String] {
        headers["Sec-WebSocket-Protocol"].flatMap { $0.split(separator: ",") }
            .map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
    }

    init(head: HTTPRequestHead, peer: SocketAddress?, configuration: ServerConfiguration) {
        let (path, query) = head.pathAndQuery
        let client = ClientAddress.resolve(peer: peer, headers: head.headers, trusted: configuration.trustedProxies)
        self.init(path: path, query: query, headers: head.headers, remoteAddress: client, subprotocol: nil, context: nil)
    }
}
