import CLua
import NIOCore

/// What a call into Lua returned: its first result, reduced to what Swift needs.
struct LuaResult {
    var isNil: Bool
    var truthy: Bool
    var number: Double?
    var string: String?
    /// A registry reference to the result, when one was asked for and it is not nil.
    var ref: Int32?
}

/// An error raised by Lua code, with the message Lua gave (it starts with `file:line:`
/// when Lua knows where) and the traceback.
public struct LuaError: Error, CustomStringConvertible, Sendable {
    /// The message and traceback as Lua produced them.
    public var message: String
    /// The message without the traceback: what a log line shows.
    public var summary: String {
        message.split(separator: "\n", maxSplits: 1).first.map(String.init) ?? message
    }
    public var description: String { summary }
}

/// An argument for `LuaVM.call`.
enum LuaArg {
    case `nil`
    case int(Int64)
    case number(Double)
    case bool(Bool)
    case ref(Int32)
    case string(String)
    /// A Lua string of any bytes (a response body, say).
    case bytes([UInt8])
}

/// A plain value crossing between Lua and Swift in `core.command`.
enum LuaValue: Equatable {
    case `nil`
    case bool(Bool)
    case integer(Int64)
    case number(Double)
    case string(String)
    /// A Lua string as bytes, not necessarily UTF-8: what a waiting hook's arguments carry.
    case bytes([UInt8])
    /// Only as a reply: raised in Lua as an error with this message.
    case error(String)
}

/// What Lua code may ask of its owner (through the C core functions). Called on the thread
/// that runs the VM, never re-entering Lua.
protocol LuaVMDelegate: AnyObject {
    func luaSend(connection: Int64, bytes: UnsafeRawBufferPointer, binary: Bool) -> Bool
    func luaClose(connection: Int64, code: UInt16, reason: String) -> Bool
    func luaLog(level: Int32, message: String)
    func luaCommand(_ op: Int32, _ args: [LuaValue]) -> LuaValue
}

/// One Lua state with the luaws prelude loaded, its memory cap and instruction budget.
///
/// Not thread-safe, like the state it wraps: it belongs to one thread (an event loop) for life.
/// Every interaction with Lua goes through the protected C bridge (`luaws_call` & co.), so no
/// Lua error can unwind Swift frames.
final class LuaVM {
    private let state: OpaquePointer
    private let host: UnsafeMutablePointer<luaws_host>
    /// Registry reference of the table the prelude returned.
    private let api: Int32
    private var apiFunctions: [String: Int32] = [:]
    /// The owner (a PluginHost, which owns this VM and so outlives it): unowned, because the
    /// hot path (every conn:send) would otherwise pay a weak load.
    /// Read on every callback from Lua, set once: no run-time exclusivity check (see PluginHost).
    @exclusivity(unchecked) unowned(unsafe) var delegate: LuaVMDelegate?
    /// Argument slots for `callHook`, allocated once.
    private let hookArgs: UnsafeMutablePointer<luaws_arg>
    /// What a hook run did (`luaws_run_hook`), allocated once.
    private let run: UnsafeMutablePointer<luaws_run>

    /// The time scripts see, in nanoseconds since the Unix epoch; nil (the default) reads the
    /// system clock. Set before any script runs.
    var clock: (() -> Int64)? {
        didSet {
            host.pointee.clock_ns = clock == nil ? nil : { swift in
                Unmanaged<LuaVM>.fromOpaque(swift!).takeUnretainedValue().clock?() ?? 0
            }
        }
    }

