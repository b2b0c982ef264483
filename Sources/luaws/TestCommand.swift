import ArgumentParser
import Foundation
import LuaWSTest
import ScriptHost

/// `luaws test [PATHS]`: runs plugin tests (`*_test.lua`) in-process, on a virtual clock.
/// Synchronous on purpose: the embedded event loop the tests run on belongs to one thread.
struct TestCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "test",
        abstract: "Run plugin tests (*_test.lua) against the plugins, in-process, on a virtual clock.",
        discussion: "PATHS are test files or folders searched for *_test.lua (default: <scripts>/tests). Exits 1 if any case fails.")

    @Argument(help: "Test files or folders (default: <scripts>/tests).")
    var paths: [String] = []

    @Option(help: "Plugins under test: a folder of *.lua files or one .lua file (as for serve).")
    var scripts = "./scripts"

    @Option(name: .customLong("ws-path"), help: "Path that upgrades to a WebSocket (repeatable), as for serve.")
    var webSocketPaths: [String] = ["/ws"]

    @Option(name: .customLong("var"), help: "NAME=VALUE for luaws.var, as for serve (repeatable).")
    var vars: [String] = []

    @Option(help: "Lua VM instructions one hook call may run before it is stopped (0 = no limit), as for serve.")
    var instructionBudget = ScriptLimits().instructionBudget

    @Option(help: "Memory cap of the plugins' Lua state, in MiB (0 = no limit), as for serve.")
    var luaMemoryMb = ScriptLimits().memoryLimit >> 20

    @Option(help: "Seconds (of virtual time) a hook may wait before it is cancelled, as for serve.")
    var hookTimeout = 30.0

    func validate() throws {
        for item in vars where !item.contains("=") {
            throw ValidationError("--var takes NAME=VALUE, got '\(item)'")
        }
        if instructionBudget < 0 || luaMemoryMb < 0 || luaMemoryMb > 1 << 30 || !(hookTimeout > 0 && hookTimeout <= 1e9) {
            throw ValidationError("--instruction-budget, --lua-memory-mb and --hook-timeout take the values serve takes")
        }
    }

    func run() throws {
        var runner = PluginTestRunner(scripts: scripts)
        runner.limits = ScriptLimits(instructionBudget: instructionBudget, memoryLimit: luaMemoryMb << 20)
        runner.limits.hookTimeout = hookTimeout
        runner.webSocketPaths = webSocketPaths
        runner.vars = parseVars(vars)
        runner.output = { line in FileHandle.standardOutput.write(Data((line + "\n").utf8)) }
        let files: [String]
        do {
            files = try runner.testFiles(paths)
        } catch {
            FileHandle.standardError.write(Data("luaws test: \(error)\n".utf8))
            throw ExitCode(2)
        }
        let outcome = runner.run(files: files)
        if outcome.failed > 0 { throw ExitCode(1) }
    }
}
