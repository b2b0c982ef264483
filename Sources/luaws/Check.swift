import ArgumentParser
import Foundation
import Logging
import ScriptHost

/// `luaws check [SCRIPTS]`: loads every plugin as the server would and reports what is wrong.
struct Check: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Compile and validate plugins; exit 1 with file:line errors if any is broken.")

    @Argument(help: "A scripts folder or one .lua file.")
    var scripts = "./scripts"

    @Option(name: .customLong("var"), help: "NAME=VALUE, as for serve (repeatable).")
    var vars: [String] = []

    func run() async throws {
        var logger = Logger(label: "luaws.check")
        logger.logLevel = .critical
        let scriptVars = parseVars(vars)
        do {
            let set = try PluginSet.read(from: scripts)
            // Each file alone first, so that every broken file is reported, not just the first.
            var failures: [String] = []
            for plugin in set.plugins {
                let single = PluginSet(plugins: [plugin], libraryDirectory: set.libraryDirectory)
                do {
                    _ = try PluginHost(plugins: single, vars: scriptVars, logger: logger)
                } catch let error as PluginLoadError {
                    failures.append(error.message)
                }
            }
            if failures.isEmpty {
                _ = try PluginHost(plugins: set, vars: scriptVars, logger: logger)
                print("ok: \(set.plugins.count) plugin(s): \(set.plugins.map(\.name).joined(separator: ", "))")
                return
            }
            failures.forEach { FileHandle.standardError.write(Data("\($0)\n".utf8)) }
            throw ExitCode(1)
        } catch let error as PluginLoadError {
            FileHandle.standardError.write(Data("\(error.message)\n".utf8))
            throw ExitCode(1)
        }
    }
}
