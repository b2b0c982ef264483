import CompressNIO
import NIOCore
import NIOHTTP1

/// RFC 7692 permessage-deflate: negotiation, and the zlib streams of one event loop.
///
/// luaws always answers with `server_no_context_takeover` and `client_no_context_takeover`
/// (RFC 7692 §7.1.1 lets a server add both to any offer). Every message is then compressed and
/// decompressed on its own, so one deflate and one inflate stream per event loop serve all its
/// connections and an idle connection holds no zlib memory at all (context takeover would cost
/// ~300 KB per connection). The price is a lower ratio on small, repetitive messages.
struct DeflateParameters: Equatable, Sendable {
    /// Window of our compressor: the client may ask for less with server_max_window_bits.
    var serverWindowBits: Int32 = 15

    /// The response header value for these parameters.
    var responseHeader: String {
        var value = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        if serverWindowBits != 15 { value += "; server_max_window_bits=\(serverWindowBits)" }
        return value
    }

    /// The first acceptable permessage-deflate offer among the request's
    /// `Sec-WebSocket-Extensions` headers, or nil (no compression) if there is none.
    static func negotiate(_ headers: HTTPHeaders) -> DeflateParameters? {
        for header in headers["Sec-WebSocket-Extensions"] {
            for offer in header.split(separator: ",") {
                if let accepted = accept(offer) { return accepted }
            }
        }
        return nil
    }

    private static func accept(_ offer: Substring) -> DeflateParameters? {
        var parts = offer.split(separator: ";").map { $0.trimmingCharacters(in: .whitespaces) }
        guard parts.first?.lowercased() == "permessage-deflate" else { return nil }
        parts.removeFirst()
        var result = DeflateParameters()
        var seen: Set<String> = []
        for part in parts {
            let pair = part.split(separator: "=", maxSplits: 1, omittingEmptySubsequences: false)
                .map { $0.trimmingCharacters(in: .whitespaces) }
            let name = pair[0].lowercased()
            guard !name.isEmpty else { return nil }  // ";;" or ";=x": malformed, decline
            var value = pair.count > 1 ? pair[1] : nil
            if let v = value, v.count >= 2, v.hasPrefix("\""), v.hasSuffix("\"") { value = String(v.dropFirst().dropLast()) }
            guard seen.insert(name).inserted else { return nil }  // a parameter twice: decline
            switch name {
            case "server_no_context_takeover", "client_no_context_takeover":
                guard value == nil else { return nil }
            case "server_max_window_bits":
                // zlib cannot deflate with an 8-bit window (it silently uses 9): decline that.
                guard let v = value, let bits = Int32(v), (9...15).contains(bits), v.first != "0" else { return nil }
                result.serverWindowBits = bits
            case "client_max_window_bits":
                if let v = value {
                    guard let bits = Int32(v), (8...15).contains(bits), v.first != "0" else { return nil }
                }
            default:
                return nil  // unknown parameter: decline this offer
            }
        }
        return result
    }
}

extension ServerConfiguration {
    /// How many bytes a compressed message of `compressedBytes` may inflate to.
    ///
    /// Why a floor: it cannot make an attack cheaper (a message of floor/1000 compressed bytes
    /// inflates ~1000:1 whatever the floor is, since zlib tops out there), it only caps the work
    /// one message may cost (1 MiB inflates in a few ms); while without it ordinary repetitive
    /// messages would be refused (a sentence repeated over 225 KB compresses 312:1).
    func inflateLimit(compressedBytes: Int) -> Int {
        guard maxCompressedRatio > 0 else { return maxMessageSize }
        let (scaled, overflow) = compressedBytes.multipliedReportingOverflow(by: maxCompressedRatio)
        return min(maxMessageSize, max(overflow ? Int.max : scaled, Self.inflateFloor))
    }
}

/// The zlib streams of one event loop; made on first use.
final class DeflateStreams {
    private var compressors: [Int32: ZlibCompressor] = [:]
    private var decompressor: ZlibDecompressor?
    private let level: Int32

    init(level: Int32) {
        self.level = level
    }

    /// Compresses one message (RFC 7692 §7.2.1: deflate, sync flush, without the trailing
    /// 00 00 FF FF).
    func compress(_ message: ByteBuffer, windowBits: Int32, allocator: ByteBufferAllocator) throws -> ByteBuffer {
        let compressor = try compressors[windowBits] ?? {
            let made = try ZlibCompressor(algorithm: .deflate, configuration: ZlibConfiguration(windowSize: windowBits, compressionLevel: level, memoryLevel: 8))
            compressors[windowBits] = made
            return made
        }()
        defer { try? compressor.reset() }
        var input = message
        var output = allocator.buffer(capacity: compressor.maxSize(from: input))
        try compressor.deflate(from: &input, to: &output, flush: .sync)
        if output.readableBytes >= 4, output.getBytes(at: output.writerIndex - 4, length: 4) == [0, 0, 0xFF, 0xFF] {
            output.moveWriterIndex(to: output.writerIndex - 4)
        }
        return output
    }

    /// Decompresses one whole message; refuses to produce more than `limit` bytes, and stops
    /// inflating as soon as it has produced more (the output never grows past `limit + 1`).
    func decompress(_ message: ByteBuffer, limit: Int, allocator: ByteBufferAllocator) throws(ProtocolFailure) -> ByteBuffer {
        do {
            let inflater = try decompressor ?? {
                let made = try ZlibDecompressor(algorithm: .deflate, windowSize: 15)
                decompressor = made
                return made
            }()
            defer { try? inflater.reset() }
            var input = allocator.buffer(capacity: message.readableBytes + 4)
            var copy = message
            input.writeBuffer(&copy)
            input.writeBytes([0, 0, 0xFF, 0xFF])
            var output = allocator.buffer(capacity: min(max(message.readableBytes * 4, 1024), limit + 1))
            while true {
                do {
                    try inflater.inflate(from: &input, to: &output)
                    break
                } catch let error as CompressNIOError where error == .bufferOverflow {
                    if output.readableBytes > limit { throw ProtocolFailure(code: ProtocolFailure.tooLarge, reason: "message inflates past \(limit) bytes") }
                    // Double, but only up to one byte past the limit: that byte is enough to refuse.
                    output.reserveCapacity(minimumWritableBytes: min(max(output.readableBytes, 4096), limit + 1 - output.readableBytes))
                } catch let error as CompressNIOError where error == .inputBufferOverflow {
                    break  // all input consumed
                }
            }
            if output.readableBytes > limit { throw ProtocolFailure(code: ProtocolFailure.tooLarge, reason: "message inflates past \(limit) bytes") }
            return output
        } catch let failure as ProtocolFailure {
            try? decompressor?.reset()
            throw failure
        } catch {
            try? decompressor?.reset()
            throw ProtocolFailure(code: ProtocolFailure.invalidData, reason: "compressed message does not inflate: \(error)")
        }
    }
}