    /// `prelude`: the Lua run once to set the state up (`luaTestPrelude` for test files).
    init(memoryLimit: Int, instructionBudget: Int, prelude: String = luaPrelude) throws {
        let host = UnsafeMutablePointer<luaws_host>.allocate(capacity: 1)
        host.initialize(to: luaws_host())
        host.pointee.mem_limit = memoryLimit
        host.pointee.budget = Int32(clamping: instructionBudget)
        host.pointee.send = { swift, id, data, len, binary in
            let vm = Unmanaged<LuaVM>.fromOpaque(swift!).takeUnretainedValue()
            let bytes = UnsafeRawBufferPointer(start: data, count: len)
            return vm.delegate?.luaSend(connection: id, bytes: bytes, binary: binary != 0) == true ? 0 : 1
        }
        host.pointee.close = { swift, id, code, reason, len in
            let vm = Unmanaged<LuaVM>.fromOpaque(swift!).takeUnretainedValue()
            let text = String(decoding: UnsafeRawBufferPointer(start: reason, count: len), as: UTF8.self)
            return vm.delegate?.luaClose(connection: id, code: UInt16(code), reason: text) == true ? 0 : 1
        }
        host.pointee.log = { swift, level, msg, len in
            let vm = Unmanaged<LuaVM>.fromOpaque(swift!).takeUnretainedValue()
            vm.delegate?.luaLog(level: level, message: String(decoding: UnsafeRawBufferPointer(start: msg, count: len), as: UTF8.self))
        }

        host.pointee.command = { swift, op, args, nargs, reply in
            let vm = Unmanaged<LuaVM>.fromOpaque(swift!).takeUnretainedValue()
            let values = UnsafeBufferPointer(start: args, count: Int(nargs)).map(LuaVM.value(of:))
            LuaVM.fill(reply!, with: vm.delegate?.luaCommand(op, values) ?? .nil)
        }

        var prelude = prelude
        var ref: Int32 = LUA_NOREF
        let opened: OpaquePointer? = prelude.withUTF8 { src in
            src.withMemoryRebound(to: CChar.self) { chars in
                luaws_open(host, chars.baseAddress, chars.count, "=luaws-prelude", &ref)
            }
        }
        guard let opened else {
            let message = Self.errorText(host)
            host.deinitialize(count: 1)
            host.deallocate()
            throw LuaError(message: "luaws prelude: \(message)")
        }
        self.host = host
        hookArgs = .allocate(capacity: 3)
        hookArgs.initialize(repeating: luaws_arg(), count: 3)
        run = .allocate(capacity: 1)
        run.initialize(to: luaws_run())
        state = opened
        api = ref
        // The pointer Lua's callbacks use to find this object; unretained (the VM owns the state).
        host.pointee.swift = Unmanaged.passUnretained(self).toOpaque()
    }

    deinit {
        hookArgs.deallocate()
        run.deallocate()
        lua_close(state)
        host.deinitialize(count: 1)
        host.deallocate()
    }

    /// Bytes the state holds now.
    var memoryInUse: Int { host.pointee.mem_used }

    private static func errorText(_ host: UnsafeMutablePointer<luaws_host>) -> String {
        withUnsafeBytes(of: &host.pointee.error) { raw in
            let bytes = raw.prefix { $0 != 0 }
            return String(decoding: bytes, as: UTF8.self)
        }
    }

    private static func value(of arg: luaws_arg) -> LuaValue {
        switch Int(arg.type) {
        case LUAWS_ARG_BOOL: return .bool(arg.i != 0)
        case LUAWS_ARG_INT: return .integer(arg.i)
        case LUAWS_ARG_NUM: return .number(arg.n)
        case LUAWS_ARG_STR: return .string(String(decoding: UnsafeRawBufferPointer(start: arg.s, count: arg.len), as: UTF8.self))
        default: return .nil
        }
    }

    /// Writes a reply for C; a string is copied into malloc'ed memory that C frees.
    private static func fill(_ reply: UnsafeMutablePointer<luaws_reply>, with value: LuaValue) {
        func copy(_ s: String) {
            var s = s
            s.withUTF8 { utf8 in
                let memory = malloc(max(utf8.count, 1))!
                if let base = utf8.baseAddress { memcpy(memory, base, utf8.count) }
                reply.pointee.str = memory.assumingMemoryBound(to: CChar.self)
                reply.pointee.len = utf8.count
            }
        }
        switch value {
        case .nil: reply.pointee.type = Int32(LUAWS_REPLY_NIL)
        case .bool(let b): reply.pointee.type = Int32(LUAWS_REPLY_BOOL); reply.pointee.boolean = b ? 1 : 0
        case .integer(let i): reply.pointee.type = Int32(LUAWS_REPLY_INT); reply.pointee.integer = i
        case .number(let n): reply.pointee.type = Int32(LUAWS_REPLY_NUM); reply.pointee.number = n
        case .string(let s): reply.pointee.type = Int32(LUAWS_REPLY_STR); copy(s)
        case .bytes(let b):
            reply.pointee.type = Int32(LUAWS_REPLY_STR)
            let memory = malloc(max(b.count, 1))!
            b.withUnsafeBytes { if let base = $0.baseAddress { memcpy(memory, base, b.count) } }
            reply.pointee.str = memory.assumingMemoryBound(to: CChar.self)
            reply.pointee.len = b.count
        case .error(let s): reply.pointee.type = Int32(LUAWS_REPLY_ERROR); copy(s)
        }
    }

    /// The registry reference of a function the prelude exports.
    func apiFunction(_ name: String) throws -> Int32 {
        if let ref = apiFunctions[name] { return ref }
        let result = try call(api, [], wantRef: true, indexing: name)
        guard let ref = result.ref else { throw LuaError(message: "luaws prelude has no \(name)") }
        apiFunctions[name] = ref
        return ref
    }

