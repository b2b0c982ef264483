import NIOCore
import WSEngine
import XCTest

final class TimeAmountSecondsTests: XCTestCase {
    func testConvertsFiniteNonNegativeSeconds() {
        XCTAssertEqual(TimeAmount(seconds: 0), .nanoseconds(0))
        XCTAssertEqual(TimeAmount(seconds: -0.0), .nanoseconds(0))
        XCTAssertEqual(TimeAmount(seconds: 1.5), .milliseconds(1500))
        XCTAssertEqual(TimeAmount(seconds: 0.001), .milliseconds(1))
        XCTAssertEqual(TimeAmount(seconds: 1e-10), .nanoseconds(0), "rounds to the nanosecond")
        XCTAssertEqual(TimeAmount(seconds: 9.2e9)?.nanoseconds, 9_200_000_000_000_000_000)
    }

    func testRefusesWhatHasNoTimeAmountAndNeverTraps() {
        for value in [Double.nan, -.nan, .infinity, -.infinity, -1, -1e-12, 9.3e9, 1e300,
                      .greatestFiniteMagnitude, 9_223_372_036.854775808] {
            XCTAssertNil(TimeAmount(seconds: value), "\(value)")
        }
    }
}
