import Logging
import WSEngine

/// What the dev console streams live (`/luaws/events`): the process's log lines (through
/// `FeedLogHandler`, a tap on the logging system), reload results (from the `Reloader`) and
/// script errors, each as a `ConsoleEvent` in JSON, into one `HTTPEventStream`, which bounds
/// everything (its history, each subscriber's queue, the subscribers) and is thread-safe.
/// One per process: the logging system is.
final class EventFeed: Sendable {
    let stream: HTTPEventStream

    /// Metadata of a log line whose content the feed already has as an event of its own (a
    /// reload's result): `FeedLogHandler` takes it out and does not stream the line twice.
    static let reportedKey = "luaws.feed"
    static let reported: Logger.Metadata = [reportedKey: "reported"]

    /// What `PluginHost` begins a script error's log line with (a hook, route or timer that
    /// failed): `script error in echo.lua on_message: echo.lua:3: attempt to ...`.
    static let scriptErrorPrefix = "script error in "

    init(stream: HTTPEventStream = HTTPEventStream()) {
        self.stream = stream
    }

    func publish(_ event: ConsoleEvent) {
        stream.publish(ServerSentEvent(data: event.json))
    }

    /// A log line: a script error (`kind: error`), a plugin's `luaws.log`/`print` (its name in
    /// `plugin`) or any other line (`kind: log`).
    func log(level: Logger.Level, source: String, message: String) {
        var event = ConsoleEvent(kind: .log, level: level, message: message)
        event.source = source
        if source == "ScriptHost", message.hasPrefix(Self.scriptErrorPrefix) {
            // `script error in PATH HOOK: MESSAGE`, or `script error in HOOK: MESSAGE` when no
            // plugin is to blame.
            event.kind = .error
            let rest = message.dropFirst(Self.scriptErrorPrefix.count)
            if let colon = rest.range(of: ": ") {
                let place = rest[..<colon.lowerBound].split(separator: " ")
                if place.count >= 2 {
                    let path = String(place[0])
                    event.plugin = Self.pluginName(path)
                    event.hook = place[1...].joined(separator: " ")
                    event.file = path
                } else {
                    event.hook = place.first.map(String.init)
                }
                event.error = String(rest[colon.upperBound...])
            }
            if let (file, line) = ConsoleEvent.location(in: event.error ?? message) {
                event.file = file
                event.line = line
            }
        } else if source == "ScriptHost", message.hasPrefix("["), let close = message.firstIndex(of: "]") {
            // `luaws.log` and `print` write `[plugin] text`.
            event.plugin = String(message[message.index(after: message.startIndex)..<close])
        }
        publish(event)
    }

    /// A reload's result: ok with the new version and plugins, or the error that kept the
    /// previous plugins serving.
    func reload(reason: String, version: Int?, plugins: [String]?, error: String?) {
        var event = ConsoleEvent(
            kind: .reload, level: error == nil ? .info : .error,
            message: error.map { "reload failed, previous scripts keep serving: \($0)" }
                ?? "reloaded: version \(version ?? 0), plugins: \(plugins?.joined(separator: ", ") ?? "")")
        event.ok = error == nil
        event.reason = reason
        event.version = version
        event.plugins = plugins
        event.error = error
        if let error, let (file, line) = ConsoleEvent.location(in: error) {
            event.file = file
            event.line = line
            event.plugin = Self.pluginName(file)
        }
        publish(event)
    }

    /// `examples/chat.lua` → `chat`.
    static func pluginName(_ path: String) -> String {
        let name = path.split(separator: "/").last.map(String.init) ?? path
        return name.hasSuffix(".lua") ? String(name.dropLast(4)) : name
    }
}
