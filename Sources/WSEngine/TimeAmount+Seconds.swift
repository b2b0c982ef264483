import NIOCore

extension TimeAmount {
    /// `seconds` as a time amount, rounded to the nanosecond; nil for NaN, infinities, negative
    /// values and values whose nanoseconds do not fit in an Int64 (about 292 years). Never traps,
    /// so it can take numbers straight from a command line or a script.
    public init?(seconds: Double) {
        guard seconds.isFinite, seconds >= 0 else { return nil }
        let nanoseconds = (seconds * 1e9).rounded()
        // 2^63 is exactly representable as a Double; everything below it converts without trapping.
        guard nanoseconds < 9_223_372_036_854_775_808.0 else { return nil }
        self = .nanoseconds(Int64(nanoseconds))
    }
}
