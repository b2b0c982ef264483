import NIOCore

/// How the server listens and what it accepts. A plain struct: build one, hand it to `WebSocketServer`.
public struct ServerConfiguration: Sendable {
    /// Address to bind. `127.0.0.1` by default: exposing the server is a decision, not a default.
    public var host: String = "127.0.0.1"
    /// Port to bind; 0 picks a free one (`WebSocketServer.start` returns the one bound).
    public var port: Int = 8000
    /// Request paths that upgrade to a WebSocket.
    public var webSocketPaths: Set<String> = ["/ws"]
    /// Folder served for other GET requests (`/` is `index.html`); nil serves nothing (404).
    public var publicDirectory: String? = nil
    /// Event loops (threads); each has its own application instance (its own Lua state).
    public var eventLoops: Int = System.coreCount
    /// Largest frame accepted; a larger one fails the connection with 1009.
    public var maxFrameSize: Int = 16 << 20
    /// Largest message (all fragments together); a larger one fails the connection with 1009.
    public var maxMessageSize: Int = 16 << 20
    /// Offer permessage-deflate (RFC 7692) to clients that ask for it.
    public var compression = true
    /// Messages shorter than this are sent uncompressed even when compression is on.
    public var compressionThreshold = 128
    /// zlib level for outgoing messages (1 fastest … 9 smallest).
    public var compressionLevel: Int32 = 6
    /// How long the server waits for the client's close frame after sending its own.
    public var closeTimeout: TimeAmount = .seconds(5)

    /// Extra HTTP GET endpoints (exact paths), answered before the public folder: e.g. a status page.
    public var routes: [String: HTTPRoute] = [:]

    public init() {}
}

/// An HTTP endpoint the embedding provides; it runs on the connection's event loop.
public typealias HTTPRoute = @Sendable (EventLoop) -> EventLoopFuture<HTTPRouteResponse>

public struct HTTPRouteResponse: Sendable {
    public var status: Int
    public var contentType: String
    public var body: String

    public init(status: Int = 200, contentType: String, body: String) {
        self.status = status
        self.contentType = contentType
        self.body = body
    }
}
