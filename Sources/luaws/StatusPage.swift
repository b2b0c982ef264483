import Foundation
import ScriptHost
import WSEngine

/// `/luaws/status`: what is loaded, how the last reload went, and per-loop figures, as JSON.
enum StatusPage {
    private struct Body: Encodable {
        struct Reload: Encodable {
            var ok: Bool
            var at: String?
            var error: String?
        }
        var version: Int
        var plugins: [String]
        var routes: [String]
        struct Redis: Encodable {
            var link: String
            var messages_lost: Int
            var messages_unsent: Int
        }
        /// With --cluster: the link to Redis and what an outage cost.
        var redis: Redis?
        var last_reload: Reload
        var connections: Int
        var script_errors: Int
        var lua_memory_bytes: Int
        var event_loops: Int
    }

    /// `scripts` (the scripts folder) is taken out of paths: the page shows where things are
    /// relative to it, and only the first line of an error (a full message may carry data).
    static func json(_ cluster: ScriptCluster, scripts: String, bus: RedisBus?) async -> HTTPRouteResponse {
        let status = cluster.status
        let loops = await cluster.loopFigures()
        let body = Body(
            version: status.version,
            plugins: status.plugins,
            routes: await cluster.routes(),
            redis: bus.map { Body.Redis(link: $0.linkState, messages_lost: $0.lostMessages, messages_unsent: $0.unsentMessages) },
            last_reload: .init(ok: status.lastReloadOK, at: status.lastReloadAt.map { ISO8601DateFormatter().string(from: $0) }, error: status.lastError.map { shortError($0, scripts: scripts) }),
            connections: loops.reduce(0) { $0 + $1.connections },
            script_errors: loops.reduce(0) { $0 + $1.scriptErrors },
            lua_memory_bytes: loops.reduce(0) { $0 + $1.luaMemory },
            event_loops: loops.count
        )
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        let text = (try? encoder.encode(body)).map { String(decoding: $0, as: UTF8.self) } ?? "{}"
        return HTTPRouteResponse(contentType: "application/json", body: text + "\n")
    }

    /// The first line of `error`, with the scripts folder's path taken out.
    static func shortError(_ error: String, scripts: String) -> String {
        let firstLine = error.split(separator: "\n", maxSplits: 1).first.map(String.init) ?? error
        let folder = URL(fileURLWithPath: scripts).standardizedFileURL.path
        var prefixes = [folder + "/", scripts.hasSuffix("/") ? scripts : scripts + "/"]
        if scripts.hasSuffix(".lua") { prefixes = [(folder as NSString).deletingLastPathComponent + "/", (scripts as NSString).deletingLastPathComponent + "/"] }
        return prefixes.filter { $0 != "/" }.reduce(firstLine) { $0.replacingOccurrences(of: $1, with: "") }
    }
}
