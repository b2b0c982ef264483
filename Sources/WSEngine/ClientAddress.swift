import NIOCore
import NIOHTTP1

/// An IP address range (`10.0.0.0/8`, `::1/128`, or one address) whose hosts are trusted
/// proxies: their `X-Forwarded-For` is believed.
public struct IPRange: Sendable, Equatable, CustomStringConvertible {
    private let network: [UInt8]
    private let prefix: Int
    public let description: String

    /// Parses `ADDRESS[/BITS]`; nil if it is not one.
    public init?(_ text: String) {
        let parts = text.split(separator: "/", maxSplits: 1).map(String.init)
        guard let first = parts.first, let bytes = IPRange.bytes(of: first) else { return nil }
        let maxBits = bytes.count * 8
        let bits = parts.count == 2 ? Int(parts[1]) : maxBits
        guard let bits, bits >= 0, bits <= maxBits else { return nil }
        network = bytes
        prefix = bits
        description = text
    }

    /// Whether the address `text` (without port) is in the range.
    public func contains(_ text: String) -> Bool {
        guard let bytes = IPRange.bytes(of: text), bytes.count == network.count else { return false }
        var bits = prefix
        for (a, b) in zip(bytes, network) {
            if bits <= 0 { return true }
            let mask: UInt8 = bits >= 8 ? 0xFF : ~(0xFF >> UInt8(bits))
            if a & mask != b & mask { return false }
            bits -= 8
        }
        return true
    }

    /// The 4 or 16 bytes of an IPv4 or IPv6 address (an IPv4-mapped IPv6 address counts as IPv4).
    static func bytes(of text: String) -> [UInt8]? {
        guard let address = try? SocketAddress(ipAddress: text, port: 0) else { return nil }
        switch address {
        case .v4(let v4):
            return withUnsafeBytes(of: v4.address.sin_addr) { Array($0) }
        case .v6(let v6):
            let bytes = withUnsafeBytes(of: v6.address.sin6_addr) { Array($0) }
            if bytes[0..<10].allSatisfy({ $0 == 0 }) && bytes[10] == 0xFF && bytes[11] == 0xFF { return Array(bytes[12...]) }
            return bytes
        default:
            return nil
        }
    }
}

/// Who the client is: the peer's IP address (no port), or, when the peer is a trusted proxy,
/// the rightmost `X-Forwarded-For` entry that is not a trusted proxy (each proxy appends the
/// address it saw, so entries left of the last untrusted one could be forged by the client).
enum ClientAddress {
    static func resolve(peer: SocketAddress?, headers: HTTPHeaders, trusted: [IPRange]) -> String? {
        guard let peerIP = peer?.ipAddress.map(unmapped) else { return nil }
        guard !trusted.isEmpty, trusted.contains(where: { $0.contains(peerIP) }) else { return peerIP }
        let forwarded = headers["X-Forwarded-For"].flatMap { $0.split(separator: ",") }
            .map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        for entry in forwarded.reversed() {
            let ip = unmapped(strip(entry))
            guard IPRange.bytes(of: ip) != nil else { return peerIP }  // garbage: trust nothing past it
            if !trusted.contains(where: { $0.contains(ip) }) { return ip }
        }
        return forwarded.first.map { unmapped(strip($0)) } ?? peerIP
    }

    /// `::ffff:1.2.3.4` as `1.2.3.4`.
    private static func unmapped(_ ip: String) -> String {
        ip.lowercased().hasPrefix("::ffff:") && ip.contains(".") ? String(ip.dropFirst(7)) : ip
    }

    /// An entry may carry a port (`1.2.3.4:5678`, `[::1]:80`).
    private static func strip(_ entry: String) -> String {
        if entry.hasPrefix("["), let end = entry.firstIndex(of: "]") { return String(entry[entry.index(after: entry.startIndex)..<end]) }
        if entry.filter({ $0 == ":" }).count == 1, let colon = entry.firstIndex(of: ":") { return String(entry[..<colon]) }
        return entry
    }
}
