import ScriptHost
import WSEngine
import XCTest

@testable import LuaWSMetrics

final class MetricsExporterTests: XCTestCase {
    /// The value of the sample `name{labels}` in Prometheus text, or nil.
    private func sample(_ text: String, _ series: String) -> Double? {
        for line in text.split(separator: "\n") where line.hasPrefix(series + " ") {
            return Double(line.dropFirst(series.count + 1))
        }
        return nil
    }

    func testCloseCodesChosenByClientsShareOneLabel() {
        XCTAssertEqual(EngineFigures.closeCodeLabel(1000), "1000")
        XCTAssertEqual(EngineFigures.closeCodeLabel(1006), "1006")
        XCTAssertEqual(EngineFigures.closeCodeLabel(2999), "2999")
        XCTAssertEqual(EngineFigures.closeCodeLabel(3000), "3000-4999")
        XCTAssertEqual(EngineFigures.closeCodeLabel(4321), "3000-4999")
        XCTAssertEqual(EngineFigures.closeCodeLabel(4999), "3000-4999")
        XCTAssertEqual(EngineFigures.closeCodeLabel(5000), "5000")
    }

    func testFolderHandsOutGrowthOnlyOnce() {
        var folder = CounterFolder()
        XCTAssertEqual(folder.delta("a", total: 5), 5)
        XCTAssertEqual(folder.delta("a", total: 5), 0)
        XCTAssertEqual(folder.delta("a", total: 8), 3)
        // An older snapshot folded after a newer one adds nothing, and does not rewind.
        XCTAssertEqual(folder.delta("a", total: 6), 0)
        XCTAssertEqual(folder.delta("a", total: 9), 1)
        XCTAssertEqual(folder.delta("b", total: 0), 0)
        XCTAssertNil(folder.delta("h", count: 0, sum: 0))
        let first = folder.delta("h", count: 2, sum: 0.5)
        XCTAssertEqual(first?.count, 2)
        XCTAssertEqual(first?.sum, 0.5)
        let second = folder.delta("h", count: 3, sum: 0.75)
        XCTAssertEqual(second?.count, 1)
        XCTAssertEqual(second?.sum, 0.25)
    }

    func testEngineFiguresAddUp() {
        var a = EngineFigures()
        a.paths["/ws", default: .init()].textReceived = 2
        a.closed["1000"] = 1
        var b = EngineFigures()
        b.paths["/ws", default: .init()].textReceived = 3
        b.paths["/other", default: .init()].opened = 1
        b.closed["1000"] = 2
        b.dropped = 4
        a.add(b)
        XCTAssertEqual(a.paths["/ws"]?.textReceived, 5)
        XCTAssertEqual(a.paths["/other"]?.opened, 1)
        XCTAssertEqual(a.closed["1000"], 3)
        XCTAssertEqual(a.dropped, 4)
    }

    func testScrapesShowTotalsNotDoubleCounts() {
        let exporter = MetricsExporter()
        var snapshot = MetricsSnapshot()
        var path = EngineFigures.PathFigures()
        path.connections = 2
        path.opened = 3
        path.textReceived = 10
        path.bytesSent = 100
        snapshot.engine.paths["/ws"] = path
        snapshot.engine.closed["3000-4999"] = 1
        snapshot.engine.refused["origin"] = 2
        snapshot.reloads = ["success": 1]
        var lua = ScriptFigures()
        lua.luaMemory = 1000
        lua.errors["echo"] = 1
        var histogram = HookHistogram()
        histogram.counts[0] = 2  // two calls under 50 µs
        histogram.sums[0] = 0.00006
        histogram.counts[HookHistogram.bounds.count] = 1  // one over the last bound
        histogram.sums[HookHistogram.bounds.count] = 40
        lua.hooks[HookKey(plugin: "echo", hook: "on_message")] = histogram
        snapshot.scripts = [lua, lua]

        var text = exporter.render(snapshot)
        XCTAssertEqual(sample(text, #"luaws_connections{path="/ws"}"#), 2)
        XCTAssertEqual(sample(text, #"luaws_connections_opened_total{path="/ws"}"#), 3)
        XCTAssertEqual(sample(text, #"luaws_messages_received_total{path="/ws",kind="text"}"#), 10)
        XCTAssertEqual(sample(text, #"luaws_bytes_sent_total{path="/ws"}"#), 100)
        XCTAssertEqual(sample(text, #"luaws_connections_closed_total{code="3000-4999"}"#), 1)
        XCTAssertEqual(sample(text, #"luaws_handshakes_refused_total{reason="origin"}"#), 2)
        XCTAssertEqual(sample(text, #"luaws_reloads_total{result="success"}"#), 1)
        XCTAssertEqual(sample(text, #"luaws_reloads_total{result="failure"}"#), 0)
        XCTAssertEqual(sample(text, "luaws_lua_memory_bytes"), 2000)
        XCTAssertEqual(sample(text, #"luaws_script_errors_total{plugin="echo"}"#), 2)
        XCTAssertEqual(sample(text, #"luaws_hook_duration_seconds_count{plugin="echo",hook="on_message"}"#), 6)
        XCTAssertEqual(sample(text, #"luaws_hook_duration_seconds_bucket{plugin="echo",hook="on_message",le="5e-05"}"#), 4)
        XCTAssertEqual(sample(text, #"luaws_hook_duration_seconds_bucket{plugin="echo",hook="on_message",le="30.0"}"#), 4)
        XCTAssertEqual(sample(text, #"luaws_hook_duration_seconds_sum{plugin="echo",hook="on_message"}"#)!, 80.00012, accuracy: 1e-9)

        // The same totals again: nothing changes. Grown totals: only the growth is added.
        text = exporter.render(snapshot)
        XCTAssertEqual(sample(text, #"luaws_messages_received_total{path="/ws",kind="text"}"#), 10)
        XCTAssertEqual(sample(text, #"luaws_hook_duration_seconds_count{plugin="echo",hook="on_message"}"#), 6)
        snapshot.engine.paths["/ws"]!.textReceived = 15
        snapshot.engine.paths["/ws"]!.connections = 0
        text = exporter.render(snapshot)
        XCTAssertEqual(sample(text, #"luaws_messages_received_total{path="/ws",kind="text"}"#), 15)
        XCTAssertEqual(sample(text, #"luaws_connections{path="/ws"}"#), 0)
    }
}
