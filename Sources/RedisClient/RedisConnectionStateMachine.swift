import Foundation
import NIOCore

/// The life of a reconnecting Redis connection, with no I/O: events in, actions out. The owner
/// (`RedisConnectionCore`) performs the actions and feeds back their results, all on one event
/// loop.
///
///     idle ──start──▶ connecting ──succeeded──▶ connected
///                       ▲     │                    │
///                  timer│     │failed       closed │
///                       │     ▼                    ▼
///                     backingOff ◀─────────────────┘
///
///     any ──close──▶ closed   (a connection that completes afterwards is closed at once)
///
/// `down` is when the connection was first lost (or first failed); it survives failed attempts,
/// so that the observable state says "disconnected since" the real outage start.
struct RedisConnectionStateMachine {
    enum State {
        case idle
        /// A TCP connect plus handshake (AUTH, SELECT, resubscribe) is running.
        case connecting(attempt: Int, down: Date?)
        case connected(Channel)
        /// Waiting for the reconnect timer.
        case backingOff(attempt: Int, down: Date)
        case closed
    }

    enum Action {
        case none
        /// Start a connect attempt (TCP + handshake).
        case connect
        /// Schedule `reconnectTimerFired` after the delay.
        case scheduleReconnect(TimeAmount)
        /// Close this channel (a connection that completed after `close()`, or the live one).
        case closeChannel(Channel)
        /// Cancel the reconnect timer and close the live channel, if any.
        case shutDown(Channel?)
    }

    private(set) var state: State = .idle
    let backoff: RedisBackoff

    init(backoff: RedisBackoff) {
        self.backoff = backoff
    }

    /// What the outside sees of `state`.
    var observable: RedisConnectionState {
        switch state {
        case .idle, .connecting(_, nil): .connecting
        case .connecting(_, .some(let down)), .backingOff(_, let down): .disconnected(since: down)
        case .connected: .connected
        case .closed: .closed
        }
    }

    var channel: Channel? {
        if case .connected(let channel) = state { return channel }
        return nil
    }

    mutating func start() -> Action {
        guard case .idle = state else { return .none }
        state = .connecting(attempt: 0, down: nil)
        return .connect
    }

    mutating func connectSucceeded(_ channel: Channel) -> Action {
        switch state {
        case .connecting:
            state = .connected(channel)
            return .none
        case .closed:
            return .closeChannel(channel)
        case .idle, .connected, .backingOff:
            preconditionFailure("connect completed in state \(state)")
        }
    }

    mutating func connectFailed(now: Date = Date(), random: Double = .random(in: 0...1)) -> Action {
        switch state {
        case .connecting(let attempt, let down):
            state = .backingOff(attempt: attempt + 1, down: down ?? now)
            return .scheduleReconnect(backoff.delay(attempt: attempt, random: random))
        case .closed:
            return .none
        case .idle, .connected, .backingOff:
            preconditionFailure("connect failed in state \(state)")
        }
    }

    /// A channel closed. Only the live one matters: a channel from a failed handshake is
    /// reported through `connectFailed` instead.
    mutating func channelClosed(_ channel: Channel, now: Date = Date(), random: Double = .random(in: 0...1)) -> Action {
        guard case .connected(let live) = state, live === channel else { return .none }
        state = .backingOff(attempt: 1, down: now)
        return .scheduleReconnect(backoff.delay(attempt: 0, random: random))
    }

    mutating func reconnectTimerFired() -> Action {
        guard case .backingOff(let attempt, let down) = state else { return .none }
        state = .connecting(attempt: attempt, down: down)
        return .connect
    }

    mutating func close() -> Action {
        switch state {
        case .closed:
            return .none
        case .connected(let channel):
            state = .closed
            return .shutDown(channel)
        case .idle, .connecting, .backingOff:
            state = .closed
            return .shutDown(nil)
        }
    }
}
