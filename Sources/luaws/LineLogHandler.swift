import ArgumentParser
import Foundation
import Logging

/// `--log-format text|json`.
enum LogFormat: String, ExpressibleByArgument, CaseIterable, Sendable {
    case text, json
}

/// Writes one line per log event to standard error, as text or as one JSON object, with a
/// millisecond timestamp: swift-log's StreamLogHandler stamps whole seconds, too coarse to order
/// the access-log lines of a busy second or to line them up with a proxy's log.
struct LineLogHandler: LogHandler {
    let label: String
    let format: LogFormat
    var logLevel: Logger.Level
    var metadata: Logger.Metadata = [:]
    var metadataProvider: Logger.MetadataProvider?

    init(label: String, format: LogFormat, level: Logger.Level, metadataProvider: Logger.MetadataProvider? = LoggingSystem.metadataProvider) {
        self.label = label
        self.format = format
        self.logLevel = level
        self.metadataProvider = metadataProvider
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        var merged = metadata
        if let provided = metadataProvider?.get() { merged.merge(provided) { _, new in new } }
        if let explicit = event.metadata { merged.merge(explicit) { _, new in new } }
        if let error = event.error {
            merged["error.message"] = "\(error)"
            merged["error.type"] = "\(String(reflecting: type(of: error)))"
        }
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let line: String
        switch format {
        case .text:
            // StreamLogHandler's layout (tests and people grep it), with milliseconds added.
            let shown = merged.isEmpty ? "" : " " + merged.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
            line = "\(Self.timestamp(now, utc: false)) \(event.level) \(label):\(shown) [\(event.source)] \(event.message)\n"
        case .json:
            var object = "{\"ts\":\"\(Self.timestamp(now, utc: true))\",\"level\":\"\(event.level)\",\"label\":"
            Self.appendJSON(string: label, to: &object)
            object += ",\"message\":"
            Self.appendJSON(string: event.message.description, to: &object)
            object += ",\"metadata\":"
            Self.appendJSON(.dictionary(merged), to: &object)
            object += "}\n"
            line = object
        }
        Self.writeToStandardError(line)
    }

    /// One write(2) per line: lines from several event loops never interleave (a pipe or an
    /// O_APPEND file takes a write of up to PIPE_BUF bytes whole), and no lock is needed.
    private static func writeToStandardError(_ line: String) {
        var bytes = Array(line.utf8)
        bytes.withUnsafeMutableBytes { buffer in
            var offset = 0
            // Bounded: each pass writes at least one byte or gives up.
            while offset < buffer.count {
                let written = write(2, buffer.baseAddress! + offset, buffer.count - offset)
                if written > 0 {
                    offset += written
                } else if written < 0 && errno == EINTR {
                    continue
                } else {
                    return
                }
            }
        }
    }

    /// `2025-01-31T12:00:00.123+0100` (local, as StreamLogHandler) or `2025-01-31T11:00:00.123Z`
    /// (UTC, for JSON: what log collectors parse without a time zone table).
    static func timestamp(_ now: timespec, utc: Bool) -> String {
        var seconds = now.tv_sec
        var parts = tm()
        if utc { gmtime_r(&seconds, &parts) } else { localtime_r(&seconds, &parts) }
        var buffer = [CChar](repeating: 0, count: 64)
        let length = strftime(&buffer, buffer.count, "%Y-%m-%dT%H:%M:%S", &parts)
        let base = String(decoding: buffer[..<length].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let milliseconds = String(Int(now.tv_nsec) / 1_000_000 + 1000).dropFirst()
        if utc { return "\(base).\(milliseconds)Z" }
        let zoneLength = strftime(&buffer, buffer.count, "%z", &parts)
        return "\(base).\(milliseconds)" + String(decoding: buffer[..<zoneLength].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    static func appendJSON(_ value: Logger.MetadataValue, to out: inout String) {
        switch value {
        case .string(let text):
            appendJSON(string: text, to: &out)
        case .stringConvertible(let convertible):
            appendJSON(string: convertible.description, to: &out)
        case .array(let items):
            out += "["
            for (index, item) in items.enumerated() {
                if index > 0 { out += "," }
                appendJSON(item, to: &out)
            }
            out += "]"
        case .dictionary(let entries):
            out += "{"
            // Sorted: the same metadata gives the same line.
            for (index, (key, item)) in entries.sorted(by: { $0.key < $1.key }).enumerated() {
                if index > 0 { out += "," }
                appendJSON(string: key, to: &out)
                out += ":"
                appendJSON(item, to: &out)
            }
            out += "}"
        }
    }

    /// A JSON string literal (RFC 8259: quote, backslash and control characters escaped).
    static func appendJSON(string: String, to out: inout String) {
        out += "\""
        for scalar in string.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20:
                let hex = String(scalar.value, radix: 16)
                out += (hex.count < 2 ? "\\u000" : "\\u00") + hex
            default:
                out.unicodeScalars.append(scalar)
            }
        }
        out += "\""
    }
}
