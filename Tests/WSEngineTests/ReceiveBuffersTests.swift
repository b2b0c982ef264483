import NIOCore
import XCTest

@testable import WSEngine

final class ReceiveBuffersTests: XCTestCase {
    /// Read sizes that grow, shrink, and bounce off both bounds.
    static let reads: [Int] = [10, 512, 1024, 2048, 5000, 100, 100, 100, 100, 70000, 70000, 70000, 65536, 65536,
                               1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 64, 128, 32, 32, 256]

    func testAdaptivePicksTheSizesNIOsDefaultAllocatorPicks() {
        var ours = ReceiveBuffers.Adaptive(minimum: 64, initial: 512, maximum: 65536)
        var nios = AdaptiveRecvByteBufferAllocator(minimum: 64, initial: 512, maximum: 65536)
        for read in Self.reads {
            XCTAssertEqual(ours.nextBufferSize(), nios.nextBufferSize())
            XCTAssertEqual(ours.record(actualReadBytes: read), nios.record(actualReadBytes: read), "after a read of \(read)")
        }
        XCTAssertEqual(ours.nextBufferSize(), nios.nextBufferSize())
    }

    func testOpeningNeverAsksNIOToGrowTheBufferItKeeps() {
        var opening = ReceiveBuffers.Opening()
        XCTAssertNil(opening.nextBufferSize())
        XCTAssertEqual(opening.buffer(allocator: ByteBufferAllocator()).capacity, ReceiveBuffers.Opening.kept)
        // A read that fills the kept buffer: the next one goes into a bigger buffer (not kept).
        XCTAssertTrue(opening.record(actualReadBytes: ReceiveBuffers.Opening.kept))
        XCTAssertEqual(opening.buffer(allocator: ByteBufferAllocator()).capacity, 2 * ReceiveBuffers.Opening.kept)
        // Two short reads bring the size back down (as NIO's allocator does): back to the kept buffer.
        XCTAssertTrue(opening.record(actualReadBytes: 10))
        XCTAssertFalse(opening.record(actualReadBytes: 10))
        XCTAssertEqual(opening.buffer(allocator: ByteBufferAllocator()).capacity, ReceiveBuffers.Opening.kept)
        XCTAssertFalse(opening.record(actualReadBytes: 10))
    }

    /// A channel holds its allocator as an existential: 24 bytes inline, or a box on the heap.
    func testAllocatorsFitInAnExistentialsInlineBuffer() {
        XCTAssertLessThanOrEqual(MemoryLayout<ReceiveBuffers.Adaptive>.size, 24)
        XCTAssertLessThanOrEqual(MemoryLayout<ReceiveBuffers.Opening>.size, 24)
    }
}
