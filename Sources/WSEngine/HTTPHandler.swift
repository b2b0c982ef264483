import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOWebSocket

/// Answers the HTTP requests that are not WebSocket upgrades: files from the public folder
/// (`/` is `index.html`), 426 for plain requests to a WebSocket path, 400 for a broken handshake,
/// 404 and 405 otherwise. Never serves anything outside the public folder. A GET for an event
/// stream's path hands the connection to an `EventStreamHandler` (503 past its subscribers).
///
/// Pipelined requests do not pile up responses: NIO's HTTPServerPipelineHandler hands over the
/// next request as soon as a response is *written*, not sent, so a client that pipelines
/// thousands of requests for a big file and reads nothing would have them all answered into
/// memory. Instead, a request that arrives while the channel is not writable (what is queued
/// for the client is over `maxOutboundBytes`) is held, and answered when the channel is writable
/// again (below half of it). At most one request is held: NIO's handler delivers no other until
/// this one is answered, and reads no more from the socket meanwhile (this handler also keeps
/// back the `read()`s that reach it, so nothing is read while it holds one).
final class HTTPHandler: ChannelDuplexHandler, RemovableChannelHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundIn = HTTPServerResponsePart
    typealias OutboundOut = HTTPServerResponsePart

    private let configuration: ServerConfiguration
    private let files: StaticFiles?
    private let counter: ConnectionCounter
    /// The loop's state: the application (routes, refusals it decided).
    private let loop: NIOLoopBound<LoopState>?
    private var head: HTTPRequestHead?
    /// The body of a request for an application route, kept up to `maxBodySize`.
    private var body: ByteBuffer?
    private var bodyTooLarge = false
    /// Closes the connection if no complete request comes in time (armed between requests).
    private var timeout: Scheduled<Void>?
    /// A complete request not answered yet because the client has not read the previous answers.
    private var held: (head: HTTPRequestHead, body: ByteBuffer?)?
    /// A `read()` kept back while a request is held.
    private var readPending = false

    /// What the application decided about this connection's upgrade request, recorded by
    /// `WebSocketUpgrader` (on this handler, so that it goes with the connection: nothing is kept
    /// by channel elsewhere, and no close callback is needed to clear it).
    enum UpgradeOutcome {
        /// Accepted, and a connection slot taken for it: the upgrade takes both (`takeAcceptedUpgrade`);
        /// should the connection end first, `handlerRemoved` gives the slot back.
        case accepted(WebSocketRequest, Handshake)
        /// Refused with this status and text, which `respond` answers with.
        case refused(status: Int, reason: String)
    }
    private var upgradeOutcome: UpgradeOutcome?

    func recordUpgrade(_ outcome: UpgradeOutcome) {
        releaseSlot()
        upgradeOutcome = outcome
    }

    /// The accepted upgrade, with its connection slot, which the caller now holds.
    func takeAcceptedUpgrade() -> (WebSocketRequest, Handshake)? {
        guard case .accepted(let request, let handshake)? = upgradeOutcome else { return nil }
        upgradeOutcome = nil
        return (request, handshake)
    }

    private func releaseSlot() {
        if case .accepted? = upgradeOutcome { counter.release() }
        upgradeOutcome = nil
    }

    init(configuration: ServerConfiguration, files: StaticFiles?, counter: ConnectionCounter, loop: NIOLoopBound<LoopState>?) {
        self.loop = loop
        self.configuration = configuration
        self.files = files
        self.counter = counter
    }

    func handlerAdded(context: ChannelHandlerContext) {
        armTimeout(context: context)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        timeout?.cancel()
        timeout = nil
        held = nil
        releaseSlot()
        if readPending {
            readPending = false
            context.read()
        }
    }

    private func armTimeout(context: ChannelHandlerContext) {
        timeout?.cancel()
        let loopContext = context.loopBound
        timeout = context.eventLoop.assumeIsolated().scheduleTask(in: configuration.handshakeTimeout) {
            loopContext.value.close(promise: nil)
        }
    }

    static func originAllowed(_ head: HTTPRequestHead, _ configuration: ServerConfiguration) -> Bool {
        guard let allowed = configuration.allowedOrigins, let origin = head.headers["Origin"].first else { return true }
        return allowed.contains(origin)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            self.head = head
            bodyTooLarge = false
            let path = head.pathAndQuery.path
            let routed = configuration.routes[path] == nil && configuration.eventStreams[path] == nil && !configuration.webSocketPaths.contains(path)
                && loop?.value.application.hasRoute(method: head.method.rawValue, path: path) == true
            body = routed ? context.channel.allocator.buffer(capacity: 0) : nil
        case .body(var part):
            guard body != nil, !bodyTooLarge else { return }
            if body!.readableBytes + part.readableBytes > configuration.maxBodySize {
                bodyTooLarge = true
                body = context.channel.allocator.buffer(capacity: 0)  // what was kept goes now
            } else {
                body!.writeBuffer(&part)
            }
        case .end:
            guard let head else { return }
            self.head = nil
            let body = self.body
            self.body = nil
            timeout?.cancel()
            if bodyTooLarge {
                bodyTooLarge = false
                send(.payloadTooLarge, "Request body larger than \(configuration.maxBodySize) bytes\n", extra: [("Connection", "close")], head: head, context: context, close: true)
            } else if held == nil && context.channel.isWritable {
                respond(to: head, body: body, context: context)
            } else if held == nil {
                held = (head, body)
            } else {
                // A second request while one is held: NIO's pipeline handler never delivers
                // one, but should it, hold no more than one.
                context.close(promise: nil)
            }
        }
    }

    func read(context: ChannelHandlerContext) {
        if held != nil {
            readPending = true
        } else {
            context.read()
        }
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable, let (head, body) = held {
            held = nil
            respond(to: head, body: body, context: context)
            if held == nil && readPending {
                readPending = false
                context.read()
            }
        }
        context.fireChannelWritabilityChanged()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        // A refused upgrade reaches us as an error and then as the plain request, which
        // `respond` answers; anything else ends the connection.
        if error is NIOWebSocketUpgradeError { return }
        context.close(promise: nil)
    }

    private func respond(to head: HTTPRequestHead, body: ByteBuffer?, context: ChannelHandlerContext) {
        let (path, query) = head.pathAndQuery
        if configuration.webSocketPaths.contains(path) {
            let version = head.headers["Sec-WebSocket-Version"].first
            let refused = { (reason: String) in self.loop?.value.closedFigures.refused[reason, default: 0] += 1 }
            // A refusal the pipeline decided was counted there.
            if case .refused(let code, let reason)? = upgradeOutcome {
                upgradeOutcome = nil
                // The application's answer (on_upgrade), or the connection limit it ran into.
                let status = HTTPResponseStatus(statusCode: code)
                let text = reason.hasSuffix("\n") || reason.isEmpty ? reason : reason + "\n"
                send(status, text, extra: status == .serviceUnavailable ? [("Retry-After", "5")] : [], head: head, context: context)
            } else if !Self.originAllowed(head, configuration) {
                refused("origin")
                send(.forbidden, "Origin not allowed\n", head: head, context: context)
            } else if counter.isFull && head.headers["Upgrade"].contains(where: { $0.lowercased().contains("websocket") }) {
                refused("connection_limit")
                send(.serviceUnavailable, "Too many connections\n", extra: [("Retry-After", "5")], head: head, context: context)
            } else if head.method != .GET {
                refused("method")
                send(.methodNotAllowed, "WebSocket endpoint: use GET with an upgrade\n", extra: [("Allow", "GET")], head: head, context: context)
            } else if version != nil && version != "13" {
                refused("version")
                send(.upgradeRequired, "Unsupported WebSocket version: this server speaks 13\n",
                     extra: [("Sec-WebSocket-Version", "13"), ("Upgrade", "websocket")], head: head, context: context)
            } else if head.headers["Upgrade"].contains(where: { $0.lowercased().contains("websocket") }) {
                refused("bad_handshake")
                send(.badRequest, "Invalid WebSocket handshake (Sec-WebSocket-Key missing or malformed?)\n",
                     extra: [("Sec-WebSocket-Version", "13")], head: head, context: context)
            } else {
                refused("not_websocket")
                send(.upgradeRequired, "This is a WebSocket endpoint: connect with a WebSocket client\n",
                     extra: [("Sec-WebSocket-Version", "13"), ("Upgrade", "websocket")], head: head, context: context)
            }
            return
        }
        if let route = configuration.routes[path], head.method == .GET || head.method == .HEAD {
            let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
            route(context.eventLoop).whenComplete { result in
                let (handler, context) = loopBound.value
                switch result {
                case .success(let response):
                    var body = context.channel.allocator.buffer(capacity: response.body.utf8.count)
                    body.writeString(response.body)
                    handler.send(HTTPResponseStatus(statusCode: response.status), body: body, contentType: response.contentType,
                                 extra: [("Cache-Control", "no-store")], head: head, context: context)
                case .failure:
                    handler.send(.internalServerError, "Internal server error\n", head: head, context: context)
                }
            }
            return
        }
        if let stream = configuration.eventStreams[path], head.method == .GET {
            guard let subscriber = stream.subscribe(lastEventID: EventStreamHandler.lastEventID(head), on: context.eventLoop) else {
                send(.serviceUnavailable, "Too many event stream subscribers\n", extra: [("Retry-After", "5")], head: head, context: context)
                return
            }
            // The connection is the stream's from now on (see EventStreamHandler).
            let handler = EventStreamHandler(stream: stream, subscriber: subscriber, head: head)
            do {
                try context.pipeline.syncOperations.addHandler(handler, position: .after(self))
            } catch {
                stream.unsubscribe(subscriber)
                context.close(promise: nil)
            }
            return
        }
        if let body, let application = loop?.value.application {
            let request = RoutedRequest(
                method: head.method.rawValue, path: path, query: query, headers: head.headers, body: body,
                remoteAddress: ClientAddress.resolve(peer: context.channel.remoteAddress, headers: head.headers, trusted: configuration.trustedProxies))
            let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
            application.route(request, on: context.eventLoop).whenComplete { result in
                let (handler, context) = loopBound.value
                switch result {
                case .success(let response):
                    var headers = response.headers
                    let contentType = headers.first { $0.name.lowercased() == "content-type" }?.value ?? "text/plain; charset=utf-8"
                    headers.removeAll { ["content-type", "content-length", "connection", "transfer-encoding"].contains($0.name.lowercased()) }
                    handler.send(HTTPResponseStatus(statusCode: response.status), body: response.body, contentType: contentType,
                                 extra: headers.map { ($0.name, $0.value) }, head: head, context: context)
                case .failure:
                    handler.send(.internalServerError, "Internal server error\n", head: head, context: context)
                }
            }
            return
        }
        guard head.method == .GET || head.method == .HEAD else {
            send(.methodNotAllowed, "Method not allowed\n", extra: [("Allow", "GET, HEAD")], head: head, context: context)
            return
        }
        guard let files, let file = files.resolve(path) else {
            send(.notFound, "Not found\n", head: head, context: context)
            return
        }
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        files.read(file, on: context.eventLoop).whenComplete { result in
            let (handler, context) = loopBound.value
            switch result {
            case .success(let body):
                handler.send(.ok, body: body, contentType: StaticFiles.contentType(of: file), head: head, context: context)
            case .failure:
                handler.send(.notFound, "Not found\n", head: head, context: context)
            }
        }
    }

    private func send(_ status: HTTPResponseStatus, _ text: String, extra: [(String, String)] = [], head: HTTPRequestHead, context: ChannelHandlerContext, close: Bool = false) {
        var body = context.channel.allocator.buffer(capacity: text.utf8.count)
        body.writeString(text)
        send(status, body: body, contentType: "text/plain; charset=utf-8", extra: extra, head: head, context: context, close: close)
    }

    /// `close`: end the connection after this answer (the rest of a too-large body is not read).
    private func send(_ status: HTTPResponseStatus, body: ByteBuffer, contentType: String, extra: [(String, String)] = [], head: HTTPRequestHead, context: ChannelHandlerContext, close: Bool = false) {
        var headers = HTTPHeaders([("Content-Type", contentType), ("Content-Length", String(body.readableBytes))])
        headers.add(contentsOf: extra)
        headers.add(name: "X-Content-Type-Options", value: "nosniff")
        let keepAlive = head.isKeepAlive && !close
        if !keepAlive && !headers.contains(name: "Connection") { headers.add(name: "Connection", value: "close") }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))), promise: nil)
        if head.method != .HEAD { context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil) }
        let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
        if !keepAlive {
            let loopContext = context.loopBound
            done.whenComplete { _ in loopContext.value.close(promise: nil) }
        } else {
            armTimeout(context: context)
        }
    }
}

