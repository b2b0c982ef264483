import CoreMetrics
import NIOConcurrencyHelpers
import Prometheus
import ScriptHost
import WSEngine

/// What one scrape gathered: the engine's figures, each Lua state's, and the reload counts.
public struct MetricsSnapshot: Sendable {
    public var engine: EngineFigures
    public var scripts: [ScriptFigures]
    /// Script reloads by result (`success`, `failure`).
    public var reloads: [String: Int]
    /// Certificate reloads by result (`success`, `failure`).
    public var certificateReloads: [String: Int]

    public init(engine: EngineFigures = .init(), scripts: [ScriptFigures] = [], reloads: [String: Int] = [:], certificateReloads: [String: Int] = [:]) {
        self.engine = engine
        self.scripts = scripts
        self.reloads = reloads
        self.certificateReloads = certificateReloads
    }
}

/// `/metrics`: a Prometheus registry into which the plain per-loop counters are folded at scrape
/// time (see `CounterFolder`). Nothing here runs per message: the cost of a message is the few
/// additions the engine and the Lua states make on their own fields.
public final class MetricsExporter: Sendable {
    public let registry: PrometheusCollectorRegistry
    private let folder = NIOLockedValueBox(CounterFolder())

    public init(registry: PrometheusCollectorRegistry = PrometheusCollectorRegistry()) {
        self.registry = registry
    }

    /// Makes swift-metrics report into this registry too, for whatever library uses it. Once
    /// per process (swift-metrics allows one bootstrap).
    public func bootstrapMetricsSystem() {
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
    }

    /// Folds `snapshot` in and returns the whole registry in the Prometheus text format.
    public func render(_ snapshot: MetricsSnapshot) -> String {
        folder.withLockedValue { folder in fold(snapshot, into: &folder) }
        return registry.emitToString()
    }

    private static func name(_ metric: String, _ unit: String, _ help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(namespace: "luaws", metricName: metric, unitName: unit, helpText: help)
    }

    private static var connections: MetricNameDescriptor { name("connections", "", "Open WebSocket connections.") }
    private static var opened: MetricNameDescriptor { name("connections_opened", "total", "WebSocket connections opened.") }
    private static var closed: MetricNameDescriptor { name("connections_closed", "total", "WebSocket connections closed, by close code (client codes 3000-4999 as one).") }
    private static var received: MetricNameDescriptor { name("messages_received", "total", "WebSocket messages received.") }
    private static var sent: MetricNameDescriptor { name("messages_sent", "total", "WebSocket messages sent.") }
    private static var bytesReceived: MetricNameDescriptor { name("bytes_received", "total", "WebSocket bytes received (frames, before TLS).") }
    private static var bytesSent: MetricNameDescriptor { name("bytes_sent", "total", "WebSocket bytes sent (frames, before TLS).") }
    private static var refused: MetricNameDescriptor { name("handshakes_refused", "total", "WebSocket handshakes refused, by reason.") }
    private static var dropped: MetricNameDescriptor { name("messages_dropped", "total", "Messages not sent to slow consumers.") }
    private static var memory: MetricNameDescriptor { name("lua_memory", "bytes", "Bytes held by the Lua states.") }
    private static var errors: MetricNameDescriptor { name("script_errors", "total", "Script errors, by plugin.") }
    private static var reloads: MetricNameDescriptor { name("reloads", "total", "Script reloads, by result.") }
    private static var certificateReloads: MetricNameDescriptor { name("certificate_reloads", "total", "TLS certificate reloads, by result.") }
    private static var hookDuration: MetricNameDescriptor { name("hook_duration", "seconds", "Duration of Lua hook calls (waits included), by plugin and hook.") }

    private func count(_ descriptor: MetricNameDescriptor, _ labels: [(String, String)], total: Int, _ folder: inout CounterFolder) {
        let counter = registry.makeCounter(descriptor: descriptor, labels: labels)
        let delta = folder.delta(Self.key(descriptor, labels), total: total)
        if delta > 0 { counter.increment(by: Int64(delta)) }
    }

    private static func key(_ descriptor: MetricNameDescriptor, _ labels: [(String, String)]) -> String {
        descriptor.name + labels.map { "\u{0}\($0.0)=\($0.1)" }.joined()
    }

    private func fold(_ snapshot: MetricsSnapshot, into folder: inout CounterFolder) {
        let engine = snapshot.engine
        for (path, figures) in engine.paths {
            registry.makeGauge(descriptor: Self.connections, labels: [("path", path)]).set(Double(figures.connections))
            count(Self.opened, [("path", path)], total: figures.opened, &folder)
            count(Self.received, [("path", path), ("kind", "text")], total: figures.textReceived, &folder)
            count(Self.received, [("path", path), ("kind", "binary")], total: figures.binaryReceived, &folder)
            count(Self.sent, [("path", path), ("kind", "text")], total: figures.textSent, &folder)
            count(Self.sent, [("path", path), ("kind", "binary")], total: figures.binarySent, &folder)
            count(Self.bytesReceived, [("path", path)], total: figures.bytesReceived, &folder)
            count(Self.bytesSent, [("path", path)], total: figures.bytesSent, &folder)
        }
        for (code, total) in engine.closed { count(Self.closed, [("code", code)], total: total, &folder) }
        for (reason, total) in engine.refused { count(Self.refused, [("reason", reason)], total: total, &folder) }
        count(Self.dropped, [], total: engine.dropped, &folder)

        var scripts = ScriptFigures()
        for figures in snapshot.scripts { scripts.add(figures) }
        registry.makeGauge(descriptor: Self.memory).set(Double(scripts.luaMemory))
        for (plugin, total) in scripts.errors { count(Self.errors, [("plugin", plugin)], total: total, &folder) }
        for result in ["success", "failure"] {
            count(Self.reloads, [("result", result)], total: snapshot.reloads[result] ?? 0, &folder)
        }
        for (result, total) in snapshot.certificateReloads {
            count(Self.certificateReloads, [("result", result)], total: total, &folder)
        }
        for (key, histogram) in scripts.hooks {
            let labels = [("plugin", key.plugin), ("hook", key.hook)]
            let metric = registry.makeValueHistogram(descriptor: Self.hookDuration, labels: labels, buckets: HookHistogram.bounds)
            let prefix = Self.key(Self.hookDuration, labels)
            for bucket in histogram.counts.indices {
                guard let new = folder.delta(prefix + "\u{0}\(bucket)", count: histogram.counts[bucket], sum: histogram.sums[bucket]) else { continue }
                // The registry's histogram takes one observation at a time: the bucket's new
                // observations are replayed at their mean, which lies in the same bucket (each
                // of them does), so bucket counts, count and sum all come out exact.
                let mean = new.sum / Double(new.count)
                for _ in 0..<new.count { metric.record(mean) }
            }
        }
    }
}
