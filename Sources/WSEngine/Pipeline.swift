import NIOCore
import NIOHTTP1
import NIOWebSocket

/// The handlers of one accepted connection: HTTP/1.1 with the WebSocket upgrade, `HTTPHandler`
/// for everything that is not an upgrade, and after the upgrade NIO's frame codec with
/// `WebSocketConnectionHandler`. Shared by the server and the fuzz harness.
struct ServerPipeline: Sendable {
    let configuration: ServerConfiguration
    let files: StaticFiles?
    let counter: ConnectionCounter
    private let loops: [ObjectIdentifier: NIOLoopBound<LoopState>]
    private let upgrader: NIOWebSocketServerUpgrader

    init(configuration: ServerConfiguration, files: StaticFiles?, loops: [ObjectIdentifier: NIOLoopBound<LoopState>]) {
        self.configuration = configuration
        self.files = files
        self.loops = loops
        let counter = ConnectionCounter(limit: configuration.maxConnections)
        self.counter = counter
        upgrader = NIOWebSocketServerUpgrader(
            maxFrameSize: configuration.maxFrameSize,
            automaticErrorHandling: false,  // WebSocketConnectionHandler answers protocol errors
            shouldUpgrade: { channel, head in
                // Refusals return nil; HTTPHandler then answers the request with the reason
                // (the application's own status, if it refused).
                guard let bound = loops[ObjectIdentifier(channel.eventLoop)],
                      let agreed = Handshake(head, configuration: configuration, application: bound.value.application)
                else {
                    return channel.eventLoop.makeSucceededFuture(nil)
                }
                var asked = WebSocketRequest(head: head, peer: channel.remoteAddress, configuration: configuration)
                asked.subprotocol = agreed.subprotocol
                let request = asked
                let key = ObjectIdentifier(channel)
                channel.closeFuture.whenComplete { _ in
                    bound.value.acceptedUpgrades[key] = nil
                    bound.value.refusedUpgrades[key] = nil
                }
                return bound.value.application.shouldUpgrade(request, on: channel.eventLoop).map { decision -> HTTPHeaders? in
                    let loop = bound.value
                    // The client may have gone while the application decided: its channel's
                    // close has already cleared this channel's entries, and a later channel may
                    // reuse the same identity, so nothing may be recorded for it now.
                    guard channel.isActive else { return nil }
                    switch decision {
                    case .refuse(let status, let reason):
                        loop.closedFigures.refused["application", default: 0] += 1
                        loop.refusedUpgrades[key] = ((400...599).contains(status) ? status : 403, reason)
                        return nil
                    case .accept(let context):
                        // The slot is taken only once the application accepted.
                        guard counter.acquire() else {
                            loop.closedFigures.refused["connection_limit", default: 0] += 1
                            loop.refusedUpgrades[key] = (503, "Too many connections\n")
                            return nil
                        }
                        channel.closeFuture.whenComplete { _ in counter.release() }
                        var accepted = request
                        accepted.context = context
                        loop.acceptedUpgrades[key] = (accepted, agreed)
                        return agreed.responseHeaders
                    }
                }
            },
            upgradePipelineHandler: { channel, head in
                channel.eventLoop.makeCompletedFuture {
                    let loop = loops[ObjectIdentifier(channel.eventLoop)]!.value
                    guard let (request, agreed) = loop.acceptedUpgrades.removeValue(forKey: ObjectIdentifier(channel)) else {
                        throw ChannelError.inappropriateOperationForState
                    }
                    let handler = WebSocketConnectionHandler(
                        id: loop.makeID(), request: request, deflate: agreed.deflate, loop: loop)
                    // NIO's upgrader always installs its frame codec. The handler parses frames
                    // itself (FrameParser) and so goes *before* NIO's decoder, taking the bytes
                    // ahead of it; it encodes its frames itself too, writing them through
                    // FrameOutput, past NIO's encoder: at the head of the pipeline, or right
                    // behind the TLS handler when there is one, so that frames are encrypted
                    // (at the head they would reach the socket in plaintext).
                    let decoder = try channel.pipeline.syncOperations.handler(type: ByteToMessageHandler<WebSocketFrameDecoder>.self)
                    let output = FrameOutput()
                    if let tls = try? channel.pipeline.syncOperations.context(name: ServerPipeline.tlsHandlerName) {
                        try channel.pipeline.syncOperations.addHandler(output, position: .after(tls.handler))
                    } else if configuration.security != nil {
                        throw ChannelError.inappropriateOperationForState  // never without its TLS handler
                    } else {
                        try channel.pipeline.syncOperations.addHandler(output, position: .first)
                    }
                    handler.output = output
                    try channel.pipeline.syncOperations.addHandler(handler, position: .before(decoder))
                    // Now that nothing reaches it, NIO's decoder can go (it costs memory per connection).
                    channel.pipeline.syncOperations.removeHandler(decoder, promise: nil)
                }
            }
        )
    }

    /// The name of the TLS handler, first in the pipeline when `configuration.security` is set.
    static let tlsHandlerName = "luaws.tls"

    func configure(_ channel: Channel) throws {
        // TLS goes in front of everything: whatever is written, the 101 response and frames
        // (FrameOutput goes right behind it) included, leaves through it.
        if let security = configuration.security {
            try channel.pipeline.syncOperations.addHandler(try security.makeHandler(), name: Self.tlsHandlerName)
        }
        let http = HTTPHandler(configuration: configuration, files: files, counter: counter, loop: loops[ObjectIdentifier(channel.eventLoop)])
        try channel.pipeline.syncOperations.configureHTTPServerPipeline(
            withServerUpgrade: (upgraders: [upgrader], completionHandler: { context in
                context.pipeline.syncOperations.removeHandler(name: "luaws.http", promise: nil)
            }),
            withErrorHandling: true
        )
        try channel.pipeline.syncOperations.addHandler(http, name: "luaws.http")
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
