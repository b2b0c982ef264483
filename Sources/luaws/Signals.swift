import Dispatch
import Foundation

/// Delivers signals as an async stream, without letting them kill the process.
enum Signals {
    static func stream(_ signals: [Int32]) -> AsyncStream<Int32> {
        AsyncStream { continuation in
            let queue = DispatchQueue(label: "luaws.signals")
            let sources = signals.map { number -> DispatchSourceSignal in
                // SIG_IGN first: on Linux libdispatch installs its own handler when the source
                // starts, and SIG_IGN set afterwards would replace it.
                signal(number, SIG_IGN)
                let source = DispatchSource.makeSignalSource(signal: number, queue: queue)
                source.setEventHandler { continuation.yield(number) }
                source.resume()
                return source
            }
            let keep = SourceBox(sources)
            continuation.onTermination = { _ in keep.cancel() }
        }
    }

    /// Dispatch sources are thread-safe; the box only keeps them alive and cancels them.
    private final class SourceBox: @unchecked Sendable {
        private let sources: [DispatchSourceSignal]
        init(_ sources: [DispatchSourceSignal]) { self.sources = sources }
        func cancel() { sources.forEach { $0.cancel() } }
    }
}
