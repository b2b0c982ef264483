/// What the engine has done since it started, summed over the event loops: the raw figures
/// behind `/metrics`. Plain numbers, no metric objects: counting on the message path is a few
/// integer additions on the connection handler's own fields (see `ConnectionCounts`), and these
/// are put together only when someone asks (`WebSocketServer.figures()`).
public struct EngineFigures: Sendable, Equatable {
    /// Per WebSocket path.
    public struct PathFigures: Sendable, Equatable {
        /// Open now.
        public var connections = 0
        /// Opened since start.
        public var opened = 0
        public var textReceived = 0
        public var binaryReceived = 0
        public var textSent = 0
        public var binarySent = 0
        /// WebSocket bytes (frame headers included, before TLS) read from and written to clients.
        public var bytesReceived = 0
        public var bytesSent = 0

        public init() {}

        mutating func add(_ counts: ConnectionCounts) {
            textReceived += counts.textReceived
            binaryReceived += counts.binaryReceived
            textSent += counts.textSent
            binarySent += counts.binarySent
            bytesReceived += counts.bytesReceived
            bytesSent += counts.bytesSent
        }

        mutating func add(_ other: PathFigures) {
            connections += other.connections
            opened += other.opened
            textReceived += other.textReceived
            binaryReceived += other.binaryReceived
            textSent += other.textSent
            binarySent += other.binarySent
            bytesReceived += other.bytesReceived
            bytesSent += other.bytesSent
        }
    }

    public var paths: [String: PathFigures] = [:]
    /// Closed connections by close code label (see `closeCodeLabel`).
    public var closed: [String: Int] = [:]
    /// Refused WebSocket handshakes by reason (`application`, `origin`, `connection_limit`,
    /// `method`, `version`, `bad_handshake`, `not_websocket`).
    public var refused: [String: Int] = [:]
    /// Messages not sent because their client was a slow consumer.
    public var dropped = 0

    public init() {}

    /// Adds another loop's figures to these.
    public mutating func add(_ other: EngineFigures) {
        for (path, figures) in other.paths { paths[path, default: PathFigures()].add(figures) }
        closed.merge(other.closed, uniquingKeysWith: +)
        refused.merge(other.refused, uniquingKeysWith: +)
        dropped += other.dropped
    }

    /// The `code` label of a closed connection: the close code, except that the codes clients
    /// choose for themselves (3000–4999: registered and private use) are one value, so that a
    /// client cannot make the server keep a time series per code it invents.
    public static func closeCodeLabel(_ code: UInt16) -> String {
        (3000...4999).contains(code) ? "3000-4999" : String(code)
    }
}

/// What one connection did, counted by its handler on its own fields (no lookups, no locks):
/// folded into its loop's `EngineFigures` when it closes, and read while it is open by
/// `LoopState.figures()`. Also what the access log line reports.
struct ConnectionCounts {
    var textReceived = 0
    var binaryReceived = 0
    var textSent = 0
    var binarySent = 0
    var bytesReceived = 0
    var bytesSent = 0

    var messagesReceived: Int { textReceived + binaryReceived }
    var messagesSent: Int { textSent + binarySent }
}
