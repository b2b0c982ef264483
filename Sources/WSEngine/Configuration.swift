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
    /// Browser origins allowed to open WebSockets (exact `Origin` values, e.g.
    /// `https://example.com`); nil allows any. Requests without `Origin` (non-browser clients)
    /// are always allowed. Guards against cross-site WebSocket hijacking.
    public var allowedOrigins: Set<String>? = nil
    /// Open WebSocket connections at most; more are refused with 503 before the upgrade.
    public var maxConnections = 20_000
    /// An HTTP connection that has not sent a complete request within this long (at first, or
    /// since its last response) is closed: no slowloris holding sockets open.
    public var handshakeTimeout: TimeAmount = .seconds(10)
    /// The server pings a connection it has heard nothing from for this long …
    public var pingInterval: TimeAmount = .seconds(30)
    /// … and drops it if nothing (no pong, no frame) comes back within this long.
    public var pongTimeout: TimeAmount = .seconds(30)
    /// Closes (1001) a connection that sent no message for this long; nil: never.
    public var idleTimeout: TimeAmount? = nil
    /// Bytes queued for one client beyond which it counts as a slow consumer (every frame
    /// counts: messages, pongs, pings, close frames). Over HTTP, a pipelined request waits until
    /// the responses queued before it drain below half of this.
    public var maxOutboundBytes = 4 << 20
    /// What happens to a slow consumer.
    public var slowConsumerPolicy = SlowConsumerPolicy.close

    /// Offer permessage-deflate (RFC 7692) to clients that ask for it.
    public var compression = true
    /// Messages shorter than this are sent uncompressed even when compression is on.
    public var compressionThreshold = 128
    /// A compressed message may inflate to this many times its compressed size, but always to
    /// at least `inflateFloor` (1 MiB) and never past `maxMessageSize`; a message that inflates
    /// further fails the connection with 1009 as soon as it does, so a small message cannot make
    /// the server inflate megabytes (zlib reaches ~1000:1). 0 or less: only `maxMessageSize` counts.
    public var maxCompressedRatio = 100
    /// Bytes any compressed message may inflate to whatever its ratio (see `maxCompressedRatio`).
    public static let inflateFloor = 1 << 20
    /// zlib level for outgoing messages (1 fastest … 9 smallest).
    public var compressionLevel: Int32 = 6
    /// How long the server waits for the client's close frame after sending its own.
    public var closeTimeout: TimeAmount = .seconds(5)

    /// Proxies whose `X-Forwarded-For` is believed when they connect (`--trust-proxy`): the
    /// client's address is then the rightmost entry outside these ranges.
    public var trustedProxies: [IPRange] = []
    /// SO_REUSEPORT on the listening socket, so that several processes can share the port.
    public var reusePort = false
    /// Largest request body a plain HTTP request to an application route may have (413 past it).
    public var maxBodySize = 1 << 20

    /// Extra HTTP GET endpoints (exact paths), answered before the public folder: e.g. a status page.
    public var routes: [String: HTTPRoute] = [:]
    /// Server-Sent Events endpoints (exact paths): a GET subscribes to the stream for as long as
    /// the connection lasts. The same stream may be served at several paths and listeners.
    public var eventStreams: [String: HTTPEventStream] = [:]

    /// TLS for every accepted connection (https and wss on the same port); nil: plain.
    public var security: ConnectionSecurity? = nil
    /// Logs one line at info per closed WebSocket connection (id, address, path, duration,
    /// messages and bytes each way, close code).
    public var accessLog = true
    /// A second, plain-HTTP listener that answers only its own routes (status, metrics, health):
    /// what operators reach and clients must not. nil: none.
    public var admin: AdminListener? = nil

    public init() {}
}

/// What makes accepted connections secure (TLS). The engine only puts the handler it makes in
/// front of every other handler of a new connection; what it is made of (certificates, their
/// reloading) stays with the embedding.
public protocol ConnectionSecurity: Sendable {
    /// A new handler for one accepted connection, with the certificate in force now.
    func makeHandler() throws -> ChannelHandler
}

/// The admin listener: its own address, and the routes it answers (nothing else: 404).
public struct AdminListener: Sendable {
    public var host: String
    /// 0 picks a free one (`WebSocketServer.adminAddress` has the one bound).
    public var port: Int
    public var routes: [String: HTTPRoute]
    public var eventStreams: [String: HTTPEventStream]

    public init(host: String, port: Int, routes: [String: HTTPRoute], eventStreams: [String: HTTPEventStream] = [:]) {
        self.host = host
        self.port = port
        self.routes = routes
        self.eventStreams = eventStreams
    }
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

/// What the server does when a client stops reading while messages for it pile up.
public enum SlowConsumerPolicy: String, Sendable, CaseIterable {
    /// Close the connection (close frame 1008, best effort, then TCP close).
    case close
    /// Drop messages for it until its queue drains below half the limit.
    case drop
}
