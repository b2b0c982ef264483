import Foundation
import NIOConcurrencyHelpers
import NIOCore
import RedisClient
import XCTest

struct TimedOut: Error, CustomStringConvertible {
    var what: String
    var description: String { "timed out: \(what)" }
}

extension EventLoopFuture where Value: Sendable {
    /// `wait()` that gives up after `seconds`, so a broken test fails instead of hanging.
    func wait(seconds: Double, _ what: String = "future") throws -> Value {
        let promise = eventLoop.makePromise(of: Value.self)
        let timer = eventLoop.scheduleTask(in: .milliseconds(Int64(seconds * 1000))) {
            promise.fail(TimedOut(what: what))
        }
        cascade(to: promise)
        defer { timer.cancel() }
        return try promise.futureResult.wait()
    }
}

/// Polls `condition` every 5 ms for up to `seconds`.
func waitUntil(_ seconds: Double = 3, _ what: String, file: StaticString = #filePath, line: UInt = #line,
               _ condition: () -> Bool) {
    let deadline = Date().addingTimeInterval(seconds)
    while !condition() {
        if Date() > deadline {
            XCTFail("timed out waiting for \(what)", file: file, line: line)
            return
        }
        usleep(5_000)
    }
}

func bytes(_ s: String) -> [UInt8] { Array(s.utf8) }

/// What the subscriber received, readable from the test thread.
final class Inbox: Sendable {
    private let box = NIOLockedValueBox<[(String, [UInt8])]>([])
    func append(_ channel: String, _ payload: [UInt8]) { box.withLockedValue { $0.append((channel, payload)) } }
    var messages: [(String, [UInt8])] { box.withLockedValue { $0 } }
    func contains(_ channel: String, _ payload: String) -> Bool {
        messages.contains { $0.0 == channel && $0.1 == bytes(payload) }
    }
}
