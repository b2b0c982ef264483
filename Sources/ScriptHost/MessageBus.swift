import NIOCore

/// Publish/subscribe across processes (`--cluster`, over Redis), provided by the embedding.
/// Local delivery is `ScriptCluster`'s; the bus only carries messages to and from the other
/// processes attached to the same Redis.
public protocol MessageBus: Sendable {
    /// Whether messages can be sent now (the link is up).
    var isLinked: Bool { get }
    /// Sends to the other processes' subscribers of `channel`; nil if sent, else why not.
    func publish(channel: String, text: String) -> String?
    /// Sends to the other processes' connections on `path`; nil if sent, else why not.
    func broadcast(path: String, text: String) -> String?
    /// Starts receiving `channel`; the future completes when Redis has acknowledged it (or
    /// fails if the link is down: the subscription is kept and made when it comes back).
    func subscribe(_ channel: String) -> EventLoopFuture<Void>
    func unsubscribe(_ channel: String)
    /// Where messages from the other processes go. Set once, before any subscription.
    func start(onMessage: @escaping @Sendable (_ channel: String, _ text: String) -> Void,
               onBroadcast: @escaping @Sendable (_ path: String, _ text: String) -> Void)
}
