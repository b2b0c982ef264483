import Logging
import NIOCore
import NIOEmbedded
@_spi(Testing) import WSEngine

/// One server connection on an `EmbeddedChannel`: the real pipeline (HTTP, upgrade, frames),
/// driven byte by byte from a test or the fuzzer, with time advanced by hand.
public final class EmbeddedServer {
    public let loop: EmbeddedEventLoop
    public let channel: EmbeddedChannel

    /// A connected channel with the server's handlers and `application` serving it.
    public init(configuration: ServerConfiguration, application: WebSocketApplication) throws {
        loop = EmbeddedEventLoop()
        channel = EmbeddedChannel(loop: loop)
        let logger = Logger(label: "embedded", factory: { _ in SwiftLogNoOpLogHandler() })
        try WebSocketServer.configureForTesting(channel, configuration: configuration, application: application, logger: logger)
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 9)).wait()
    }

    /// Whether the server still has the connection open.
    public var isActive: Bool { channel.isActive }

    /// Delivers `bytes` as one read from the client, then runs what that scheduled to run now
    /// (the upgrade completes in a future callback, for one).
    public func feed(_ bytes: [UInt8]) throws {
        defer { loop.run() }
        try channel.writeInbound(ByteBuffer(bytes: bytes))
    }

    /// Runs the timers due within `amount`.
    public func advanceTime(by amount: TimeAmount) {
        loop.advanceTime(by: amount)
    }

    /// What the server wrote since the last call, as raw bytes.
    public func written() -> [UInt8] {
        var bytes: [UInt8] = []
        while let data = try? channel.readOutbound(as: IOData.self) {
            if case .byteBuffer(let buffer) = data { bytes += buffer.readableBytesView }
        }
        return bytes
    }

    /// Closes the channel and stops the loop.
    public func finish() {
        _ = try? channel.finish(acceptAlreadyClosed: true)
        try? loop.syncShutdownGracefully()
    }
}
