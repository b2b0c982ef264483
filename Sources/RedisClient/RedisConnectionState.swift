import Foundation

/// What a connection looks like from outside (status pages, metrics). Changes are reported only
/// on real transitions: failed reconnect attempts while down keep `.disconnected` with its
/// original `since`.
public enum RedisConnectionState: Sendable, Hashable, CustomStringConvertible {
    /// The first connection attempt is under way.
    case connecting
    /// Connected, logged in and ready (for a subscriber: resubscribed).
    case connected
    /// Down since the given time (the first failure), retrying with back-off. Commands fail fast.
    case disconnected(since: Date)
    /// `close()` was called: no more reconnects.
    case closed

    public var description: String {
        switch self {
        case .connecting: "connecting"
        case .connected: "connected"
        case .disconnected(let since): "disconnected since \(since)"
        case .closed: "closed"
        }
    }
}
