import Foundation
import Logging
import ScriptHost

#if canImport(Glibc)
import Glibc
#endif

/// Reloads the plugins when asked (file changes, SIGHUP): re-reads the scripts and hands them to
/// the cluster, which loads them everywhere or nowhere. Requests that come while a reload runs
/// are folded into one more reload, after a short pause so that an editor's burst of writes
/// is read once.
final class Reloader: Sendable {
    private let scripts: String
    private let cluster: ScriptCluster
    private let logger: Logger
    private let requests: AsyncStream<String>.Continuation
    private let stream: AsyncStream<String>

    init(scripts: String, cluster: ScriptCluster, logger: Logger) {
        self.scripts = scripts
        self.cluster = cluster
        self.logger = logger
        (stream, requests) = AsyncStream.makeStream(of: String.self, bufferingPolicy: .bufferingNewest(1))
    }

    /// Asks for a reload; `why` goes to the log.
    func request(_ why: String) {
        requests.yield(why)
    }

    /// Serves requests until the task is cancelled.
    func run() async {
        for await why in stream {
            try? await Task.sleep(for: .milliseconds(100))
            await reload(because: why)
        }
    }

    private func reload(because why: String) async {
        let set: PluginSet
        do {
            set = try PluginSet.read(from: scripts)
        } catch let error as PluginLoadError {
            logger.error("reload (\(why)) failed, previous scripts keep serving: \(error.message)")
            return
        } catch {
            logger.error("reload (\(why)) failed, previous scripts keep serving: \(error)")
            return
        }
        switch await cluster.reload(set) {
        case .success(let status):
            logger.info("reloaded (\(why)): version \(status.version), plugins: \(status.plugins.joined(separator: ", "))")
        case .failure(let error):
            logger.error("reload (\(why)) failed, previous scripts keep serving: \(error.message)")
        }
    }

    /// Watches the scripts (the folder and its lib/, or the one file) with inotify and asks for
    /// a reload whenever a `.lua` file is written, moved, created or deleted.
    func watchFiles() {
        #if os(Linux)
        let fd = inotify_init1(Int32(IN_CLOEXEC))
        guard fd >= 0 else {
            logger.warning("inotify unavailable (errno \(errno)): reload with SIGHUP")
            return
        }
        var isDirectory: ObjCBool = false
        _ = FileManager.default.fileExists(atPath: scripts, isDirectory: &isDirectory)
        let folder = isDirectory.boolValue ? scripts : (scripts as NSString).deletingLastPathComponent
        let onlyFile = isDirectory.boolValue ? nil : (scripts as NSString).lastPathComponent
        let mask = UInt32(IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | IN_CREATE)
        for dir in [folder.isEmpty ? "." : folder, (folder.isEmpty ? "." : folder) + "/lib"] where FileManager.default.fileExists(atPath: dir) {
            if inotify_add_watch(fd, dir, mask) < 0 { logger.warning("cannot watch \(dir) (errno \(errno))") }
        }
        let thread = Thread { [self] in
            var buffer = [UInt8](repeating: 0, count: 64 * 1024)
            while true {
                let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                if n <= 0 {
                    if errno == EINTR { continue }
                    return
                }
                var offset = 0
                var changed: String?
                buffer.withUnsafeBytes { raw in
                    while offset + MemoryLayout<inotify_event>.size <= n {
                        let length = Int(raw.loadUnaligned(fromByteOffset: offset + 12, as: UInt32.self))
                        let nameStart = offset + MemoryLayout<inotify_event>.size
                        let nameBytes = raw[nameStart..<min(nameStart + length, n)].prefix { $0 != 0 }
                        let name = String(decoding: nameBytes, as: UTF8.self)
                        if name.hasSuffix(".lua") && (onlyFile == nil || name == onlyFile) { changed = name }
                        offset = nameStart + length
                    }
                }
                if let changed { self.request("\(changed) changed") }
            }
        }
        thread.name = "luaws.inotify"
        thread.start()
        #else
        logger.notice("no inotify on this platform: reload with SIGHUP")
        #endif
    }
}
