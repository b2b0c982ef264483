import Foundation
import NIOCore
import NIOHTTP1
import NIOWebSocket

/// The handlers of one accepted connection: HTTP/1.1 with the WebSocket upgrade, `HTTPHandler`
/// for everything that is not an upgrade, and after the upgrade `WebSocketConnectionHandler`
/// alone (behind TLS, if any). Shared by the server and the fuzz harness.
struct ServerPipeline: Sendable {
    let configuration: ServerConfiguration
    let files: StaticFiles?
    let counter: ConnectionCounter
    private let loops: [ObjectIdentifier: NIOLoopBound<LoopState>]
    private let upgrader: WebSocketUpgrader

    init(configuration: ServerConfiguration, files: StaticFiles?, loops: [ObjectIdentifier: NIOLoopBound<LoopState>]) {
        self.configuration = configuration
        self.files = files
        self.loops = loops
        let counter = ConnectionCounter(limit: configuration.maxConnections)
        self.counter = counter
        upgrader = WebSocketUpgrader(configuration: configuration, counter: counter, loops: loops)
    }

    /// The name of the TLS handler, first in the pipeline when `configuration.security` is set.
    static let tlsHandlerName = "luaws.tls"

    func configure(_ channel: Channel) throws {
        // TLS goes in front of everything: whatever is written, the 101 response and frames
        // included, leaves through it.
        if let security = configuration.security {
            try channel.pipeline.syncOperations.addHandler(try security.makeHandler(), name: Self.tlsHandlerName)
        }
        let http = HTTPHandler(configuration: configuration, files: files, counter: counter, loop: loops[ObjectIdentifier(channel.eventLoop)])
        try channel.pipeline.syncOperations.configureHTTPServerPipeline(
            // HTTPHandler leaves in `WebSocketUpgrader.upgrade`, which takes the accepted request from it.
            withServerUpgrade: (upgraders: [upgrader], completionHandler: { _ in }),
            withErrorHandling: true
        )
        try channel.pipeline.syncOperations.addHandler(http)
    }
}

/// The server side of the opening handshake (RFC 6455 §4.2). The answer is NIO's:
/// `buildUpgradeResponse` is `NIOWebSocketServerUpgrader`'s (its checks of the key and version,
/// its `Sec-WebSocket-Accept`, its headers), asked through `decide`. The difference is the
/// upgrade itself: NIO's always installs its frame encoder and decoder, which the connection
/// handler does not use (it parses and encodes frames itself) and which stayed in every upgraded
/// connection's pipeline (the encoder could not be removed), with their contexts and a buffer
/// (~0.25 KB per idle connection). Here the pipeline after the upgrade holds the connection
/// handler only (and TLS, if any): `upgrade` is ours, and NIO's is never called.
///
/// Refusals make `decide` answer nil, so NIO's upgrader fails with a `NIOWebSocketUpgradeError`;
/// NIO's upgrade handler then passes the request on to `HTTPHandler`, which answers it (with the
/// application's status, if the application refused: see `HTTPHandler.UpgradeOutcome`).
final class WebSocketUpgrader: HTTPServerProtocolUpgrader, Sendable {
    let supportedProtocol = "websocket"
    let requiredUpgradeHeaders: [String] = []
    private let counter: ConnectionCounter
    private let loops: [ObjectIdentifier: NIOLoopBound<LoopState>]
    /// Answers the request (never upgrades: see `upgrade`).
    private let nio: NIOWebSocketServerUpgrader

    init(configuration: ServerConfiguration, counter: ConnectionCounter, loops: [ObjectIdentifier: NIOLoopBound<LoopState>]) {
        self.counter = counter
        self.loops = loops
        nio = NIOWebSocketServerUpgrader(
            maxFrameSize: configuration.maxFrameSize,
            automaticErrorHandling: false,
            shouldUpgrade: { channel, head in
                Self.decide(channel: channel, head: head, configuration: configuration, counter: counter, loops: loops)
            },
            upgradePipelineHandler: { channel, _ in channel.eventLoop.makeFailedFuture(ChannelError.inappropriateOperationForState) }
        )
    }

    /// Called on the channel's loop when a request asks for `Upgrade: websocket`. NIO's upgrader
    /// checks for exactly one key and one version, the version 13, before anything else (the
    /// application is not asked about such a request), then asks `decide`.
    func buildUpgradeResponse(channel: Channel, upgradeRequest head: HTTPRequestHead, initialResponseHeaders: HTTPHeaders) -> EventLoopFuture<HTTPHeaders> {
        nio.buildUpgradeResponse(channel: channel, upgradeRequest: head, initialResponseHeaders: initialResponseHeaders)
    }

