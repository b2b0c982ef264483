import NIOCore
import ScriptHost
import WSEngine

/// Wires one event loop's engine events to that loop's Lua plugins.
public final class LuaApplication: WebSocketApplication {
    public let plugins: PluginHost

    public init(plugins: PluginHost) {
        self.plugins = plugins
    }

    public func opened(_ connection: WebSocketConnection, request: WebSocketRequest) {
        plugins.open(
            connection,
            id: connection.id,
            request: ScriptRequest(
                path: request.path, query: request.query, headers: request.headers.map { ($0.name, $0.value) },
                subprotocol: request.subprotocol, remoteAddress: request.remoteAddress, upgradeToken: request.context)
        )
    }

    /// on_upgrade decides (and may wait); its `req.data` comes back as `conn.data`.
    public func shouldUpgrade(_ request: WebSocketRequest, on eventLoop: EventLoop) -> EventLoopFuture<UpgradeDecision> {
        let promise = eventLoop.makePromise(of: UpgradeDecision.self)
        let asked = ScriptRequest(
            path: request.path, query: request.query, headers: request.headers.map { ($0.name, $0.value) },
            subprotocol: request.subprotocol, remoteAddress: request.remoteAddress)
        plugins.upgrade(asked) { decision in
            switch decision {
            case .accept(let token): promise.succeed(.accept(context: token))
            case .refuse(let status, let reason): promise.succeed(.refuse(status: status, reason: reason))
            }
        }
        return promise.futureResult
    }

    /// Waiting hooks end now (their calls return nil, "server stopping"), so that the
    /// connections' on_close run before the loop stops.
    public func stopping() {
        plugins.stop()
    }

    public func hasRoute(method: String, path: String) -> Bool {
        plugins.hasRoute(method: method, path: path)
    }

    /// A plugin route; one that fails answers 500 with nothing of the error in it.
    public func route(_ request: RoutedRequest, on eventLoop: EventLoop) -> EventLoopFuture<RoutedResponse> {
        let promise = eventLoop.makePromise(of: RoutedResponse.self)
        var asked = ScriptRequest(
            path: request.path, query: request.query, headers: request.headers.map { ($0.name, $0.value) },
            remoteAddress: request.remoteAddress)
        asked.method = request.method
        asked.body = Array(request.body.readableBytesView)
        plugins.route(asked) { response in
            guard let response else {
                promise.succeed(RoutedResponse(status: 500, headers: [], body: ByteBuffer(string: "Internal server error\n")))
                return
            }
            promise.succeed(RoutedResponse(status: response.status, headers: response.headers, body: ByteBuffer(bytes: response.body)))
        }
        return promise.futureResult
    }

    public func received(_ message: WebSocketMessage, on connection: WebSocketConnection) {
        plugins.message(id: connection.id, data: message.data, binary: message.kind == .binary)
    }

    public func idle(_ connection: WebSocketConnection, timer: Int) {
        plugins.idle(id: connection.id, timer: timer)
    }

    public func closed(_ connection: WebSocketConnection, code: UInt16, reason: String) {
        plugins.closed(id: connection.id, code: code, reason: reason)
    }

    /// The first protocol in the client's order of preference that some plugin declares.
    public func subprotocol(offered: [String], path: String) -> String? {
        let supported = plugins.subprotocols
        return offered.first { supported.contains($0) }
    }
}

/// The engine's connection is what ScriptHost holds for it (no wrapper object per connection).
extension WebSocketConnection: ScriptConnection {
    public func setIdleTimers(_ seconds: [Double]) {
        // The prelude allows 0.001 to 1e9 seconds; checked again, since a trap here would end the process.
        setIdleTimers(seconds.map { TimeAmount(seconds: min(max($0, 0.001), 1e9)) ?? .seconds(1) })
    }
}

/// The same echo as scripts/echo.lua, in Swift: `luaws --builtin-echo` (hidden) runs it instead of
/// the plugins, so that benchmarks can price the Lua call.
public final class BuiltinEcho: WebSocketApplication {
    private let prefix = ByteBuffer(string: "Message received: ")
    /// Reused for every reply, as PluginHost reuses one for `conn:send`: the engine copies a
    /// small message into its batch buffer and keeps no reference, so this allocates nothing.
    private var reply = ByteBuffer()

    public init() {}

    public func opened(_ connection: WebSocketConnection, request: WebSocketRequest) {}

    public func received(_ message: WebSocketMessage, on connection: WebSocketConnection) {
        guard message.kind == .text else { return }
        reply.clear()
        reply.writeImmutableBuffer(prefix)
        reply.writeImmutableBuffer(message.data)
        connection.send(reply)
        if reply.capacity > 64 * 1024 { reply = ByteBuffer() }
    }

    public func idle(_ connection: WebSocketConnection, timer: Int) {}
    public func closed(_ connection: WebSocketConnection, code: UInt16, reason: String) {}
}
