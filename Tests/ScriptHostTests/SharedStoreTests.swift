import NIOCore
@testable import ScriptHost
import XCTest

/// The in-process store: the same operations and answers as the Redis one (Redis's reply
/// shapes), with TTLs on a clock the test moves.
final class SharedStoreTests: XCTestCase {
    let limits = ScriptLimits()
    let t0 = NIODeadline.uptimeNanoseconds(1_000_000_000)

    func s(_ text: String) -> ScriptRedisReply { .string(Array(text.utf8)) }

    func testStringsAddCasIncrDelete() throws {
        var store = SharedStore()
        XCTAssertEqual(try store.perform(.get("k"), limits: limits, now: t0), .null)
        XCTAssertEqual(try store.perform(.set("k", "v", ttl: nil), limits: limits, now: t0), .status("OK"))
        XCTAssertEqual(try store.perform(.get("k"), limits: limits, now: t0), s("v"))
        XCTAssertEqual(try store.perform(.add("k", "w", ttl: nil), limits: limits, now: t0), .integer(0))
        XCTAssertEqual(try store.perform(.add("new", "w", ttl: nil), limits: limits, now: t0), .integer(1))
        XCTAssertEqual(try store.perform(.cas("k", old: "nope", new: "x"), limits: limits, now: t0), .integer(0))
        XCTAssertEqual(try store.perform(.cas("k", old: "v", new: "x"), limits: limits, now: t0), .integer(1))
        XCTAssertEqual(try store.perform(.cas("absent", old: nil, new: "1"), limits: limits, now: t0), .integer(1))
        XCTAssertEqual(try store.perform(.incr("n", by: .integer(2)), limits: limits, now: t0), s("2"))
        XCTAssertEqual(try store.perform(.incr("n", by: .float(0.5)), limits: limits, now: t0), s("2.5"))
        XCTAssertEqual(try store.perform(.incr("k", by: .integer(1)), limits: limits, now: t0), .error("ERR value is not a number"))
        XCTAssertEqual(try store.perform(.delete("k"), limits: limits, now: t0), .integer(1))
        XCTAssertEqual(try store.perform(.delete("k"), limits: limits, now: t0), .integer(0))
        XCTAssertEqual(try store.perform(.keys(prefix: "n"), limits: limits, now: t0), .array([s("n"), s("new")]))
    }

    func testExpiry() throws {
        var store = SharedStore()
        _ = try store.perform(.set("k", "v", ttl: 1), limits: limits, now: t0)
        XCTAssertEqual(try store.perform(.get("k"), limits: limits, now: t0 + .milliseconds(999)), s("v"))
        XCTAssertEqual(try store.perform(.get("k"), limits: limits, now: t0 + .seconds(1)), .null)
        _ = try store.perform(.set("k", "v", ttl: nil), limits: limits, now: t0)
        XCTAssertEqual(try store.perform(.expire("k", ttl: 2), limits: limits, now: t0), .integer(1))
        XCTAssertEqual(try store.perform(.keys(prefix: ""), limits: limits, now: t0 + .seconds(3)), .array([]))
        XCTAssertEqual(store.bytes, 0)
    }

    func testSetsAndWrongType() throws {
        var store = SharedStore()
        XCTAssertEqual(try store.perform(.sadd("room", "ann"), limits: limits, now: t0), .integer(1))
        XCTAssertEqual(try store.perform(.sadd("room", "ann"), limits: limits, now: t0), .integer(0))
        XCTAssertEqual(try store.perform(.sadd("room", "bob"), limits: limits, now: t0), .integer(1))
        XCTAssertEqual(try store.perform(.scard("room"), limits: limits, now: t0), .integer(2))
        XCTAssertEqual(try store.perform(.smembers("room"), limits: limits, now: t0), .array([s("ann"), s("bob")]))
        XCTAssertEqual(try store.perform(.srem("room", "ann"), limits: limits, now: t0), .integer(1))
        if case .error(let message) = try store.perform(.get("room"), limits: limits, now: t0) {
            XCTAssertTrue(message.hasPrefix("WRONGTYPE"))
        } else { XCTFail("get on a set") }
        XCTAssertEqual(try store.perform(.srem("room", "bob"), limits: limits, now: t0), .integer(1))
        XCTAssertEqual(try store.perform(.scard("room"), limits: limits, now: t0), .integer(0))
        XCTAssertEqual(store.bytes, 0)
    }

    func testTheCapCountsEveryByteAndExpiredEntriesMakeRoom() throws {
        var small = ScriptLimits(sharedMemoryLimit: 1 << 20)
        small.sharedValueLimit = 200_000
        var store = SharedStore()
        let big = String(repeating: "x", count: 100_000)
        for i in 0..<10 { _ = try store.perform(.set("k\(i)", big, ttl: 1), limits: small, now: t0) }
        XCTAssertThrowsError(try store.perform(.set("more", big, ttl: nil), limits: small, now: t0))
        XCTAssertThrowsError(try store.perform(.set("huge", big + big + big, ttl: nil), limits: small, now: t0))
        // once the others have expired there is room again
        XCTAssertEqual(try store.perform(.set("more", big, ttl: nil), limits: small, now: t0 + .seconds(2)), .status("OK"))
    }
}
