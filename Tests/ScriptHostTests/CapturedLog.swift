import Logging
import NIOConcurrencyHelpers

/// A logger whose lines tests can read: what a script error or `luaws.log` says.
final class CapturedLog: Sendable {
    private let box = NIOLockedValueBox<[String]>([])

    var lines: [String] { box.withLockedValue { $0 } }
    var text: String { lines.joined(separator: "\n") }

    var logger: Logger {
        let box = self.box
        var logger = Logger(label: "test") { _ in Handler(box: box) }
        logger.logLevel = .debug
        return logger
    }

    private struct Handler: LogHandler {
        let box: NIOLockedValueBox<[String]>
        var metadata: Logger.Metadata = [:]
        var logLevel: Logger.Level = .debug

        subscript(metadataKey key: String) -> Logger.Metadata.Value? {
            get { metadata[key] }
            set { metadata[key] = newValue }
        }

        func log(event: LogEvent) {
            box.withLockedValue { $0.append("\(event.level): \(event.message)") }
        }
    }
}
