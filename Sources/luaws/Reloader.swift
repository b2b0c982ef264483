import Foundation
import Logging
import NIOConcurrencyHelpers
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
    /// Reloads by result (`success`, `failure`), for `/metrics`.
    private let results = NIOLockedValueBox<[String: Int]>([:])
    /// The dev console's feed: each result goes there as a reload event.
    private let feed: EventFeed?

    var reloadCounts: [String: Int] { results.withLockedValue { $0 } }

    init(scripts: String, cluster: ScriptCluster, logger: Logger, feed: EventFeed? = nil) {
        self.scripts = scripts
        self.cluster = cluster
        self.logger = logger
        self.feed = feed
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
            failed(because: why, error.message)
            return
        } catch {
            failed(because: why, "\(error)")
            return
        }
        let outcome = await cluster.reload(set)
        switch outcome {
        case .success(let status):
            results.withLockedValue { $0["success", default: 0] += 1 }
            // Not an error, so not at --log-level warning: the console still shows it (the feed
            // gets every result, whatever the level; the line is marked so it is not there twice).
            feed?.reload(reason: why, version: status.version, plugins: status.plugins, error: nil)
            logger.info("reloaded (\(why)): version \(status.version), plugins: \(status.plugins.joined(separator: ", "))", metadata: feedMark)
        case .failure(let error):
            failed(because: why, error.message)
        }
    }

    private func failed(because why: String, _ message: String) {
        results.withLockedValue { $0["failure", default: 0] += 1 }
        feed?.reload(reason: why, version: nil, plugins: nil, error: message)
        logger.error("reload (\(why)) failed, previous scripts keep serving: \(message)", metadata: feedMark)
    }

    /// The log lines of a result the feed has already.
    private var feedMark: Logger.Metadata? { feed == nil ? nil : EventFeed.reported }

    /// Watches the scripts with inotify, on a thread of its own, and asks for a reload whenever
    /// a `.lua` file below them is written, moved, created or deleted (see `ScriptsWatcher`).
    func watchFiles() {
        #if os(Linux)
        var isDirectory: ObjCBool = false
        _ = FileManager.default.fileExists(atPath: scripts, isDirectory: &isDirectory)
        // Split by hand: Foundation's NSString path methods trap on some short paths on Linux
        // (`--scripts s` crashed in deletingLastPathComponent).
        let slash = scripts.lastIndex(of: "/")
        let parent = slash.map { String(scripts[..<$0]) }.map { $0.isEmpty ? "/" : $0 } ?? "."
        let fileName = slash.map { String(scripts[scripts.index(after: $0)...]) } ?? scripts
        let watcher = isDirectory.boolValue
            ? ScriptsWatcher(root: scripts, onlyFile: nil, logger: logger) { [self] in request($0) }
            : ScriptsWatcher(root: parent, onlyFile: fileName, logger: logger) { [self] in request($0) }
        guard let watcher else { return }
        let thread = Thread { watcher.run() }
        thread.name = "luaws.inotify"
        thread.start()
        #else
        logger.notice("no inotify on this platform: reload with SIGHUP")
        #endif
    }
}

#if os(Linux)
/// The inotify side of hot reload. inotify watches one folder, not a tree, so this keeps one
/// watch per folder below the root: folders created (or moved in) later get theirs when their
/// parent reports them, folders removed (or moved out) lose theirs. With a single plugin file
/// the root is that file's folder, of which only the file and the `lib/` tree matter (the
/// folder may be anything, the working directory with its build folders, say).
///
/// When the root itself goes (deleted, moved, unmounted) every watch is dropped, with a warning,
/// and the root's path is polled until a folder is there again; then the tree is watched anew,
/// which is logged, and a reload is asked for, since the new folder's plugins were never seen.
///
/// Everything here runs on the watcher's own thread (the instance is not shared), hence the
/// unchecked Sendable: it is created on the caller's thread and then handed over, once.
private final class ScriptsWatcher: @unchecked Sendable {
    private let root: String
    private let onlyFile: String?
    private let logger: Logger
    private let request: @Sendable (String) -> Void
    private let fd: Int32
    /// Watch descriptor -> the folder's path relative to the root ("" for the root).
    private var folders: [Int32: String] = [:]
    private var rootWatch: Int32 = -1

    static let pollInterval: useconds_t = 200_000
    private static let folderMask = UInt32(IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | IN_CREATE | IN_ONLYDIR)
    /// The root also reports its own end.
    private static let rootMask = folderMask | UInt32(IN_DELETE_SELF | IN_MOVE_SELF)

    init?(root: String, onlyFile: String?, logger: Logger, request: @escaping @Sendable (String) -> Void) {
        self.root = root
        self.onlyFile = onlyFile
        self.logger = logger
        self.request = request
        fd = inotify_init1(Int32(IN_CLOEXEC))
        guard fd >= 0 else {
            logger.warning("inotify unavailable (errno \(errno)): hot reload is off, reload with SIGHUP")
            return nil
        }
        if !arm() {
            logger.warning("cannot watch \(root): hot reload paused until it can be (SIGHUP still reloads)")
        }
    }

    private func path(_ relative: String) -> String {
        relative.isEmpty ? root : root + "/" + relative
    }

    /// Whether a sub-folder of the folder at `parent` (relative) is part of what is watched.
    private func wanted(folder name: String, in parent: String) -> Bool {
        !name.hasPrefix(".") && (onlyFile == nil || !parent.isEmpty || name == "lib")
    }

    /// Whether a change to file `name` in the folder at `parent` (relative) calls for a reload.
    private func matters(file name: String, in parent: String) -> Bool {
        name.hasSuffix(".lua") && !name.hasPrefix(".") && (onlyFile == nil || !parent.isEmpty || name == onlyFile)
    }

