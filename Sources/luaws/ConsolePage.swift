import WSEngine

/// The dev console (`/luaws/console`): its page, compiled into the binary from
/// `Console/console.html` (a SwiftPM `embedInCode` resource, so nothing has to be found beside
/// the binary), and `/luaws/console/info`, where the public listener is, which the page needs
/// when the admin listener served it. Its live events are `/luaws/events` (`EventFeed`).
enum ConsolePage {
    static let path = "/luaws/console"
    static let infoPath = "/luaws/console/info"
    static let eventsPath = "/luaws/events"

    static let html = String(decoding: PackageResources.console_html, as: UTF8.self)

    /// Where the public listener is: `scheme` (`ws`, or `wss` with --tls-cert), `host` (null for
    /// a wildcard address: the page then uses the host that reached it), `port` (the one bound,
    /// 0 until it is) and the WebSocket `paths`.
    static func info(host: String, port: Int, tls: Bool, paths: [String]) -> HTTPRouteResponse {
        let wildcard = ["", "0.0.0.0", "::", "[::]", "*"].contains(host)
        var out = "{\"scheme\":\"\(tls ? "wss" : "ws")\",\"host\":"
        if wildcard { out += "null" } else { LineLogHandler.appendJSON(string: host, to: &out) }
        out += ",\"port\":\(port),\"version\":"
        LineLogHandler.appendJSON(string: luawsVersion, to: &out)
        out += ",\"paths\":["
        for (index, path) in paths.enumerated() {
            if index > 0 { out += "," }
            LineLogHandler.appendJSON(string: path, to: &out)
        }
        out += "]}\n"
        return HTTPRouteResponse(contentType: "application/json", body: out)
    }
}
