import Foundation
import Logging
@testable import ScriptHost
import XCTest

/// types/luaws.lua (the LuaLS definitions users' editors read) must declare exactly what the
/// runtime offers: every `luaws` function and field, `luaws.json`, `luaws.shared`, conn
/// methods and fields, and plugin fields.
final class TypesDriftTests: XCTestCase {
    func testDeclarationsMatchTheRuntime() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let types = try String(contentsOf: root.appendingPathComponent("types/luaws.lua"), encoding: .utf8)
        let host = try PluginHost(plugins: PluginSet(plugins: [], libraryDirectory: "/nonexistent"), logger: Logger(label: "test"))
        let runtime = Set(try host.apiDescription().split(separator: "\n").map(String.init))
        XCTAssertFalse(runtime.isEmpty)
        XCTAssertEqual(Self.declared(types), runtime)
    }

    /// "group name" pairs from the definitions: `function luaws.x`, `function Conn:x`,
    /// `function JSON.x`, `function Shared:x`, and `---@field x` inside the matching class.
    static func declared(_ text: String) -> Set<String> {
        let classes = ["luaws": "luaws", "luaws.Conn": "conn", "luaws.JSON": "json", "luaws.Shared": "shared", "luaws.Plugin": "plugin", "luaws.Request": "request", "luaws.HTTP": "http"]
        let functions = ["luaws": "luaws", "Conn": "conn", "JSON": "json", "Shared": "shared", "HTTP": "http"]
        var result = Set<String>()
        var group: String?
        for line in text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init) {
            if line.hasPrefix("---@class ") {
                let name = String(line.dropFirst("---@class ".count).split(separator: " ").first ?? "")
                group = classes[name]
            } else if line.hasPrefix("---@field "), let group {
                let name = line.dropFirst("---@field ".count).split(separator: " ").first.map { String($0).replacingOccurrences(of: "?", with: "") } ?? ""
                result.insert("\(group) \(name)")
            } else if line.hasPrefix("function ") {
                let signature = line.dropFirst("function ".count).prefix { $0 != "(" }
                if let separator = signature.firstIndex(where: { $0 == "." || $0 == ":" }),
                   let owner = functions[String(signature[..<separator])] {
                    result.insert("\(owner) \(signature[signature.index(after: separator)...])")
                }
            } else if !line.hasPrefix("---") {
                group = nil
            }
        }
        return result
    }
}
