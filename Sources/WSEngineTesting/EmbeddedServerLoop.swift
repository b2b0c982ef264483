import Logging
import NIOCore
import NIOEmbedded
@_spi(Testing) import WSEngine

/// One event loop of the server on an `EmbeddedEventLoop`, with as many connections as asked
/// for: each an `EmbeddedChannel` with the real pipeline, all sharing the loop's application,
/// idle-timer queue and keep-alive sweep, as connections of one loop of the real server do.
/// Time is the loop's, moved by hand (`loop.advanceTime`): what `luaws test` runs plugins on.
/// `EmbeddedServer` is the one-connection version the engine's own tests use.
public final class EmbeddedServerLoop {
    public let loop: EmbeddedEventLoop
    private let server: LoopServerForTesting

    /// `makeApplication` gets the loop (a Lua plugin host is made for one loop).
    public init(
        configuration: ServerConfiguration, logger: Logger, keepAlive: Bool = true,
        makeApplication: (EmbeddedEventLoop) throws -> WebSocketApplication
    ) rethrows {
        loop = EmbeddedEventLoop()
        server = LoopServerForTesting(
            configuration: configuration, eventLoop: loop, application: try makeApplication(loop), logger: logger, keepAlive: keepAlive)
    }

    /// A new connected client channel, from `remoteAddress`: write the client's bytes with
    /// `writeInbound`, read the server's with `readOutbound`.
    public func connect(remoteAddress: String = "127.0.0.1", port: Int = 40000) throws -> EmbeddedChannel {
        let channel = EmbeddedChannel(loop: loop)
        try server.configure(channel)
        try channel.connect(to: SocketAddress(ipAddress: remoteAddress, port: port)).wait()
        return channel
    }

    /// Open WebSocket connections.
    public var connectionCount: Int { server.connectionCount }

    /// Stops the loop: scheduled tasks are cancelled.
    public func shutdown() {
        try? loop.syncShutdownGracefully()
    }
}
