import Foundation
import Logging

/// One event of the dev console's feed (`/luaws/events`), written as the JSON of an SSE `data:`
/// field: `{"kind": "log" | "reload" | "error", "time", "level", "plugin", "message", ...}`.
struct ConsoleEvent: Sendable {
    enum Kind: String, Sendable {
        /// A log line, as the server writes it to stderr (at `--log-level` and above).
        case log
        /// A reload's result: `ok`, the new `version` and `plugins`, or the `error`.
        case reload
        /// A script error: a hook, route or timer that failed (`plugin`, `hook`, `file`, `line`).
        case error
    }

    /// Messages longer than this are cut (with `…`): an event must stay well under the stream's
    /// largest, whatever a script logs.
    static let maxMessageBytes = 4096

    var kind: Kind
    var time = timespec()
    var level: Logger.Level
    var message: String
    /// The module that logged (`ScriptHost`, `WSEngine`, `luaws`), for log lines.
    var source: String?
    var plugin: String?
    var hook: String?
    /// Where a script error or a failed reload points: `echo.lua` and 3 in `echo.lua:3: ...`.
    var file: String?
    var line: Int?
    // Reloads.
    var ok: Bool?
    var version: Int?
    var plugins: [String]?
    var reason: String?
    var error: String?

    init(kind: Kind, level: Logger.Level, message: String) {
        self.kind = kind
        self.level = level
        self.message = message
        clock_gettime(CLOCK_REALTIME, &time)
    }

    var json: String {
        var out = "{\"kind\":\"\(kind.rawValue)\",\"time\":\"\(LineLogHandler.timestamp(time, utc: true))\",\"level\":\"\(level)\",\"message\":"
        LineLogHandler.appendJSON(string: Self.cut(message), to: &out)
        func field(_ name: String, _ value: String?) {
            guard let value else { return }
            out += ",\"\(name)\":"
            LineLogHandler.appendJSON(string: Self.cut(value), to: &out)
        }
        field("source", source)
        field("plugin", plugin)
        field("hook", hook)
        field("file", file)
        if let line { out += ",\"line\":\(line)" }
        if let ok { out += ",\"ok\":\(ok)" }
        if let version { out += ",\"version\":\(version)" }
        if let plugins {
            out += ",\"plugins\":["
            for (index, name) in plugins.prefix(100).enumerated() {
                if index > 0 { out += "," }
                LineLogHandler.appendJSON(string: Self.cut(name, to: 200), to: &out)
            }
            out += "]"
        }
        field("reason", reason)
        field("error", error)
        out += "}"
        return out
    }

    /// `text`, cut to at most `limit` bytes of UTF-8 (on a character boundary) with `…`.
    static func cut(_ text: String, to limit: Int = maxMessageBytes) -> String {
        guard text.utf8.count > limit else { return text }
        // On a scalar boundary (at most 3 bytes back), not a character's: a character may be
        // thousands of combining marks long.
        var end = text.utf8.index(text.utf8.startIndex, offsetBy: limit - 3)
        while String.Index(end, within: text.unicodeScalars) == nil { end = text.utf8.index(before: end) }
        return String(text.unicodeScalars[..<end]) + "…"
    }

    /// The first `NAME.lua:LINE:` in `text`: where an error points.
    static func location(in text: String) -> (file: String, line: Int)? {
        var rest = Substring(text)
        while let range = rest.range(of: ".lua:") {
            var start = range.lowerBound
            while start > rest.startIndex {
                let before = rest[rest.index(before: start)]
                if before == " " || before == ":" || before == "\"" || before == "'" || before == "(" || before == "\n" || before == "\t" { break }
                start = rest.index(before: start)
            }
            let digits = rest[range.upperBound...].prefix { $0.isASCII && $0.isNumber }
            if let line = Int(digits), start < range.lowerBound, rest[digits.endIndex...].hasPrefix(":") {
                return (String(rest[start..<range.lowerBound]) + ".lua", line)
            }
            rest = rest[range.upperBound...]
        }
        return nil
    }
}
