import NIOCore
import NIOWebSocket

/// A whole message from the client.
public struct WebSocketMessage {
    public enum Kind: Sendable { case text, binary }
    public var kind: Kind
    /// The payload, unmasked (and inflated). Text is valid UTF-8.
    public var data: ByteBuffer
}

/// A message as assembled from frames: still compressed when `compressed` (permessage-deflate),
/// in which case its text has not been validated yet.
struct AssembledMessage {
    var kind: WebSocketMessage.Kind
    var data: ByteBuffer
    var compressed: Bool
}

/// Why a connection must be failed: the close code to send and a reason for the log.
struct ProtocolFailure: Error, Equatable {
    var code: UInt16
    var reason: String

    static let protocolError: UInt16 = 1002
    static let invalidData: UInt16 = 1007
    static let tooLarge: UInt16 = 1009
}

/// Joins data frames into messages (RFC 6455 §5.4), validating text as UTF-8 as it arrives and
/// bounding the size. Control frames never pass through here, so a ping between two fragments
/// does not disturb the message being assembled.
///
/// Text is validated as it arrives down to the byte: frame by frame, and within a frame that is
/// still arriving, piece by piece (`validatePartial`), so invalid UTF-8 fails the connection as
/// soon as the byte that makes it invalid is in, not when its frame or message ends.
///
/// Invariants: `kind` is nil exactly when no fragmented message is in progress;
/// `validatedPrefix` bytes of the next data frame have been validated already.
struct MessageAssembler {
    private let maxMessageSize: Int
    private var kind: WebSocketMessage.Kind?
    private var compressed = false
    private var buffer: ByteBuffer?
    private var utf8 = UTF8Validator()
    private var validatedPrefix = 0

    init(maxMessageSize: Int) {
        self.maxMessageSize = maxMessageSize
    }

    /// True while a fragmented message is incomplete.
    var isAssembling: Bool { kind != nil }

    /// Takes one data frame's unmasked payload. Returns the message when `fin` completes one.
    /// `compressed` is the first frame's RSV1 under permessage-deflate: the message's text is
    /// then validated after inflating, not here.
    mutating func append(opcode: WebSocketOpcode, fin: Bool, compressed rsv1: Bool = false, data: ByteBuffer) throws(ProtocolFailure) -> AssembledMessage? {
        switch opcode {
        case .text, .binary:
            guard kind == nil else {
                throw ProtocolFailure(code: ProtocolFailure.protocolError, reason: "a new message started before the previous one ended")
            }
            let newKind: WebSocketMessage.Kind = opcode == .text ? .text : .binary
            try checkSize(data.readableBytes)
            if newKind == .text && !rsv1 { try validateRest(data, final: fin) }
            if fin { return AssembledMessage(kind: newKind, data: data, compressed: rsv1) }
            kind = newKind
            compressed = rsv1
            buffer = data
            return nil

        case .continuation:
            guard let current = kind, var assembled = buffer else {
                throw ProtocolFailure(code: ProtocolFailure.protocolError, reason: "continuation frame with no message to continue")
            }
            try checkSize(assembled.readableBytes + data.readableBytes)
            if current == .text && !compressed { try validateRest(data, final: fin) }
            buffer = nil  // keep `assembled` uniquely referenced so the append does not copy it
            var piece = data
            assembled.writeBuffer(&piece)
            if fin {
                kind = nil
                defer { compressed = false }
                return AssembledMessage(kind: current, data: assembled, compressed: compressed)
            }
            buffer = assembled
            return nil

        default:
            preconditionFailure("MessageAssembler takes data frames only")
        }
    }

    private func checkSize(_ size: Int) throws(ProtocolFailure) {
        if size > maxMessageSize {
            throw ProtocolFailure(code: ProtocolFailure.tooLarge, reason: "message larger than \(maxMessageSize) bytes")
        }
    }

    /// Validates a whole message's text at once (after inflating).
    static func validateText(_ data: ByteBuffer) throws(ProtocolFailure) {
        var utf8 = UTF8Validator()
        guard data.withUnsafeReadableBytes({ utf8.validate($0) }), utf8.isComplete else {
            throw ProtocolFailure(code: ProtocolFailure.invalidData, reason: "text message is not valid UTF-8")
        }
    }

    /// Takes the first bytes of a data frame whose end has not arrived (`FrameParser`'s
    /// `partial`): validated now if the frame is uncompressed text that starts or continues a
    /// message as it should; anything else waits for the whole frame, which `append` judges.
    mutating func validatePartial(opcode: WebSocketOpcode, compressed rsv1: Bool, data: ByteBuffer) throws(ProtocolFailure) {
        let text: Bool
        switch opcode {
        case .text: text = kind == nil && !rsv1
        case .continuation: text = kind == .text && !compressed && !rsv1
        default: text = false
        }
        guard text else { return }
        try validate(data, final: false)
        validatedPrefix += data.readableBytes
    }

    /// Validates a whole frame's payload but for the prefix `validatePartial` already took.
    private mutating func validateRest(_ data: ByteBuffer, final: Bool) throws(ProtocolFailure) {
        var rest = data
        rest.moveReaderIndex(forwardBy: min(validatedPrefix, rest.readableBytes))
        validatedPrefix = 0
        try validate(rest, final: final)
    }

    private mutating func validate(_ data: ByteBuffer, final: Bool) throws(ProtocolFailure) {
        let valid = data.withUnsafeReadableBytes { utf8.validate($0) }
        if !valid || (final && !utf8.isComplete) {
            throw ProtocolFailure(code: ProtocolFailure.invalidData, reason: "text message is not valid UTF-8")
        }
        if final { utf8 = UTF8Validator() }
    }
}
