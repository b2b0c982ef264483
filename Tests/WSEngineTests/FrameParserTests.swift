import NIOCore
import NIOWebSocket
import XCTest

@testable import WSEngine

final class FrameParserTests: XCTestCase {
    /// A masked client frame, as a browser would send it.
    func frame(_ opcode: UInt8, _ payload: [UInt8], fin: Bool = true, key: [UInt8] = [0x11, 0x22, 0x33, 0x44]) -> [UInt8] {
        var bytes: [UInt8] = [(fin ? 0x80 : 0) | opcode]
        if payload.count < 126 {
            bytes.append(0x80 | UInt8(payload.count))
        } else if payload.count <= 0xFFFF {
            bytes += [0x80 | 126, UInt8(payload.count >> 8), UInt8(payload.count & 0xFF)]
        } else {
            bytes.append(0x80 | 127)
            for shift in stride(from: 56, through: 0, by: -8) { bytes.append(UInt8((payload.count >> shift) & 0xFF)) }
        }
        bytes += key
        bytes += payload.enumerated().map { $0.element ^ key[$0.offset % 4] }
        return bytes
    }

    func parse(_ chunks: [[UInt8]], maxFrameSize: Int = 1 << 20) throws -> [ClientFrame] {
        var parser = FrameParser(maxFrameSize: maxFrameSize)
        var frames: [ClientFrame] = []
        for chunk in chunks {
            try parser.parse(ByteBuffer(bytes: chunk)) { frame in
                frames.append(frame)
                return true
            }
        }
        return frames
    }

    func testUnmasksPayloadsOfEverySize() throws {
        for size in [0, 1, 3, 7, 8, 9, 125, 126, 1000, 65535, 65536, 70000] {
            let payload = (0..<size).map { UInt8(truncatingIfNeeded: $0 &* 31) }
            let frames = try parse([frame(0x2, payload)])
            XCTAssertEqual(frames.count, 1)
            XCTAssertEqual(Array(frames[0].payload.readableBytesView), payload, "size \(size)")
            XCTAssertTrue(frames[0].masked && frames[0].fin)
        }
    }

    func testFramesSplitAcrossReadsAndManyInOneRead() throws {
        let bytes = frame(0x1, Array("hello".utf8)) + frame(0x9, [1, 2]) + frame(0x1, Array("world".utf8), fin: false)
        for cut in 1..<bytes.count {
            let frames = try parse([Array(bytes[..<cut]), Array(bytes[cut...])])
            XCTAssertEqual(frames.map { String(buffer: $0.payload) }, ["hello", "\u{1}\u{2}", "world"], "cut at \(cut)")
            XCTAssertEqual(frames.map(\.opcode), [.text, .ping, .text])
            XCTAssertEqual(frames.map(\.fin), [true, true, false])
        }
    }

    func testRefusedHeaders() {
        func code(_ bytes: [UInt8], max: Int = 1000) -> UInt16? {
            do { _ = try parse([bytes], maxFrameSize: max); return nil } catch { return (error as? ProtocolFailure)?.code }
        }
        XCTAssertEqual(code(frame(0x2, [UInt8](repeating: 0, count: 1001))), 1009)
        XCTAssertEqual(code([0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 1]), 1002, "64-bit length with the top bit set")
        XCTAssertEqual(code([0x82, 0xFF, 0, 0, 0, 1, 0, 0, 0, 0]), 1009, "declared huge before any payload")
        XCTAssertEqual(code(frame(0x9, [], fin: false)), 1002, "fragmented ping")
        XCTAssertEqual(code(frame(0x9, [UInt8](repeating: 0, count: 126))), 1002, "long ping")
    }

    func testFramesBeforeABadHeaderAreDelivered() {
        var parser = FrameParser(maxFrameSize: 100)
        var seen: [String] = []
        let bytes = frame(0x1, Array("ok".utf8)) + frame(0x2, [UInt8](repeating: 0, count: 101))
        XCTAssertThrowsError(try parser.parse(ByteBuffer(bytes: bytes)) { frame in
            seen.append(String(buffer: frame.payload))
            return true
        })
        XCTAssertEqual(seen, ["ok"])
    }

    func testUnmaskedFrameIsReportedAsSuch() throws {
        let frames = try parse([[0x81, 0x02, 0x68, 0x69]])
        XCTAssertEqual(frames.first?.masked, false)
        XCTAssertEqual(frames.first.map { String(buffer: $0.payload) }, "hi")
    }

    func testPartialPayloadIsUnmaskedOnceAndWholeFramesStayIntact() throws {
        let payload = (0..<300).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 1) }
        let bytes = frame(0x1, Array("ok".utf8)) + frame(0x2, payload, key: [0x9A, 0x3C, 0x55, 0xE1]) + frame(0x9, [1])
        for first in stride(from: 1, to: bytes.count, by: 7) {
            for second in stride(from: first, to: bytes.count, by: 13) {
                var parser = FrameParser(maxFrameSize: 1 << 20)
                var partial: [UInt8] = []
                var frames: [ClientFrame] = []
                for chunk in [bytes[..<first], bytes[first..<second], bytes[second...]] {
                    try parser.parse(ByteBuffer(bytes: chunk), partial: { piece in
                        if piece.opcode == .binary { partial += piece.payload.readableBytesView }
                    }) { frame in
                        frames.append(frame)
                        return true
                    }
                }
                XCTAssertEqual(frames.map(\.opcode), [.text, .binary, .ping], "cuts \(first) \(second)")
                XCTAssertEqual(Array(frames[1].payload.readableBytesView), payload, "cuts \(first) \(second)")
                XCTAssertEqual(partial, Array(payload.prefix(partial.count)), "cuts \(first) \(second): partial bytes are the payload's start")
            }
        }
    }

    func testRotatedKeyUnmasksFromAnyOffset() {
        let key: UInt32 = 0x4433_2211  // bytes 11 22 33 44 as read
        for offset in 0..<8 {
            var bytes = [UInt8](repeating: 0, count: 4)
            bytes.withUnsafeMutableBytes { FrameParser.unmask($0, key: FrameParser.rotate(key, by: offset)) }
            XCTAssertEqual(bytes, (0..<4).map { [0x11, 0x22, 0x33, 0x44][($0 + offset) % 4] }, "offset \(offset)")
        }
    }
}
