import ArgumentParser
import Foundation
import LuaWSTest

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

    func run() throws {
        var runner = PluginTestRunner(scripts: scripts)
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
