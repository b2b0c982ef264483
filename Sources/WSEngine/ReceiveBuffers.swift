import NIOCore

/// How a connection sizes its reads, before and after its upgrade.
///
/// NIO keeps each channel's first receive buffer for the channel's whole life
/// (`NIOPooledRecvBufferAllocator` reuses it for every read that finds it unreferenced, and grows
/// it whenever the allocator's `nextBufferSize()` asks for more than it holds; it never shrinks
/// it), and with `maxMessagesPerRead` reads in a row it keeps up to that many buffers. So an idle
/// connection holds what reading its opening request took: with NIO's defaults (2 KB to start,
/// 4 reads in a row) 2 KB, a third of an idle connection's memory, and more for requests over 2 KB.
///
/// Until the upgrade, `Opening` keeps that first buffer at `Opening.kept` bytes and lets no read
/// grow it: reads that want more go into buffers NIO does not keep (with one read per readiness,
/// `openingReadsPerReadiness`, NIO keeps only the first). At the upgrade, `WebSocketUpgrader`
/// switches to `messages` and NIO's 4 reads in a row: the kept buffer grows to fit at the first
/// message, as it would have with NIO's defaults, and a connection that sends nothing keeps 256
/// bytes.
enum ReceiveBuffers {
    /// Before the upgrade: the request line and headers, TLS handshakes, request bodies.
    struct Opening: RecvByteBufferAllocator {
        /// The size of the buffer NIO keeps: a short upgrade request (a library's, ~150 bytes)
        /// takes one read; a browser's (~500 bytes) two.
        static let kept = 256
        /// The sizes of the reads, as NIO's default allocator would pick them.
        private var sizes = Adaptive(minimum: 64, initial: Opening.kept, maximum: 65536)

        func buffer(allocator: ByteBufferAllocator) -> ByteBuffer {
            sizes.buffer(allocator: allocator)
        }

        /// No `nextBufferSize()` (nil, the protocol's default): NIO then reuses the kept buffer
        /// as it is, unless the last `record` said the next read wants a bigger one, which NIO
        /// then makes anew with `buffer(allocator:)` and does not keep (one read per readiness).
        mutating func record(actualReadBytes: Int) -> Bool {
            _ = sizes.record(actualReadBytes: actualReadBytes)
            return sizes.nextBufferSize()! > Self.kept
        }
    }

    static let openingReadsPerReadiness: UInt = 1

    /// After the upgrade: NIO's default allocator, but starting at 512 bytes (NIO's 2 KB is what a
    /// connection that sent one small message would keep).
    static let messages = Adaptive(minimum: 64, initial: 512, maximum: 65536)
    /// NIO's default.
    static let messageReadsPerReadiness: UInt = 4

    /// NIO's `AdaptiveRecvByteBufferAllocator`, the same sizes by the same rule, in 13 bytes
    /// instead of 33: a channel holds its allocator as an existential, which keeps up to 24
    /// bytes inline and boxes anything larger on the heap (64 bytes per connection).
    struct Adaptive: RecvByteBufferAllocator {
        private let minimum: UInt32
        private let maximum: UInt32
        private var next: UInt32
        private var decreaseNow = false

        /// Powers of 2, `minimum <= initial <= maximum <= 1 << 30`.
        init(minimum: Int, initial: Int, maximum: Int) {
            precondition(minimum > 0 && minimum <= initial && initial <= maximum && maximum <= 1 << 30)
            precondition([minimum, initial, maximum].allSatisfy { $0.nonzeroBitCount == 1 })
            self.minimum = UInt32(minimum)
            self.maximum = UInt32(maximum)
            self.next = UInt32(initial)
        }

        func buffer(allocator: ByteBufferAllocator) -> ByteBuffer {
            allocator.buffer(capacity: Int(next))
        }

        func nextBufferSize() -> Int? {
            Int(next)
        }

        /// Halves the size after two reads in a row that took at most half of it (not below
        /// `minimum`), doubles it after a read that filled it (not above `maximum`); true when it
        /// grew.
        mutating func record(actualReadBytes: Int) -> Bool {
            let lower = next >> 1
            if actualReadBytes <= Int(lower) && lower >= minimum {
                if decreaseNow {
                    next = lower
                    decreaseNow = false
                } else {
                    decreaseNow = true
                }
                return false
            }
            decreaseNow = false
            if actualReadBytes >= Int(next) && next << 1 <= maximum {
                next <<= 1
                return true
            }
            return false
        }
    }
}
