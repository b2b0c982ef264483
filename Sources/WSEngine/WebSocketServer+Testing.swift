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
        let state = LoopState(index: 0, eventLoop: loop, application: application, logger: logger, compressionLevel: configuration.compressionLevel)
        let pipeline = ServerPipeline(configuration: configuration, files: nil, loops: [ObjectIdentifier(loop): NIOLoopBound(state, eventLoop: loop)])
        try pipeline.configure(channel)
    }
}
