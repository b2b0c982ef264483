import AsyncHTTPClient
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import RedisClient
import ScriptHost

/// What hooks can wait for, for real: HTTP through AsyncHTTPClient (pooled connections, http
/// and https), Redis through RedisClient (hiredis over SwiftNIO), one connection per event loop
/// so a reply resumes its hook without a thread hop.
final class LiveServices: ScriptServices {
    struct Settings {
        /// `--http-timeout`: the whole request, when the script gives none.
        var httpTimeout = TimeAmount.seconds(10 as Int64)
        /// `--http-max-response`: a longer body fails the request.
        var maxResponseBytes = 8 << 20
        /// `--redis`; nil: `luaws.redis` answers nil, "redis not configured".
        var redis: RedisURL?
    }

    private let settings: Settings
    private let logger: Logger
    /// Made on first use (an AsyncHTTPClient must be shut down before it goes, so one that was
    /// never needed is never made). Redirects are off unless a request asks (`redirects =
    /// true`): then up to 5, no cycles.
    private let clients = NIOLockedValueBox<(plain: HTTPClient, following: HTTPClient)?>(nil)
    private let redisConnections = NIOLockedValueBox<[ObjectIdentifier: RedisConnection]>([:])

    init(settings: Settings, logger: Logger) {
        self.settings = settings
        self.logger = logger
    }

    private func client(following: Bool) -> HTTPClient {
        clients.withLockedValue { clients in
            if let clients { return following ? clients.following : clients.plain }
            var plain = HTTPClient.Configuration(redirectConfiguration: .disallow)
            // AsyncHTTPClient retries a refused connection until the connect timeout: keep it
            // short, so that a backend that is down fails the hook in seconds, not at its timeout.
            plain.timeout = .init(connect: TimeAmount.seconds(2 as Int64))
            // Hooks of many connections may call one backend at once: AsyncHTTPClient's default
            // of 8 connections per host would queue the rest, and the queue's wait is bounded by
            // the connect timeout, not the script's.
            plain.connectionPool = .init(idleTimeout: .seconds(60), concurrentHTTP1ConnectionsPerHostSoftLimit: 256)
            var followingConfiguration = plain
            followingConfiguration.redirectConfiguration = .follow(max: 5, allowCycles: false)
            let made = (
                plain: HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup, configuration: plain),
                following: HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup, configuration: followingConfiguration))
            clients = made
            return following ? made.following : made.plain
        }
    }

    func http(_ request: ScriptHTTPRequest, on eventLoop: EventLoop) -> EventLoopFuture<ScriptHTTPResponse> {
        let clientRequest: HTTPClient.Request
        do {
            clientRequest = try HTTPClient.Request(
                url: request.url, method: HTTPMethod(rawValue: request.method),
                headers: HTTPHeaders(request.headers.map { ($0.name, $0.value) }),
                body: request.body.isEmpty ? nil : .bytes(request.body))
        } catch {
            return eventLoop.makeFailedFuture(ServiceError("bad request: \(error)"))
        }
        let timeout = request.timeout.flatMap { TimeAmount(seconds: $0) } ?? settings.httpTimeout
        let limit = settings.maxResponseBytes
        let delegate = ResponseAccumulator(request: clientRequest, maxBodySize: limit)
        let task = client(following: request.followRedirects).execute(
            request: clientRequest, delegate: delegate, eventLoop: .indifferent, deadline: .now() + timeout)
        // The client's own event loops do the I/O (AsyncHTTPClient wants a loop of its group);
        // the answer hops to the hook's loop.
        return task.futureResult.hop(to: eventLoop)
            .map { response in
                ScriptHTTPResponse(
                    status: Int(response.status.code),
                    headers: response.headers.map { ($0.name.lowercased(), $0.value) },
                    body: response.body.map { Array($0.readableBytesView) } ?? [])
            }
            .flatMapErrorThrowing { error in throw ServiceError(Self.describe(error, limit: limit)) }
    }

    /// Short, stable messages for scripts: what went wrong, not a type dump.
    private static func describe(_ error: Error, limit: Int) -> String {
        if error is ResponseAccumulator.ResponseTooBigError { return "response body larger than \(limit) bytes" }
        if let error = error as? HTTPClientError {
            if [.deadlineExceeded, .readTimeout, .writeTimeout].contains(error) { return "timeout" }
            if error == .connectTimeout { return "connect timeout" }
            if error == .getConnectionFromPoolTimeout { return "timeout waiting for a connection to the host" }
            if error == .remoteConnectionClosed { return "connection closed by the server" }
            if error == .redirectLimitReached || error == .redirectCycleDetected { return "too many redirects" }
            return "\(error)"
        }
        let text = "\(error)"
        if text.contains("refused") || text.contains("ECONNREFUSED") { return "connection refused" }
        return text
    }

    func redis(_ arguments: [[UInt8]], on eventLoop: EventLoop) -> EventLoopFuture<ScriptRedisReply>? {
        guard let url = settings.redis else { return nil }
        let key = ObjectIdentifier(eventLoop)
        let logger = self.logger
        let connection = redisConnections.withLockedValue { connections in
            if let existing = connections[key] { return existing }
            let made = RedisConnection(url: url, eventLoop: eventLoop, logger: logger)
            connections[key] = made
            return made
        }
        return connection.send(arguments)
            .map(Self.reply)
            .flatMapErrorThrowing { error in throw ServiceError("\(error)") }
    }

    private static func reply(_ reply: RedisReply) -> ScriptRedisReply {
        switch reply {
        case .string(let bytes): .string(bytes)
        case .status(let text): .status(text)
        case .integer(let n): .integer(n)
        case .array(let elements): .array(elements.map(Self.reply))
        case .null: .null
        case .error(let text): .error(text)
        }
    }

    /// Opens the Redis link of each loop now (so the first hook does not pay for it, and an
    /// outage at start is logged at start).
    func connectRedis(on loops: [EventLoop]) {
        for loop in loops { _ = redis([Array("PING".utf8)], on: loop) }
    }

    func shutdown() async {
        if let made = clients.withLockedValue({ $0 }) {
            try? await made.plain.shutdown()
            try? await made.following.shutdown()
        }
        let connections = redisConnections.withLockedValue { $0.values }
        for connection in connections { try? await connection.close().get() }
    }
}

/// An I/O failure a hook sees as `nil, message`.
struct ServiceError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}