    /// The headers the server adds to its 101 (extensions, sub-protocol), or nil to refuse.
    private static func decide(
        channel: Channel, head: HTTPRequestHead, configuration: ServerConfiguration, counter: ConnectionCounter,
        loops: [ObjectIdentifier: NIOLoopBound<LoopState>]
    ) -> EventLoopFuture<HTTPHeaders?> {
        // Refusals here return nil; HTTPHandler then answers the request with the reason.
        guard let bound = loops[ObjectIdentifier(channel.eventLoop)],
              let http = try? channel.pipeline.syncOperations.handler(type: HTTPHandler.self),
              let agreed = Handshake(head, configuration: configuration, application: bound.value.application)
        else {
            return channel.eventLoop.makeSucceededFuture(nil)
        }
        var asked = WebSocketRequest(head: head, peer: channel.remoteAddress, configuration: configuration)
        asked.subprotocol = agreed.subprotocol
        let request = asked
        let httpHandler = NIOLoopBound(http, eventLoop: channel.eventLoop)
        return bound.value.application.shouldUpgrade(request, on: channel.eventLoop).map { decision -> HTTPHeaders? in
            let loop = bound.value
            // The client may have gone while the application decided: nothing is recorded then
            // (HTTPHandler has left the pipeline, and would not give a slot back).
            guard channel.isActive else { return nil }
            switch decision {
            case .refuse(let status, let reason):
                loop.closedFigures.refused["application", default: 0] += 1
                httpHandler.value.recordUpgrade(.refused(status: (400...599).contains(status) ? status : 403, reason: reason))
                return nil
            case .accept(let context):
                // The slot is taken only once the application accepted.
                guard counter.acquire() else {
                    loop.closedFigures.refused["connection_limit", default: 0] += 1
                    httpHandler.value.recordUpgrade(.refused(status: 503, reason: "Too many connections\n"))
                    return nil
                }
                var accepted = request
                accepted.context = context
                httpHandler.value.recordUpgrade(.accepted(accepted, agreed))
                return agreed.responseHeaders
            }
        }
    }

    /// Called on the loop once the 101 response is written and NIO's HTTP handlers are gone;
    /// NIO's upgrade handler leaves right after, passing on what the client sent meanwhile.
    func upgrade(context: ChannelHandlerContext, upgradeRequest: HTTPRequestHead) -> EventLoopFuture<Void> {
        context.eventLoop.makeCompletedFuture {
            let pipeline = context.pipeline.syncOperations
            let http = try pipeline.handler(type: HTTPHandler.self)
            guard let loop = loops[ObjectIdentifier(context.eventLoop)]?.value,
                  let (request, agreed) = http.takeAcceptedUpgrade()
            else {
                throw ChannelError.inappropriateOperationForState
            }
            // From here this function holds the connection slot; the connection handler, once
            // added, holds it until the connection ends.
            let handler = WebSocketConnectionHandler(id: loop.makeID(), request: request, deflate: agreed.deflate, loop: loop, slots: counter)
            do {
                pipeline.removeHandler(http, promise: nil)
                // Reads sized for messages from now on (see `ReceiveBuffers`).
                if let options = context.channel.syncOptions {
                    try? options.setOption(ChannelOptions.recvAllocator, value: ReceiveBuffers.messages)
                    try? options.setOption(ChannelOptions.maxMessagesPerRead, value: ReceiveBuffers.messageReadsPerReadiness)
                }
                // Last, behind NIO's upgrade handler, which hands it the bytes that follow the
                // request. It encodes its frames itself and writes them from its own context:
                // they meet no other handler on their way out but TLS, when there is TLS.
                try pipeline.addHandler(handler)
            } catch {
                counter.release()
                throw error
            }
        }
    }

}

/// What the server agrees to for one upgrade request, or nil if it refuses it. Deterministic in
/// the request, so the upgrader's two callbacks reach the same answer.
struct Handshake {
    var deflate: DeflateParameters?
    var subprotocol: String?

    init?(_ head: HTTPRequestHead, configuration: ServerConfiguration, application: WebSocketApplication) {
        let path = head.pathAndQuery.path
        // RFC 6455 §4.1: the handshake is an HTTP/1.1 GET.
        let keys = head.headers["Sec-WebSocket-Key"]
        guard configuration.webSocketPaths.contains(path), head.method == .GET,
              head.version.major == 1 && head.version.minor >= 1,
              keys.count == 1, Self.isNonce(keys[0]),
              HTTPHandler.originAllowed(head, configuration)
        else { return nil }
        deflate = configuration.compression ? DeflateParameters.negotiate(head.headers) : nil
        let offered = WebSocketRequest.offeredSubprotocols(head.headers)
        if !offered.isEmpty, let chosen = application.subprotocol(offered: offered, path: path), offered.contains(chosen) {
            subprotocol = chosen
        }
    }

    /// RFC 6455 §4.2.1: `Sec-WebSocket-Key` is a 16-byte nonce in base64, so exactly 22
    /// characters of the base64 alphabet and `==`. (The 2 bits the last character carries past
    /// the 16 bytes are not checked: decoders ignore them.) Anything else is not a WebSocket
    /// client, and a key that does not decode would otherwise be hashed into the accept header as is.
    static func isNonce(_ key: String) -> Bool {
        var bytes = key.utf8[...]
        while let first = bytes.first, first == UInt8(ascii: " ") || first == UInt8(ascii: "\t") { bytes = bytes.dropFirst() }
        while let last = bytes.last, last == UInt8(ascii: " ") || last == UInt8(ascii: "\t") { bytes = bytes.dropLast() }
        guard bytes.count == 24, bytes.suffix(2).elementsEqual("==".utf8) else { return false }
        return bytes.prefix(22).allSatisfy { byte in
            switch byte {
            case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"),
                 UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "+"), UInt8(ascii: "/"):
                return true
            default:
                return false
            }
        }
    }

    var responseHeaders: HTTPHeaders {
        var headers = HTTPHeaders()
        if let deflate { headers.add(name: "Sec-WebSocket-Extensions", value: deflate.responseHeader) }
        if let subprotocol { headers.add(name: "Sec-WebSocket-Protocol", value: subprotocol) }
        return headers
    }
}
