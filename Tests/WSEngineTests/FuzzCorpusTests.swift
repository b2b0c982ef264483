import Foundation
import WSEngineTesting
import XCTest

/// Replays the fuzz corpus (Tests/fuzz-corpus: seeds and every crash the fuzzer ever found)
/// through the real pipeline, and checks what a few of them must produce.
final class FuzzCorpusTests: XCTestCase {
    let corpus = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("fuzz-corpus")

    func input(_ name: String) throws -> [UInt8] {
        [UInt8](try Data(contentsOf: corpus.appendingPathComponent(name)))
    }

    func run(_ name: String) throws -> FuzzHarness.Outcome {
        let bytes = try input(name)
        let startsLikeHTTP = bytes.count >= 3 && bytes.prefix(3).allSatisfy { (0x41...0x5A).contains($0) }
        return FuzzHarness.run(bytes, withHandshake: !startsLikeHTTP)
    }

    /// The close code of the last close frame the server wrote, if any.
    func closeCode(_ written: [UInt8]) -> UInt16? {
        guard let start = written.firstRange(of: Array("\r\n\r\n".utf8))?.upperBound else { return nil }
        var i = start
        var code: UInt16?
        while i + 2 <= written.count {
            let opcode = written[i] & 0x0F
            var length = Int(written[i + 1] & 0x7F)
            var header = 2
            if length == 126 { length = Int(written[i + 2]) << 8 | Int(written[i + 3]); header = 4 }
            if length == 127 { return code }
            if opcode == 0x8, length >= 2 { code = UInt16(written[i + header]) << 8 | UInt16(written[i + header + 1]) }
            i += header + length
        }
        return code
    }

    func testEveryInputOfTheCorpusIsHandled() throws {
        let names = try FileManager.default.contentsOfDirectory(atPath: corpus.path).sorted()
        XCTAssertGreaterThan(names.count, 20)
        for name in names { _ = try run(name) }
    }

    func testExpectedAnswers() throws {
        let text = try run("frames_text")
        XCTAssertTrue(String(decoding: text.written, as: UTF8.self).contains("hello"))
        XCTAssertFalse(text.closed)
        XCTAssertEqual(closeCode(try run("frames_unmasked").written), 1002)
        XCTAssertEqual(closeCode(try run("frames_rsv2").written), 1002)
        XCTAssertEqual(closeCode(try run("frames_bad_utf8").written), 1007)
        // A text frame declaring 1000 bytes whose first 10 are not UTF-8 (fed a byte at a time).
        let partial = try run("frames_partial_bad_utf8")
        XCTAssertEqual(closeCode(partial.written), 1007)
        XCTAssertTrue(partial.closed)
        XCTAssertEqual(closeCode(try run("frames_compressed_garbage").written), 1007)
        XCTAssertEqual(closeCode(try run("frames_huge_declared_length").written), 1009)
        XCTAssertEqual(closeCode(try run("frames_close_bad_code").written), 1002)
        XCTAssertEqual(closeCode(try run("frames_ask_close").written), 4000)
        let compressed = try run("frames_compressed_fragmented")
        XCTAssertNil(closeCode(compressed.written))
        XCTAssertTrue(String(decoding: try run("http_bad_version").written, as: UTF8.self).hasPrefix("HTTP/1.1 426"))
        XCTAssertTrue(String(decoding: try run("http_short_key").written, as: UTF8.self).hasPrefix("HTTP/1.1 400"))
        // Found by the fuzzer: an extension parameter with no name once crashed the server.
        let regression = String(decoding: try run("http_regression_extension_param_without_name").written, as: UTF8.self)
        XCTAssertTrue(regression.hasPrefix("HTTP/1.1 101"), regression)
        XCTAssertFalse(regression.lowercased().contains("sec-websocket-extensions"))
    }
}
