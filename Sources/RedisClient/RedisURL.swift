/// Where a Redis server is and how to log in to it:
/// `redis://[[USER]:PASSWORD@]HOST[:PORT][/DB]`.
///
/// - `redis://localhost` → port 6379, db 0, no AUTH;
/// - `redis://:secret@host:6380/2` → `AUTH secret`, then `SELECT 2`;
/// - `redis://alice:secret@host/1` → `AUTH alice secret` (Redis 6 ACL user), then `SELECT 1`.
///
/// User and password may be percent-encoded (`%40` for `@`). An IPv6 host goes in brackets
/// (`redis://[::1]:6379`). `rediss://` (TLS) is refused for now, as is anything else that does
/// not parse, with a message saying why.
///
/// `description` never shows the password, so a URL can be logged as it is.
public struct RedisURL: Sendable, Hashable, CustomStringConvertible {
    public var host: String
    public var port: Int
    public var database: Int
    /// The ACL user (Redis 6+), or nil for the default user.
    public var user: String?
    /// Sent with AUTH on every connect; nil means no AUTH.
    public var password: String?

    public static let defaultPort = 6379

    public init(host: String, port: Int = RedisURL.defaultPort, database: Int = 0, user: String? = nil, password: String? = nil) {
        self.host = host
        self.port = port
        self.database = database
        self.user = user
        self.password = password
    }

    public init(_ string: String) throws(RedisError) {
        func bad(_ why: String) -> RedisError {
            // The input itself is not echoed: it may hold a password.
            .invalidURL("invalid Redis URL: \(why) (expected redis://[:PASSWORD@]HOST[:PORT][/DB])")
        }
        guard let schemeEnd = string.range(of: "://") else { throw bad("no scheme") }
        let scheme = string[..<schemeEnd.lowerBound].lowercased()
        switch scheme {
        case "redis": break
        case "rediss": throw .invalidURL("invalid Redis URL: rediss:// (TLS) is not supported yet; use redis://")
        case "unix", "redis+unix", "redis-socket":
            throw .invalidURL("invalid Redis URL: Unix sockets (\(scheme)://) are not supported; use redis://HOST:PORT")
        default: throw bad("unsupported scheme \"\(scheme)\"")
        }
        var rest = string[schemeEnd.upperBound...]
        if rest.contains("?") || rest.contains("#") { throw bad("query and fragment are not supported") }

        // Userinfo ends at the last "@" (a raw "@" in a password is then still accepted).
        var user: String?
        var password: String?
        if let at = rest.lastIndex(of: "@") {
            let userinfo = rest[..<at]
            rest = rest[rest.index(after: at)...]
            if let colon = userinfo.firstIndex(of: ":") {
                let u = userinfo[..<colon]
                let p = userinfo[userinfo.index(after: colon)...]
                guard let ud = Self.percentDecode(u), let pd = Self.percentDecode(p) else { throw bad("bad percent-encoding in user or password") }
                user = ud.isEmpty ? nil : ud
                password = pd
                if pd.isEmpty { throw bad("empty password") }
            } else {
                // redis://secret@host: Redis clients commonly read a lone userinfo as the password.
                guard let pd = Self.percentDecode(userinfo), !pd.isEmpty else { throw bad("empty password") }
                password = pd
            }
        }

        // Host and port, then an optional /DB.
        var hostPort = rest
        var dbPart: Substring?
        if let slash = rest.firstIndex(of: "/") {
            hostPort = rest[..<slash]
            dbPart = rest[rest.index(after: slash)...]
        }
        var host: Substring
        var portPart: Substring?
        if hostPort.hasPrefix("[") {
            guard let close = hostPort.firstIndex(of: "]") else { throw bad("unclosed [ in IPv6 host") }
            host = hostPort[hostPort.index(after: hostPort.startIndex)..<close]
            let after = hostPort[hostPort.index(after: close)...]
            if !after.isEmpty {
                guard after.hasPrefix(":") else { throw bad("unexpected text after IPv6 host") }
                portPart = after.dropFirst()
            }
        } else if let colon = hostPort.firstIndex(of: ":") {
            host = hostPort[..<colon]
            portPart = hostPort[hostPort.index(after: colon)...]
        } else {
            host = hostPort
        }
        guard !host.isEmpty else { throw bad("no host") }
        guard !host.contains(where: { $0 == " " || $0 == "/" || $0 == "@" }) else { throw bad("bad host") }

        var port = Self.defaultPort
        if let portPart {
            guard let p = Int(portPart), (1...65535).contains(p), portPart.allSatisfy(\.isASCII) else {
                throw bad("port must be a number from 1 to 65535")
            }
            port = p
        }
        var database = 0
        if let dbPart, !dbPart.isEmpty {
            guard let d = Int(dbPart), d >= 0, dbPart.allSatisfy({ $0.isASCII && $0.isNumber }) else {
                throw bad("database must be a non-negative number")
            }
            database = d
        }
        self.init(host: String(host), port: port, database: database, user: user, password: password)
    }

    public var description: String {
        var s = "redis://"
        if let user { s += "\(user):***@" } else if password != nil { s += ":***@" }
        s += host.contains(":") ? "[\(host)]" : host
        s += ":\(port)"
        if database != 0 { s += "/\(database)" }
        return s
    }

    /// Decodes %XX escapes; nil when an escape is malformed or the result is not UTF-8.
    private static func percentDecode(_ s: Substring) -> String? {
        guard s.contains("%") else { return String(s) }
        var bytes: [UInt8] = []
        var utf8 = s.utf8[...]
        while let b = utf8.popFirst() {
            if b == UInt8(ascii: "%") {
                guard let h = utf8.popFirst(), let l = utf8.popFirst(),
                      let hv = hexValue(h), let lv = hexValue(l) else { return nil }
                bytes.append(hv << 4 | lv)
            } else {
                bytes.append(b)
            }
        }
        return String(validating: bytes, as: UTF8.self)
    }

    private static func hexValue(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): c - UInt8(ascii: "A") + 10
        default: nil
        }
    }
}
