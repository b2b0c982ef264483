import NIOCore
import NIOWebSocket
import XCTest

@testable import WSEngine

final class UTF8ValidatorTests: XCTestCase {
    func valid(_ pieces: [[UInt8]]) -> Bool {
        var v = UTF8Validator()
        for piece in pieces {
            guard piece.withUnsafeBytes({ v.validate($0) }) else { return false }
        }
        return v.isComplete
    }

    func testAcceptsWhatSwiftAccepts() {
        for s in ["", "hello", "héllo", "κόσμε", "你好", "🎉 emoji", String(repeating: "ascii", count: 100) + "é"] {
            XCTAssertTrue(valid([Array(s.utf8)]), s)
        }
    }

    func testRejectsOverlongSurrogatesAndOutOfRange() {
        for bytes: [UInt8] in [[0xC0, 0x80], [0xE0, 0x80, 0x80], [0xED, 0xA0, 0x80], [0xF4, 0x90, 0x80, 0x80], [0xFF], [0x80], [0xF5, 0x80, 0x80, 0x80]] {
            XCTAssertFalse(valid([bytes]), "\(bytes)")
        }
    }

    func testCodePointSplitAcrossPieces() {
        let snowman = Array("☃".utf8)
        XCTAssertTrue(valid([[snowman[0]], [snowman[1]], [snowman[2]]]))
        XCTAssertFalse(valid([[snowman[0]], [snowman[1]]]), "incomplete at the end")
    }

    func testFailsAtTheFirstBadByteNotAtTheEnd() {
        var v = UTF8Validator()
        XCTAssertFalse([0x61, 0xFF].withUnsafeBytes { v.validate($0) })
    }
}

final class MessageAssemblerTests: XCTestCase {
    func buffer(_ s: String) -> ByteBuffer { ByteBuffer(string: s) }

    func testSingleFrameMessages() throws {
        var a = MessageAssembler(maxMessageSize: 100)
        let text = try a.append(opcode: .text, fin: true, data: buffer("hi"))
        XCTAssertEqual(text.map { String(buffer: $0.data) }, "hi")
        XCTAssertEqual(text?.kind, .text)
        let binary = try a.append(opcode: .binary, fin: true, data: buffer("\u{1}"))
        XCTAssertEqual(binary?.kind, .binary)
    }

    func testFragmentsJoin() throws {
        var a = MessageAssembler(maxMessageSize: 100)
        XCTAssertNil(try a.append(opcode: .text, fin: false, data: buffer("a")))
        XCTAssertTrue(a.isAssembling)
        XCTAssertNil(try a.append(opcode: .continuation, fin: false, data: buffer("b")))
        let m = try a.append(opcode: .continuation, fin: true, data: buffer("c"))
        XCTAssertEqual(m.map { String(buffer: $0.data) }, "abc")
        XCTAssertFalse(a.isAssembling)
    }

    func testSequenceErrors() {
        var a = MessageAssembler(maxMessageSize: 100)
        XCTAssertThrowsError(try a.append(opcode: .continuation, fin: true, data: buffer("x"))) { error in
            XCTAssertEqual((error as? ProtocolFailure)?.code, 1002)
        }
        _ = try? a.append(opcode: .text, fin: false, data: buffer("x"))
        XCTAssertThrowsError(try a.append(opcode: .binary, fin: true, data: buffer("y"))) { error in
            XCTAssertEqual((error as? ProtocolFailure)?.code, 1002)
        }
    }

    func testSizeLimitCountsAllFragments() {
        var a = MessageAssembler(maxMessageSize: 10)
        XCTAssertNoThrow(try a.append(opcode: .binary, fin: false, data: buffer("123456")))
        XCTAssertThrowsError(try a.append(opcode: .continuation, fin: true, data: buffer("789012"))) { error in
            XCTAssertEqual((error as? ProtocolFailure)?.code, 1009)
        }
    }

    func testInvalidUTF8Is1007() {
        var a = MessageAssembler(maxMessageSize: 100)
        XCTAssertThrowsError(try a.append(opcode: .text, fin: false, data: ByteBuffer(bytes: [0xFF]))) { error in
            XCTAssertEqual((error as? ProtocolFailure)?.code, 1007)
        }
    }
}
