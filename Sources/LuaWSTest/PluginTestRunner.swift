import Foundation
import ScriptHost
import WSEngine

/// `luaws test`: runs test files (`*_test.lua`) against the plugins of a scripts folder, through
/// the same plugin host and engine as the server, on a virtual clock and without sockets.
/// Reports like other test runners: a line per case (`ok - name`, `FAIL - name` with file:line,
/// expected and actual), then `N passed, N failed`.
public struct PluginTestRunner {
    /// The plugins under test: a folder or one .lua file (as `luaws --scripts`).
    public var scripts: String
    /// As `--ws-path`.
    public var webSocketPaths: [String] = ["/ws"]
    /// As `--var` (a test may add more with `test.set_var`).
    public var vars: [String: String] = [:]
    public var limits = ScriptLimits()
    /// Where the report goes, a line at a time.
    public var output: (String) -> Void = { print($0) }

    public init(scripts: String) {
        self.scripts = scripts
    }

    /// The test files under `paths` (files as given, folders searched for `*_test.lua`), or
    /// under `<scripts>/tests` when none are given.
    public func testFiles(_ paths: [String]) throws -> [String] {
        var roots = paths
        if roots.isEmpty {
            var isDirectory: ObjCBool = false
            _ = FileManager.default.fileExists(atPath: scripts, isDirectory: &isDirectory)
            let base = isDirectory.boolValue ? scripts : (scripts as NSString).deletingLastPathComponent
            roots = [((base.isEmpty ? "." : base) as NSString).appendingPathComponent("tests")]
        }
        var files: [String] = []
        for root in roots {
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: root, isDirectory: &isDirectory) else {
                throw TestServiceError(message: "\(root): no such file or folder")
            }
            if !isDirectory.boolValue {
                files.append(root)
                continue
            }
            let found = (FileManager.default.enumerator(atPath: root)?.allObjects as? [String] ?? [])
                .filter { $0.hasSuffix("_test.lua") && !($0 as NSString).lastPathComponent.hasPrefix(".") }
                .sorted()
                .map { (root as NSString).appendingPathComponent($0) }
                // `./scripts/tests/x_test.lua` reads better as `scripts/tests/x_test.lua`.
                .map { $0.hasPrefix("./") ? String($0.dropFirst(2)) : $0 }
            files += found
        }
        return files
    }

    /// Runs every case of `files`; returns how many passed and failed.
    public func run(files: [String]) -> (passed: Int, failed: Int) {
        var passed = 0, failed = 0
        var configuration = ServerConfiguration()
        configuration.webSocketPaths = Set(webSocketPaths)
        let library: String = {
            var isDirectory: ObjCBool = false
            _ = FileManager.default.fileExists(atPath: scripts, isDirectory: &isDirectory)
            let base = isDirectory.boolValue ? scripts : (scripts as NSString).deletingLastPathComponent
            return (base.isEmpty ? "." : base) + "/lib"
        }()

        for path in files {
            output("# \(path)")
            guard let data = FileManager.default.contents(atPath: path) else {
                output("FAIL - \(path): cannot read")
                failed += 1
                continue
            }
            let session = TestSession(file: path, scripts: scripts, vars: vars, configuration: configuration, limits: limits)
            let file: ScriptTestFile
            do {
                file = try ScriptTestFile(
                    chunkname: path, source: String(decoding: data, as: UTF8.self), libraryDirectory: library,
                    driver: session, clock: { [unowned session] in session.now })
            } catch let error as LuaError {
                output("FAIL - \(path) does not load")
                output(Self.indent(Self.clean(error.message)))
                failed += 1
                continue
            } catch {
                output("FAIL - \(path) does not load")
                output(Self.indent("\(error)"))
                failed += 1
                continue
            }
            if file.cases.isEmpty { output("# (no cases)") }
            for (index, name) in file.cases.enumerated() {
                session.beginCase()
                var failure = file.run(case: index)
                let late = session.endCase()
                if failure == nil { failure = late }
                if let failure {
                    failed += 1
                    output("FAIL - \(name)")
                    output(Self.indent(failure))
                    let lines = session.caseLog + session.printed.map { "print: \($0)" }
                    if !lines.isEmpty {
                        output("    log:")
                        for line in lines.suffix(20) { output("      \(line)") }
                    }
                } else {
                    passed += 1
                    output("ok - \(name)")
                }
            }
        }
        output("\(passed) passed, \(failed) failed")
        return (passed, failed)
    }

    private static func clean(_ message: String) -> String {
        if let range = message.range(of: "\nstack traceback:") { return String(message[..<range.lowerBound]) }
        return message
    }

    private static func indent(_ text: String) -> String {
        text.split(separator: "\n", omittingEmptySubsequences: false).map { "    " + $0 }.joined(separator: "\n")
    }
}
