/// Incremental UTF-8 validation (RFC 3629), for text messages that arrive in pieces.
///
/// It keeps only the state of a code point cut between two pieces, so a message is validated
/// as its frames arrive and an invalid one is refused at the first bad byte, not at its end.
/// Overlong forms, surrogates (U+D800–U+DFFF) and code points above U+10FFFF are invalid.
struct UTF8Validator {
    /// Continuation bytes still expected for the current code point.
    private var needed: UInt8 = 0
    /// Allowed range of the next continuation byte (narrower than 80–BF right after E0, ED, F0, F4).
    private var lower: UInt8 = 0x80
    private var upper: UInt8 = 0xBF

    /// True when the bytes so far end on a code point boundary.
    var isComplete: Bool { needed == 0 }

    /// Validates the next piece. False as soon as a byte cannot be part of valid UTF-8.
    mutating func validate(_ bytes: UnsafeRawBufferPointer) -> Bool {
        let count = bytes.count
        var i = 0
        while i < count {
            let byte = bytes[i]
            if needed == 0 {
                if byte < 0x80 {
                    // ASCII fast path: eight bytes at a time while no high bit is set.
                    i += 1
                    while i + 8 <= count {
                        let word = bytes.loadUnaligned(fromByteOffset: i, as: UInt64.self)
                        if word & 0x8080_8080_8080_8080 != 0 { break }
                        i += 8
                    }
                    continue
                }
                switch byte {
                case 0xC2...0xDF: needed = 1
                case 0xE0: needed = 2; lower = 0xA0
                case 0xE1...0xEC, 0xEE...0xEF: needed = 2
                case 0xED: needed = 2; upper = 0x9F
                case 0xF0: needed = 3; lower = 0x90
                case 0xF1...0xF3: needed = 3
                case 0xF4: needed = 3; upper = 0x8F
                default: return false
                }
            } else {
                guard byte >= lower && byte <= upper else { return false }
                lower = 0x80
                upper = 0xBF
                needed -= 1
            }
            i += 1
        }
        return true
    }
}
