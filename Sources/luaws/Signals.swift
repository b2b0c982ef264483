import Dispatch
import Foundation

/// Delivers signals as an async stream, without letting them kill the process.
enum Signals {
    /// Returns once every source is registered: from then on no signal is lost. Until then, one
    /// would be (SIG_IGN drops it, and libdispatch registers a source asynchronously after
    /// `resume()`), so the caller awaits the stream before it tells anyone that it listens.
    /// Signals that come before the caller reads the stream wait in it.
    static func stream(_ signals: [Int32]) async -> AsyncStream<Int32> {
        let (stream, continuation) = AsyncStream<Int32>.makeStream()
        let queue = DispatchQueue(label: "luaws.signals")
        let registered = DispatchGroup()
        let sources = signals.map { number -> DispatchSourceSignal in
            // Ignored, not fatal: the default action would kill before the source is registered.
            // SIG_IGN first: on Linux libdispatch installs its own handler when the source
            // starts, and SIG_IGN set afterwards would replace it.
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: queue)
            source.setEventHandler { continuation.yield(number) }
            registered.enter()
            source.setRegistrationHandler { registered.leave() }
            source.resume()
            return source
        }
        let keep = SourceBox(sources)
        continuation.onTermination = { _ in keep.cancel() }
        await withCheckedContinuation { (done: CheckedContinuation<Void, Never>) in
            registered.notify(queue: queue) { done.resume() }
        }
        return stream
    }

    /// Dispatch sources are thread-safe; the box only keeps them alive and cancels them.
    private final class SourceBox: @unchecked Sendable {
        private let sources: [DispatchSourceSignal]
        init(_ sources: [DispatchSourceSignal]) { self.sources = sources }
        func cancel() { sources.forEach { $0.cancel() } }
    }
}
