import CHiredis
import NIOCore

/// Turns a command's arguments into RESP bytes with hiredis's `redisFormatCommandArgv`.
enum RedisCommandFormatter {
    /// The arguments are packed back to back into one array so that the C side receives two
    /// flat buffers (bytes and lengths) rather than an array of pointers into Swift arrays.
    static func format(_ arguments: [[UInt8]], maxBytes: Int, allocator: ByteBufferAllocator) throws(RedisError) -> ByteBuffer {
        guard !arguments.isEmpty, !arguments[0].isEmpty else { throw .invalidCommand("empty command") }
        guard arguments.count < Int(Int32.max) else { throw .invalidCommand("too many arguments") }
        var total = 0
        for argument in arguments {
            total += argument.count
            // hiredis returns the length as a C int; the bound keeps it far below that.
            guard total <= maxBytes else { throw .invalidCommand("command larger than \(maxBytes) bytes") }
        }
        var packed: [UInt8] = []
        packed.reserveCapacity(max(total, 1))
        for argument in arguments { packed.append(contentsOf: argument) }
        if packed.isEmpty { packed.append(0) }  // a valid base address even when every argument is empty
        let lengths = arguments.map(\.count)

        var output: UnsafeMutablePointer<CChar>?
        let length = packed.withUnsafeBytes { data in
            lengths.withUnsafeBufferPointer { lens in
                luaws_redis_format(&output, Int32(arguments.count), data.baseAddress, lens.baseAddress)
            }
        }
        guard length >= 0, let output else { throw .invalidCommand("out of memory formatting a command") }
        defer { luaws_redis_command_free(output) }
        return allocator.buffer(bytes: UnsafeRawBufferPointer(start: output, count: Int(length)))
    }
}
