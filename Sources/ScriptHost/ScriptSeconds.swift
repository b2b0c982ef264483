import NIOCore

extension TimeAmount {
    /// Seconds from a script or a limit as a time amount. Scripts' numbers are checked against
    /// 0.001…1e9 before they get here; this clamps again to 0…1e9 s, since converting a larger
    /// (or NaN) Double to Int64 nanoseconds would trap and end the process.
    static func script(seconds: Double) -> TimeAmount {
        guard seconds.isFinite, seconds > 0 else { return .zero }
        return .nanoseconds(Int64((min(seconds, 1e9) * 1e9).rounded()))
    }
}
