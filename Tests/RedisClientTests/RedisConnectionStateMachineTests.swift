import Foundation
import NIOCore
@testable import RedisClient
import XCTest

final class RedisConnectionStateMachineTests: XCTestCase {
    func testFailedAttemptsBackOffAndKeepTheOutageStart() {
        var machine = RedisConnectionStateMachine(backoff: RedisBackoff(initial: .milliseconds(100), maximum: .seconds(5), jitter: 0))
        XCTAssertEqual(machine.observable, .connecting)
        guard case .connect = machine.start() else { return XCTFail("no connect") }
        XCTAssertEqual(machine.observable, .connecting)

        let first = Date(timeIntervalSince1970: 1000)
        var delays: [TimeAmount] = []
        for i in 0..<8 {
            guard case .scheduleReconnect(let delay) = machine.connectFailed(now: first.addingTimeInterval(Double(i))) else { return XCTFail("no reconnect") }
            delays.append(delay)
            // Down since the first failure, through every later attempt.
            XCTAssertEqual(machine.observable, .disconnected(since: first))
            guard case .connect = machine.reconnectTimerFired() else { return XCTFail("no connect") }
            XCTAssertEqual(machine.observable, .disconnected(since: first))
        }
        XCTAssertEqual(delays.map { $0.nanoseconds / 1_000_000 }, [100, 200, 400, 800, 1600, 3200, 5000, 5000])

        guard case .shutDown(nil) = machine.close() else { return XCTFail("no shutdown") }
        XCTAssertEqual(machine.observable, .closed)
        // Late results after close change nothing.
        guard case .none = machine.connectFailed() else { return XCTFail("acted after close") }
        guard case .none = machine.reconnectTimerFired() else { return XCTFail("acted after close") }
        guard case .none = machine.close() else { return XCTFail("closed twice") }
    }
}
