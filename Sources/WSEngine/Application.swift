import NIOCore
import NIOHTTP1

/// The one protocol between the engine and what gives it behaviour (in luaws: the Lua plugins).
///
/// The server makes one application per event loop and calls it only on that loop, for the
/// connections of that loop, so an implementation needs no locks. The engine never calls it
/// re-entrantly from inside one of its own calls to the connection: a connection that fails
/// while the application is sending to it reports `closed` after the call returns.
public protocol WebSocketApplication: AnyObject {
    /// The handshake is done; the connection can send. `request` is not kept by the engine
    /// (an idle connection should cost little): keep what you need of it.
    func opened(_ connection: WebSocketConnection, request: WebSocketRequest)
    /// A whole message arrived (fragments joined, text validated as UTF-8).
    func received(_ message: WebSocketMessage, on connection: WebSocketConnection)
    /// Idle timer `timer` (an index into the last `setIdleTimers`) fired: that long has passed
    /// without a message from the client, or since it last fired.
    func idle(_ connection: WebSocketConnection, timer: Int)
    /// The connection is gone. `code` is the close code the client sent, 1005 if its close frame
    /// had none, 1006 if the connection ended without one.
    func closed(_ connection: WebSocketConnection, code: UInt16, reason: String)
    /// Picks one of the sub-protocols a client offers (`Sec-WebSocket-Protocol`), or nil for none.
    func subprotocol(offered: [String], path: String) -> String?
    /// Accepts or refuses a valid upgrade request before the server answers it; may take its
    /// time (the client waits, up to the handshake timeout). Called once per request.
    func shouldUpgrade(_ request: WebSocketRequest, on eventLoop: EventLoop) -> EventLoopFuture<UpgradeDecision>
    /// Whether the application answers `method path` itself (`route`); asked when a request's
    /// head arrives, so that its body is kept (up to `maxBodySize`) only when someone wants it.
    func hasRoute(method: String, path: String) -> Bool
    /// Answers a plain HTTP request for which `hasRoute` said yes.
    func route(_ request: RoutedRequest, on eventLoop: EventLoop) -> EventLoopFuture<RoutedResponse>
    /// The server is shutting down: called on each loop just before its connections are
    /// closed, so that the application can end what it waits for.
    func stopping()
}

extension WebSocketApplication {
    public func subprotocol(offered: [String], path: String) -> String? { nil }
    public func shouldUpgrade(_ request: WebSocketRequest, on eventLoop: EventLoop) -> EventLoopFuture<UpgradeDecision> {
        eventLoop.makeSucceededFuture(.accept(context: nil))
    }
    public func hasRoute(method: String, path: String) -> Bool { false }
    public func stopping() {}
    public func route(_ request: RoutedRequest, on eventLoop: EventLoop) -> EventLoopFuture<RoutedResponse> {
        eventLoop.makeSucceededFuture(RoutedResponse(status: 404, headers: [], body: ByteBuffer(string: "Not found\n")))
    }
}

/// What the application says about an upgrade request.
public enum UpgradeDecision: Sendable {
    /// Upgrade; `context` comes back as `WebSocketRequest.context` when the connection opens.
    case accept(context: Int64?)
    /// Answer with this HTTP status (400–599) and this text instead.
    case refuse(status: Int, reason: String)
}

/// A plain HTTP request the application answers (a plugin route).
public struct RoutedRequest: Sendable {
    public var method: String
    public var path: String
    /// Without `?`.
    public var query: String
    public var headers: HTTPHeaders
    public var body: ByteBuffer
    public var remoteAddress: String?
}

public struct RoutedResponse: Sendable {
    public var status: Int
    public var headers: [(name: String, value: String)]
    public var body: ByteBuffer

    public init(status: Int, headers: [(name: String, value: String)], body: ByteBuffer) {
        self.status = status
        self.headers = headers
        self.body = body
    }
}

/// What the opening request asked for.
public struct WebSocketRequest: Sendable {
    public var path: String
    /// The query string without `?` (empty if none).
    public var query: String
    public var headers: HTTPHeaders
    /// The client's IP address, without port (with trusted proxies: see `ServerConfiguration.trustedProxies`).
    public var remoteAddress: String?
    /// The negotiated sub-protocol, if any.
    public var subprotocol: String?
    /// What the application's `shouldUpgrade` accepted the request with.
    public var context: Int64?
}

/// One client connection, as the application sees it. Used on its event loop only.
/// Calls on a connection that has closed do nothing and return false.
public final class WebSocketConnection {
    /// Unique within this server process.
    public let id: Int64
    /// The request path (`/ws`).
    public let path: String
    /// The negotiated sub-protocol, if any.
    public let subprotocol: String?
    /// Strong while the connection is open (a weak load per send costs); cleared when it closes.
    var handler: WebSocketConnectionHandler?

    init(id: Int64, request: WebSocketRequest, handler: WebSocketConnectionHandler) {
        self.id = id
        self.path = request.path
        self.subprotocol = request.subprotocol
        self.handler = handler
    }

    /// Queues one message. False when the connection is closing or closed.
    @discardableResult
    public func send(_ data: ByteBuffer, binary: Bool = false) -> Bool {
        handler?.send(data, binary: binary) ?? false
    }

    /// Starts the closing handshake with `code` and `reason` (at most 123 bytes of UTF-8).
    /// False when the connection is already closing or closed.
    @discardableResult
    public func close(code: UInt16 = 1000, reason: String = "") -> Bool {
        handler?.startClose(code: code, reason: reason) ?? false
    }

    /// Replaces the idle timers. Timer `i` fires after `intervals[i]` without a message from the
    /// client, and again every `intervals[i]` after it fired while no message arrives. A timer
    /// that already existed keeps counting from where it was.
    public func setIdleTimers(_ intervals: [TimeAmount]) {
        handler?.setIdleTimers(intervals)
    }

    /// Stops (false) or restarts (true) reading from the client: TCP back-pressure, for an
    /// application whose own queue for this connection is full. Bytes already read are still
    /// delivered; keep-alive pings and the idle timeout pause meanwhile.
    public func setReading(_ reading: Bool) {
        handler?.setReading(reading)
    }
}
