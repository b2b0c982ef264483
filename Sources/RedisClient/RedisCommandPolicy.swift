/// Commands a shared, pipelined command connection refuses before sending them.
///
/// Every caller shares one connection and replies are matched to commands by order alone, so a
/// command must not change the connection for the others (SELECT, AUTH, CLIENT REPLY), switch it
/// into another protocol mode (SUBSCRIBE, MONITOR), hold it in a per-caller transaction whose
/// commands would interleave with other callers' (MULTI, WATCH), or block it (BLPOP, WAIT):
/// a blocked connection stalls every other caller's replies behind it. EVAL/FCALL give atomic
/// multi-key work instead; pub/sub goes through `RedisSubscriber`.
enum RedisCommandPolicy {
    static let refused: Set<String> = [
        // Connection state.
        "AUTH", "SELECT", "HELLO", "RESET", "QUIT", "CLIENT", "READONLY", "READWRITE",
        // Other protocol modes.
        "SUBSCRIBE", "UNSUBSCRIBE", "PSUBSCRIBE", "PUNSUBSCRIBE", "SSUBSCRIBE", "SUNSUBSCRIBE",
        "MONITOR", "SYNC", "PSYNC",
        // Transactions across pipelined callers.
        "MULTI", "EXEC", "DISCARD", "WATCH", "UNWATCH",
        // Blocking.
        "BLPOP", "BRPOP", "BRPOPLPUSH", "BLMOVE", "BLMPOP", "BZPOPMIN", "BZPOPMAX", "BZMPOP",
        "WAIT", "WAITAOF",
    ]

    /// nil when allowed, else why not.
    static func check(_ arguments: [[UInt8]]) -> String? {
        guard let first = arguments.first, first.count <= 16 else { return nil }
        let name = String(decoding: first, as: UTF8.self).uppercased()
        if refused.contains(name) {
            return "\(name) is not allowed on a shared command connection"
        }
        // XREAD/XREADGROUP block only with a BLOCK option.
        if name == "XREAD" || name == "XREADGROUP",
           arguments.dropFirst().contains(where: { $0.count == 5 && String(decoding: $0, as: UTF8.self).uppercased() == "BLOCK" }) {
            return "\(name) BLOCK is not allowed on a shared command connection"
        }
        return nil
    }
}
