import Logging
import NIOCore

extension WebSocketServer {
    /// Installs on `channel` the handlers `start` gives every accepted connection, served by
    /// `application`, without binding or starting anything else (no keep-alive sweep, no public
    /// folder). The one seam through which `WSEngineTesting` drives the engine on an
    /// `EmbeddedChannel`; `application` runs on `channel.eventLoop`.
    @_spi(Testing)
    public static func configureForTesting(
        _ channel: Channel,
        configuration: ServerConfiguration,
        application: WebSocketApplication,
        logger: Logger
    ) throws {
        let loop = channel.eventLoop
        let state = LoopState(index: 0, eventLoop: loop, application: application, logger: logger, configuration: configuration)
        let pipeline = ServerPipeline(configuration: configuration, files: nil, loops: [ObjectIdentifier(loop): NIOLoopBound(state, eventLoop: loop)])
        try pipeline.configure(channel)
    }
}

/// One event loop of a server without a listening socket: every channel handed to `configure`
/// gets the handlers an accepted connection gets, and they all share the loop's state (its
/// application, its idle-timer queue, its connection slots, its keep-alive sweep), as the
/// connections of one loop of a real server do. What `luaws test` drives on an
/// `EmbeddedEventLoop`, where it advances the loop's (virtual) clock by hand.
@_spi(Testing)
public final class LoopServerForTesting {
    private let state: LoopState
    private let pipeline: ServerPipeline

    /// Must be made on `eventLoop`; with `keepAlive`, the sweep (pings, pong timeout, idle
    /// timeout) runs as `WebSocketServer.start` runs it.
    public init(configuration: ServerConfiguration, eventLoop: EventLoop, application: WebSocketApplication, logger: Logger, keepAlive: Bool = true) {
        state = LoopState(index: 0, eventLoop: eventLoop, application: application, logger: logger, configuration: configuration)
        pipeline = ServerPipeline(configuration: configuration, files: nil, loops: [ObjectIdentifier(eventLoop): NIOLoopBound(state, eventLoop: eventLoop)])
        if keepAlive { state.startSweep(every: WebSocketServer.sweepInterval(configuration)) }
    }

    /// Installs the server's handlers on `channel` (a channel of this loop).
    public func configure(_ channel: Channel) throws {
        try pipeline.configure(channel)
    }

    /// Open WebSocket connections.
    public var connectionCount: Int { state.connections.count }
}