    /// Watches the root and the tree below it. False if the root cannot be watched.
    private func arm() -> Bool {
        let wd = inotify_add_watch(fd, root, Self.rootMask)
        guard wd >= 0 else { return false }
        rootWatch = wd
        folders[wd] = ""
        var seen: Set<Int32> = [wd]
        watchTree(below: "", seen: &seen)
        return true
    }

    /// Watches every wanted folder below `relative` (already watched). Adding a watch on a folder
    /// that already has one returns the same descriptor: that updates its path after a move,
    /// and `seen` stops a symbolic link from looping. Returns whether a `.lua` file is there.
    @discardableResult
    private func watchTree(below relative: String, seen: inout Set<Int32>) -> Bool {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: path(relative)) else { return false }
        var found = false
        for name in names {
            let child = relative.isEmpty ? name : relative + "/" + name
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: path(child), isDirectory: &isDirectory) else { continue }
            if !isDirectory.boolValue {
                found = found || matters(file: name, in: relative)
                continue
            }
            guard wanted(folder: name, in: relative) else { continue }
            let wd = inotify_add_watch(fd, path(child), Self.folderMask)
            if wd < 0 {
                logger.warning("cannot watch \(path(child)) (errno \(errno)): changes there need SIGHUP")
                continue
            }
            guard seen.insert(wd).inserted else { continue }
            folders[wd] = child
            if watchTree(below: child, seen: &seen) { found = true }
        }
        return found
    }

    /// Drops the watches of `relative` and every folder below it (it was moved out or deleted).
    private func unwatch(_ relative: String) {
        for (wd, folder) in folders where folder == relative || folder.hasPrefix(relative + "/") {
            inotify_rm_watch(fd, wd)
            folders[wd] = nil
        }
    }

    /// Drops every watch: the root is gone.
    private func disarm() {
        for wd in folders.keys { inotify_rm_watch(fd, wd) }
        folders = [:]
        rootWatch = -1
    }

    func run() {
        var buffer = [UInt8](repeating: 0, count: 64 * 1024)
        while true {
            if rootWatch < 0 {
                // Nothing to read until the root is back: poll its path.
                usleep(Self.pollInterval)
                var isDirectory: ObjCBool = false
                if FileManager.default.fileExists(atPath: root, isDirectory: &isDirectory), isDirectory.boolValue, arm() {
                    logger.notice("watching \(root) again: hot reload resumed")
                    request("\(root) reappeared")
                }
                continue
            }
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n <= 0 {
                if n < 0 && errno == EINTR { continue }
                logger.warning("reading inotify failed (errno \(errno)): hot reload is off, reload with SIGHUP")
                return
            }
            var events: [(wd: Int32, mask: UInt32, name: String)] = []
            buffer.withUnsafeBytes { raw in
                var offset = 0
                let size = MemoryLayout<inotify_event>.size
                while offset + size <= n {
                    let wd = raw.loadUnaligned(fromByteOffset: offset, as: Int32.self)
                    let mask = raw.loadUnaligned(fromByteOffset: offset + 4, as: UInt32.self)
                    let length = Int(raw.loadUnaligned(fromByteOffset: offset + 12, as: UInt32.self))
                    let nameBytes = raw[(offset + size)..<min(offset + size + length, n)].prefix { $0 != 0 }
                    events.append((wd, mask, String(decoding: nameBytes, as: UTF8.self)))
                    offset += size + length
                }
            }
            var why: String?
            for event in events {
                if let reason = handle(wd: event.wd, mask: event.mask, name: event.name) { why = reason }
                if rootWatch < 0 { break }  // the rest are about watches just dropped
            }
            if let why { request(why) }
        }
    }

    /// Acts on one event; returns why to reload, if it calls for one.
    private func handle(wd: Int32, mask: UInt32, name: String) -> String? {
        if mask & UInt32(IN_Q_OVERFLOW) != 0 {
            // Events were lost, folder creations among them maybe: look at the whole tree again.
            var seen: Set<Int32> = [rootWatch]
            watchTree(below: "", seen: &seen)
            return "changes (inotify queue overflowed)"
        }
        if wd == rootWatch, mask & UInt32(IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED | IN_UNMOUNT) != 0 {
            logger.warning("\(root) was deleted or moved: hot reload paused until it is back (SIGHUP still reloads)")
            disarm()
            return nil
        }
        guard let parent = folders[wd] else { return nil }  // a watch already dropped
        if mask & UInt32(IN_IGNORED) != 0 {
            folders[wd] = nil  // the folder was deleted; its parent reported that
            return nil
        }
        let relative = parent.isEmpty ? name : parent + "/" + name
        if mask & UInt32(IN_ISDIR) != 0 {
            guard wanted(folder: name, in: parent) else { return nil }
            if mask & UInt32(IN_MOVED_FROM | IN_DELETE) != 0 {
                unwatch(relative)
                return "\(relative)/ removed"
            }
            if mask & UInt32(IN_CREATE | IN_MOVED_TO) != 0 {
                // Files may have been put there before the watch was added: look inside.
                let wd = inotify_add_watch(fd, path(relative), Self.folderMask)
                guard wd >= 0 else {
                    logger.warning("cannot watch \(path(relative)) (errno \(errno)): changes there need SIGHUP")
                    return nil
                }
                folders[wd] = relative
                var seen = Set(folders.keys)
                let hasScripts = watchTree(below: relative, seen: &seen)
                return mask & UInt32(IN_MOVED_TO) != 0 || hasScripts ? "\(relative)/ added" : nil
            }
            return nil
        }
        return matters(file: name, in: parent) ? "\(relative) changed" : nil
    }
}
#endif
