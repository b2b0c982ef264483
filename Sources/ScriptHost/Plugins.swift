import Foundation

/// One plugin file's source, read once and compiled by every Lua state.
public struct PluginSource: Sendable, Equatable {
    /// The file name without `.lua`: what logs call the plugin.
    public var name: String
    /// The path relative to the scripts folder (it becomes the chunk name, so errors read
    /// `path:line:`).
    public var path: String
    public var source: String

    public init(name: String, path: String, source: String) {
        self.name = name
        self.path = path
        self.source = source
    }
}

/// Every plugin of one load, in the order they see events, and where `require` looks.
public struct PluginSet: Sendable, Equatable {
    public var plugins: [PluginSource]
    /// `require("x")` loads `<libraryDirectory>/x.lua`.
    public var libraryDirectory: String

    public init(plugins: [PluginSource], libraryDirectory: String) {
        self.plugins = plugins
        self.libraryDirectory = libraryDirectory
    }

    /// Reads the plugins at `path`: a `.lua` file, or a folder whose `*.lua` files (not those in
    /// sub-folders) are the plugins, in file-name order. Helpers for `require` live in `lib/`.
    public static func read(from path: String) throws -> PluginSet {
        let fm = FileManager.default
        var isDirectory: ObjCBool = false
        guard fm.fileExists(atPath: path, isDirectory: &isDirectory) else {
            throw PluginLoadError(file: path, message: "\(path): no such file or folder")
        }
        let files: [String]
        let base: String
        if isDirectory.boolValue {
            base = path
            let names: [String]
            do {
                names = try fm.contentsOfDirectory(atPath: path)
            } catch {
                throw PluginLoadError(file: path, message: "\(path): cannot list: \(error.localizedDescription)")
            }
            files = names.filter { $0.hasSuffix(".lua") && !$0.hasPrefix(".") }.sorted()
                .map { (path as NSString).appendingPathComponent($0) }
                .filter { file in
                    var dir: ObjCBool = false
                    return fm.fileExists(atPath: file, isDirectory: &dir) && !dir.boolValue
                }
        } else {
            base = (path as NSString).deletingLastPathComponent
            files = [path]
        }
        let plugins = try files.map { file -> PluginSource in
            guard let data = fm.contents(atPath: file) else {
                throw PluginLoadError(file: file, message: "\(file): cannot read")
            }
            let fileName = (file as NSString).lastPathComponent
            let name = (fileName as NSString).deletingPathExtension
            // Named relative to the scripts folder: errors read `echo.lua:3:` wherever the folder
            // is (Lua would also cut a long absolute chunk name to `...` at 60 characters).
            return PluginSource(name: name, path: fileName, source: String(decoding: data, as: UTF8.self))
        }
        let lib = (base.isEmpty ? "." : base) + "/lib"
        return PluginSet(plugins: plugins, libraryDirectory: lib)
    }
}

/// A plugin set that did not load: the first file that failed and Lua's message
/// (`file:line: message` where Lua knows the line).
public struct PluginLoadError: Error, CustomStringConvertible, Sendable {
    public var file: String
    public var message: String
    public var description: String { message }
}

/// Limits that protect the server from its scripts. Each Lua state has its own budget and
/// memory cap; the shared store and the delivery queue are per process.
public struct ScriptLimits: Sendable {
    /// VM instructions one hook call (with every coroutine it runs) may run before it is
    /// stopped with an error. 0 = unlimited.
    public var instructionBudget: Int = 10_000_000
    /// Bytes one Lua state (one per event loop) may allocate. 0 = unlimited.
    public var memoryLimit: Int = 256 << 20
    /// Bytes the shared store (`luaws.shared`) may hold, keys and values. 0 = unlimited.
    public var sharedMemoryLimit: Int = 64 << 20
    /// Bytes one key and value of the shared store may take.
    public var sharedValueLimit: Int = 1 << 20
    /// Bytes of published and broadcast messages waiting to reach the event loops; a publish
    /// past it is an error in the script.
    public var maxPendingDelivery: Int = 64 << 20
    /// Seconds a hook may wait (luaws.sleep, luaws.http ...) before it is cancelled.
    public var hookTimeout: Double = 30
    /// Messages of one connection that may queue behind its waiting hook before reading from
    /// the client stops …
    public var maxPendingMessages = 64
    /// … and their bytes.
    public var maxPendingBytes = 4 << 20

    public init(instructionBudget: Int = 10_000_000, memoryLimit: Int = 256 << 20, sharedMemoryLimit: Int = 64 << 20) {
        self.instructionBudget = instructionBudget
        self.memoryLimit = memoryLimit
        self.sharedMemoryLimit = sharedMemoryLimit
    }
}
