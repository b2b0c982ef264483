import NIOCore

/// Exponential back-off with jitter: attempt n waits `min(maximum, initial * 2^n)`, shortened by a
/// random fraction of up to `jitter`, so that many clients cut off together do not reconnect in
/// lockstep.
public struct RedisBackoff: Sendable, Hashable {
    public var initial: TimeAmount
    public var maximum: TimeAmount
    /// 0 (none) to 1 (anything from 0 to the full delay).
    public var jitter: Double

    public init(initial: TimeAmount = .milliseconds(100), maximum: TimeAmount = .seconds(5), jitter: Double = 0.2) {
        self.initial = initial
        self.maximum = max(initial, maximum)
        self.jitter = min(max(jitter, 0), 1)
    }

    public func delay(attempt: Int, random: Double = Double.random(in: 0...1)) -> TimeAmount {
        let shift = min(max(attempt, 0), 30)
        let (scaled, overflow) = initial.nanoseconds.multipliedReportingOverflow(by: Int64(1) << shift)
        let base = overflow ? maximum.nanoseconds : min(scaled, maximum.nanoseconds)
        return .nanoseconds(base - Int64(Double(base) * jitter * min(max(random, 0), 1)))
    }
}