    /// Calls the function behind `function` (a registry reference) with `args`, protected and
    /// under the instruction budget.
    @discardableResult
    func call(_ function: Int32, _ args: [LuaArg], wantRef: Bool = false) throws -> LuaResult {
        try call(function, args, wantRef: wantRef, indexing: nil)
    }

    private func call(_ function: Int32, _ args: [LuaArg], wantRef: Bool, indexing: String?) throws -> LuaResult {
        var result = luaws_result()
        let status: Int32 = withLuaArgs(args) { cArgs in
            if let key = indexing {
                return key.withCString { k in
                    luaws_index(state, function, k, wantRef ? 1 : 0, &result)
                }
            }
            return luaws_call(state, function, cArgs.baseAddress, Int32(cArgs.count), wantRef ? 1 : 0, &result)
        }
        guard status == LUA_OK else { throw error(status) }
        return LuaResult(
            isNil: result.type == LUA_TNIL,
            truthy: result.boolean != 0,
            number: result.type == LUA_TNUMBER ? result.number : nil,
            // Copied now: the bytes are Lua's and only valid until the next call into Lua.
            string: result.str.map { String(decoding: UnsafeRawBufferPointer(start: $0, count: result.len), as: UTF8.self) },
            ref: result.ref == LUA_NOREF ? nil : result.ref
        )
    }

    /// Calls `function` and returns its first result's bytes if it is a string (any bytes, not
    /// only UTF-8), else nil.
    func callForBytes(_ function: Int32, _ args: [LuaArg]) throws -> [UInt8]? {
        var result = luaws_result()
        let status: Int32 = withLuaArgs(args) { cArgs in
            luaws_call(state, function, cArgs.baseAddress, Int32(cArgs.count), 0, &result)
        }
        guard status == LUA_OK else { throw error(status) }
        return result.str.map { Array(UnsafeRawBufferPointer(start: $0, count: result.len)) }
    }

    /// The hot path of `call`: a hook with the connection and, optionally, a payload and its
    /// kind, with no array or closure allocated.
    func callHook(_ function: Int32, connection: Int32, payload: ByteBuffer? = nil, kind: StaticString? = nil) throws -> Bool {
        let argv = hookArgs
        argv[0].type = Int32(LUAWS_ARG_REF)
        argv[0].i = Int64(connection)
        var result = luaws_result()
        let status: Int32
        if let payload {
            status = payload.withUnsafeReadableBytes { bytes in
                argv[1].type = Int32(LUAWS_ARG_STR)
                argv[1].s = bytes.baseAddress?.assumingMemoryBound(to: CChar.self)
                argv[1].len = bytes.count
                guard let kind else { return luaws_call(state, function, argv, 2, 0, &result) }
                argv[2].type = Int32(LUAWS_ARG_STR)
                argv[2].s = UnsafeRawPointer(kind.utf8Start).assumingMemoryBound(to: CChar.self)
                argv[2].len = kind.utf8CodeUnitCount
                return luaws_call(state, function, argv, 3, 0, &result)
            }
        } else {
            status = luaws_call(state, function, argv, 1, 0, &result)
        }
        guard status == LUA_OK else { throw error(status) }
        return result.boolean != 0
    }

    private func error(_ status: Int32) -> LuaError {
        LuaError(message: Self.errorText(host))
    }

    // MARK: hooks in coroutines

    /// A coroutine of this state, kept alive by a registry reference. Only `LuaVM` looks inside.
    struct Thread {
        fileprivate let state: OpaquePointer
        fileprivate let ref: Int32

        func isSame(as other: Thread) -> Bool { ref == other.ref }
    }

    /// What running (or resuming) a hook did.
    enum HookOutcome {
        /// It returned; `stop` is its first result's truth (true ends the plugin chain).
        case done(stop: Bool)
        /// It waits for operation `op` (core.wait's first argument) with `args`.
        case suspended(op: Int64, args: [LuaValue])
        case failed(LuaError)
    }

    /// A new coroutine for hooks; nil if the state is out of memory.
    func newThread() -> Thread? {
        var ref: Int32 = LUA_NOREF
        guard let state = luaws_new_coroutine(self.state, &ref) else { return nil }
        return Thread(state: state, ref: ref)
    }

    /// Forgets a coroutine (its memory goes with the next collection).
    func release(_ thread: Thread) {
        unref(thread.ref)
    }

    /// Abandons what `thread` was waiting for; it can run another hook afterwards.
    func reset(_ thread: Thread) {
        luaws_reset_coroutine(state, thread.state)
    }

