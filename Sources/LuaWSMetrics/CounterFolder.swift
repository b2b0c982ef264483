/// Turns running totals into increments. The engine and the Lua states count in plain totals
/// (no metric objects on the hot path); a Prometheus counter only goes up by amounts. At each
/// scrape, the folder hands out what each total grew by since the last fold, and remembers it.
///
/// Scrapes may overlap: totals gathered by an earlier scrape can be folded after those of a
/// later one. They are then smaller than what was already folded, and add nothing (a counter
/// never goes down); the later totals already counted what they had.
struct CounterFolder {
    private var folded: [String: Int] = [:]
    private var foldedSums: [String: Double] = [:]

    /// What `total` grew by since the last call with `key` (0 if it did not grow).
    mutating func delta(_ key: String, total: Int) -> Int {
        let last = folded[key] ?? 0
        guard total > last else { return 0 }
        folded[key] = total
        return total - last
    }

    /// For a histogram bucket: how many observations are new, and their sum; nil if none.
    mutating func delta(_ key: String, count: Int, sum: Double) -> (count: Int, sum: Double)? {
        let last = folded[key] ?? 0
        guard count > last else { return nil }
        let lastSum = foldedSums[key] ?? 0
        folded[key] = count
        foldedSums[key] = sum
        return (count - last, sum - lastSum)
    }
}
