import NIOCore
import NIOWebSocket

/// A whole message from the client.
public struct WebSocketMessage {
    public enum Kind: Sendable { case text, binary }
    public var kind: Kind
    /// The payload, unmasked. Text is valid UTF-8.
    public var data: ByteBuffer
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
/// Invariant: `kind` is nil exactly when no fragmented message is in progress.
struct MessageAssembler {
    private let maxMessageSize: Int
    private var kind: WebSocketMessage.Kind?
    private var buffer: ByteBuffer?
    private var utf8 = UTF8Validator()

    init(maxMessageSize: Int) {
        self.maxMessageSize = maxMessageSize
    }

    /// True while a fragmented message is incomplete.
    var isAssembling: Bool { kind != nil }

    /// Takes one data frame's unmasked payload. Returns the message when `fin` completes one.
    mutating func append(opcode: WebSocketOpcode, fin: Bool, data: ByteBuffer) throws(ProtocolFailure) -> WebSocketMessage? {
        switch opcode {
        case .text, .binary:
            guard kind == nil else {
                throw ProtocolFailure(code: ProtocolFailure.protocolError, reason: "a new message started before the previous one ended")
            }
            let newKind: WebSocketMessage.Kind = opcode == .text ? .text : .binary
            try checkSize(data.readableBytes)
            if newKind == .text { try validate(data, final: fin) }
            if fin { return WebSocketMessage(kind: newKind, data: data) }
            kind = newKind
            buffer = data
            return nil

        case .continuation:
            guard let current = kind, var assembled = buffer else {
                throw ProtocolFailure(code: ProtocolFailure.protocolError, reason: "continuation frame with no message to continue")
            }
            try checkSize(assembled.readableBytes + data.readableBytes)
            if current == .text { try validate(data, final: fin) }
            buffer = nil  // keep `assembled` uniquely referenced so the append does not copy it
            var piece = data
            assembled.writeBuffer(&piece)
            if fin {
                kind = nil
                return WebSocketMessage(kind: current, data: assembled)
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

    private mutating func validate(_ data: ByteBuffer, final: Bool) throws(ProtocolFailure) {
        let valid = data.withUnsafeReadableBytes { utf8.validate($0) }
        if !valid || (final && !utf8.isComplete) {
            throw ProtocolFailure(code: ProtocolFailure.invalidData, reason: "text message is not valid UTF-8")
        }
        if final { utf8 = UTF8Validator() }
    }
}