/// The public folder: maps request paths to files inside it and reads them off the event loop.
final class StaticFiles: Sendable {
    let root: String
    private let threadPool: NIOThreadPool
    static let maxFileSize = 32 << 20

    init(root: String, threadPool: NIOThreadPool) {
        self.root = URL(fileURLWithPath: root).standardizedFileURL.resolvingSymlinksInPath().path
        self.threadPool = threadPool
    }

    /// The file for a request path, or nil if it is not a regular file inside the folder.
    /// `..` segments are refused outright; symbolic links must resolve inside the folder too.
    func resolve(_ requestPath: String) -> String? {
        guard let decoded = requestPath.removingPercentEncoding, !decoded.contains("\0"), !decoded.contains("\\") else { return nil }
        var segments: [Substring] = []
        for segment in decoded.split(separator: "/", omittingEmptySubsequences: true) {
            if segment == ".." { return nil }
            if segment == "." { continue }
            segments.append(segment)
        }
        var relative = segments.joined(separator: "/")
        if relative.isEmpty || decoded.hasSuffix("/") { relative += relative.isEmpty ? "index.html" : "/index.html" }
        let candidate = URL(fileURLWithPath: root).appendingPathComponent(relative).resolvingSymlinksInPath().path
        guard candidate.hasPrefix(root + "/") else { return nil }
        var isDirectory: ObjCBool = false
        guard FileManager.default.fileExists(atPath: candidate, isDirectory: &isDirectory), !isDirectory.boolValue else { return nil }
        return candidate
    }

    func read(_ path: String, on eventLoop: EventLoop) -> EventLoopFuture<ByteBuffer> {
        threadPool.runIfActive(eventLoop: eventLoop) {
            let attributes = try FileManager.default.attributesOfItem(atPath: path)
            if let size = attributes[.size] as? Int, size > Self.maxFileSize { throw CocoaError(.fileReadTooLarge) }
            guard let data = FileManager.default.contents(atPath: path) else { throw CocoaError(.fileReadNoSuchFile) }
            return ByteBuffer(bytes: data)
        }
    }

    static func contentType(of path: String) -> String {
        switch (path as NSString).pathExtension.lowercased() {
        case "html", "htm": return "text/html; charset=utf-8"
        case "js", "mjs": return "text/javascript; charset=utf-8"
        case "css": return "text/css; charset=utf-8"
        case "json", "map": return "application/json"
        case "txt": return "text/plain; charset=utf-8"
        case "svg": return "image/svg+xml"
        case "png": return "image/png"
        case "jpg", "jpeg": return "image/jpeg"
        case "gif": return "image/gif"
        case "ico": return "image/x-icon"
        case "webp": return "image/webp"
        case "wasm": return "application/wasm"
        default: return "application/octet-stream"
        }
    }
}
