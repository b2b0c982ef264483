import NIOCore
import RedisClient
import XCTest

final class RedisURLTests: XCTestCase {
    func testParsesTheForms() throws {
        let plain = try RedisURL("redis://localhost")
        XCTAssertEqual(plain, RedisURL(host: "localhost", port: 6379, database: 0))

        let full = try RedisURL("redis://:s3cret@10.0.0.5:6380/2")
        XCTAssertEqual(full, RedisURL(host: "10.0.0.5", port: 6380, database: 2, user: nil, password: "s3cret"))

        let acl = try RedisURL("redis://alice:p%40ss@redis.internal:7000/1")
        XCTAssertEqual(acl.user, "alice")
        XCTAssertEqual(acl.password, "p@ss")
        XCTAssertEqual(acl.database, 1)

        let v6 = try RedisURL("redis://[::1]:6390")
        XCTAssertEqual(v6.host, "::1")
        XCTAssertEqual(v6.port, 6390)

        XCTAssertEqual(try RedisURL("REDIS://h:1/").database, 0)
    }

    func testDescriptionMasksThePassword() throws {
        XCTAssertEqual(try RedisURL("redis://:s3cret@h:6380/2").description, "redis://:***@h:6380/2")
        XCTAssertEqual(try RedisURL("redis://alice:s3cret@h").description, "redis://alice:***@h:6379")
        XCTAssertEqual(try RedisURL("redis://h").description, "redis://h:6379")
        XCTAssertFalse("\(try RedisURL("redis://u:topsecret@h"))".contains("topsecret"))
    }

    func testRefusesOtherSchemesAndMalformedInput() {
        func message(_ s: String) -> String {
            do {
                _ = try RedisURL(s)
                return "parsed"
            } catch {
                return error.description
            }
        }
        XCTAssertTrue(message("rediss://h:6379").contains("rediss:// (TLS) is not supported yet"))
        XCTAssertTrue(message("http://h").contains("unsupported scheme"))
        XCTAssertTrue(message("localhost:6379").contains("no scheme"))
        XCTAssertTrue(message("redis://").contains("no host"))
        XCTAssertTrue(message("redis://h:0").contains("port"))
        XCTAssertTrue(message("redis://h:99999").contains("port"))
        XCTAssertTrue(message("redis://h:abc").contains("port"))
        XCTAssertTrue(message("redis://h/x").contains("database"))
        XCTAssertTrue(message("redis://h/-1").contains("database"))
        XCTAssertTrue(message("redis://:@h").contains("empty password"))
        XCTAssertTrue(message("redis://h?db=1").contains("query"))
        // The input (which may hold a password) is never echoed.
        XCTAssertFalse(message("redis://:hunter2@h:abc").contains("hunter2"))
    }

    func testBackoffDoublesToTheCapWithJitter() {
        let backoff = RedisBackoff(initial: .milliseconds(100), maximum: .seconds(5), jitter: 0.2)
        XCTAssertEqual(backoff.delay(attempt: 0, random: 0), .milliseconds(100))
        XCTAssertEqual(backoff.delay(attempt: 1, random: 0), .milliseconds(200))
        XCTAssertEqual(backoff.delay(attempt: 3, random: 0), .milliseconds(800))
        XCTAssertEqual(backoff.delay(attempt: 6, random: 0), .seconds(5))
        XCTAssertEqual(backoff.delay(attempt: 1000, random: 0), .seconds(5))
        XCTAssertEqual(backoff.delay(attempt: 0, random: 1), .milliseconds(80))
    }
}
