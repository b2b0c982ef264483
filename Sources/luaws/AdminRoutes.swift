import LuaWSMetrics
import NIOConcurrencyHelpers
import NIOCore
import ScriptHost
import WSEngine

/// What operators ask the server: `/luaws/status` (plugins, last reload, per-loop figures),
/// `/metrics` (Prometheus), `/healthz` (the process serves), `/readyz` (the plugins are
/// loaded and the listener is up), and the dev console (`/luaws/console`, its info and its live
/// events, `/luaws/events`). Served by the admin listener (`--admin`), and on the public one
/// only with `--admin-on-public`.
///
/// The routes are made before the server exists (they are part of its configuration): the
/// server is handed over with `serving(_:)` once it listens, and until then `/readyz` says 503,
/// `/metrics` has no engine figures and the console's info has port 0.
final class AdminRoutes: Sendable {
    static let statusPath = "/luaws/status"
    static let paths = [statusPath, "/metrics", "/healthz", "/readyz", ConsolePage.path, ConsolePage.infoPath, ConsolePage.eventsPath]

    /// The public listener, for the console's info.
    struct PublicListener: Sendable {
        var host: String
        var tls: Bool
        var webSocketPaths: [String]
    }

    private let cluster: ScriptCluster
    private let scripts: String
    private let exporter: MetricsExporter
    private let reloadCounts: @Sendable () -> [String: Int]
    private let certificateReloadCounts: @Sendable () -> [String: Int]
    /// With --cluster: the Redis link, for status and readiness.
    private let bus: RedisBus?
    private let requireRedis: Bool
    private let server = NIOLockedValueBox<WebSocketServer?>(nil)
    private let feed: EventFeed
    private let publicListener: PublicListener

    init(cluster: ScriptCluster, scripts: String, exporter: MetricsExporter, bus: RedisBus? = nil, requireRedis: Bool = false,
         feed: EventFeed, publicListener: PublicListener,
         reloadCounts: @escaping @Sendable () -> [String: Int],
         certificateReloadCounts: @escaping @Sendable () -> [String: Int]) {
        self.feed = feed
        self.publicListener = publicListener
        self.cluster = cluster
        self.bus = bus
        self.requireRedis = requireRedis
        self.scripts = scripts
        self.exporter = exporter
        self.reloadCounts = reloadCounts
        self.certificateReloadCounts = certificateReloadCounts
    }

    /// The server listens: ready.
    func serving(_ server: WebSocketServer) {
        self.server.withLockedValue { $0 = server }
    }

    var routes: [String: HTTPRoute] {
        [
            Self.statusPath: { [cluster, scripts, bus] eventLoop in
                eventLoop.makeFutureWithTask { await StatusPage.json(cluster, scripts: scripts, bus: bus) }
            },
            "/metrics": { [self] eventLoop in
                eventLoop.makeFutureWithTask { await self.metrics() }
            },
            "/healthz": { eventLoop in
                eventLoop.makeSucceededFuture(HTTPRouteResponse(contentType: "text/plain; charset=utf-8", body: "ok\n"))
            },
            "/readyz": { [server, bus, requireRedis] eventLoop in
                // Redis counts only with --redis-required: through an outage luaws serves locally.
                let ready = server.withLockedValue { $0 != nil } && (!requireRedis || bus?.isLinked != false)
                return eventLoop.makeSucceededFuture(HTTPRouteResponse(
                    status: ready ? 200 : 503, contentType: "text/plain; charset=utf-8", body: ready ? "ready\n" : "starting\n"))
            },
            ConsolePage.path: { eventLoop in
                eventLoop.makeSucceededFuture(HTTPRouteResponse(contentType: "text/html; charset=utf-8", body: ConsolePage.html))
            },
            ConsolePage.infoPath: { [server, publicListener] eventLoop in
                let port = server.withLockedValue { $0?.localAddress?.port } ?? 0
                return eventLoop.makeSucceededFuture(ConsolePage.info(
                    host: publicListener.host, port: port, tls: publicListener.tls, paths: publicListener.webSocketPaths))
            },
        ]
    }

    var eventStreams: [String: HTTPEventStream] {
        [ConsolePage.eventsPath: feed.stream]
    }

    private func metrics() async -> HTTPRouteResponse {
        var snapshot = MetricsSnapshot()
        if let server = server.withLockedValue({ $0 }) { snapshot.engine = await server.figures() }
        snapshot.scripts = await cluster.scriptFigures()
        snapshot.reloads = reloadCounts()
        snapshot.certificateReloads = certificateReloadCounts()
        return HTTPRouteResponse(contentType: "text/plain; version=0.0.4; charset=utf-8", body: exporter.render(snapshot))
    }
}