    /// Runs hook `function` in `thread` with the connection and, optionally, a payload and its
    /// kind: the hot path, with nothing allocated unless the hook waits.
    func runHook(_ function: Int32, in thread: Thread, connection: Int32, payload: ByteBuffer? = nil, binary: Bool = false) -> HookOutcome {
        let argv = hookArgs
        argv[0].type = Int32(LUAWS_ARG_REF)
        argv[0].i = Int64(connection)
        let status: Int32
        if let payload {
            status = payload.withUnsafeReadableBytes { bytes in
                argv[1].type = Int32(LUAWS_ARG_STR)
                argv[1].s = bytes.baseAddress?.assumingMemoryBound(to: CChar.self)
                argv[1].len = bytes.count
                // The kind ("text" or "binary") by registry reference: no string made or hashed.
                argv[2].type = Int32(LUAWS_ARG_REF)
                argv[2].i = Int64(binary ? host.pointee.kind_binary_ref : host.pointee.kind_text_ref)
                return luaws_run_hook(state, thread.state, function, argv, 3, run)
            }
        } else {
            status = luaws_run_hook(state, thread.state, function, argv, 1, run)
        }
        return outcome(status)
    }

    /// Runs `function` with `args` in `thread` (hooks whose arguments are not the hot path's).
    func run(_ function: Int32, in thread: Thread, _ args: [LuaArg]) -> HookOutcome {
        let status = withLuaArgs(args) { cArgs in
            luaws_run_hook(state, thread.state, function, cArgs.baseAddress, Int32(cArgs.count), run)
        }
        return outcome(status)
    }

    /// Resumes the hook waiting in `thread`: `results` are what its waiting call returns.
    func resume(_ thread: Thread, with results: [LuaArg]) -> HookOutcome {
        let status = withLuaArgs(results) { cArgs in
            luaws_run_hook(state, thread.state, LUA_NOREF, cArgs.baseAddress, Int32(cArgs.count), run)
        }
        return outcome(status)
    }

    private func outcome(_ status: Int32) -> HookOutcome {
        guard status == LUA_OK else { return .failed(error(status)) }
        switch Int(run.pointee.state) {
        case LUAWS_RUN_DONE:
            return .done(stop: run.pointee.truthy != 0)
        case LUAWS_RUN_SUSPENDED:
            let count = Int(run.pointee.nargs)
            // Copied now: the strings live on the coroutine's stack only until it resumes.
            let args = withUnsafeBytes(of: &run.pointee.args) { raw in
                raw.bindMemory(to: luaws_arg.self).prefix(count).map { arg -> LuaValue in
                    // Strings as bytes: a body or a Redis value need not be UTF-8.
                    guard Int(arg.type) == LUAWS_ARG_STR else { return LuaVM.value(of: arg) }
                    return .bytes(Array(UnsafeRawBufferPointer(start: arg.s, count: arg.len)))
                }
            }
            return .suspended(op: run.pointee.op, args: args)
        default:
            return .failed(LuaError(message: Self.errorText(host)))
        }
    }

    func unref(_ ref: Int32) {
        luaws_unref(state, ref)
    }

    /// Keeps every argument's bytes alive and in place while C reads them.
    private func withLuaArgs<R>(_ args: [LuaArg], _ body: (UnsafeBufferPointer<luaws_arg>) -> R) -> R {
        var cArgs = [luaws_arg](repeating: luaws_arg(), count: args.count)
        func fill(_ index: Int) -> R {
            if index == args.count { return cArgs.withUnsafeBufferPointer(body) }
            switch args[index] {
            case .nil:
                cArgs[index].type = Int32(LUAWS_ARG_NIL)
            case .int(let i):
                cArgs[index].type = Int32(LUAWS_ARG_INT); cArgs[index].i = i
            case .number(let n):
                cArgs[index].type = Int32(LUAWS_ARG_NUM); cArgs[index].n = n
            case .bool(let b):
                cArgs[index].type = Int32(LUAWS_ARG_BOOL); cArgs[index].i = b ? 1 : 0
            case .ref(let r):
                cArgs[index].type = Int32(LUAWS_ARG_REF); cArgs[index].i = Int64(r)
            case .string(var s):
                return s.withUTF8 { utf8 in
                    cArgs[index].type = Int32(LUAWS_ARG_STR)
                    cArgs[index].s = UnsafeRawPointer(utf8.baseAddress).map { $0.assumingMemoryBound(to: CChar.self) }
                    cArgs[index].len = utf8.count
                    return fill(index + 1)
                }
            case .bytes(let bytes):
                return bytes.withUnsafeBufferPointer { raw in
                    cArgs[index].type = Int32(LUAWS_ARG_STR)
                    // A non-nil pointer even for no bytes: C reads `len` bytes from it.
                    cArgs[index].s = UnsafeRawPointer(raw.baseAddress ?? UnsafePointer(bitPattern: 1)!).assumingMemoryBound(to: CChar.self)
                    cArgs[index].len = raw.count
                    return fill(index + 1)
                }
            }
            return fill(index + 1)
        }
        return fill(0)
    }
}
