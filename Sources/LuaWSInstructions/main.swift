// The load that Benchmarks/instructions.sh counts under callgrind: one WebSocket connection on
// an EmbeddedChannel, through the real server pipeline and the real application (Lua plugins or
// the Swift echo), with no sockets and no threads, so that a run is the same work every time
// and valgrind (which cannot start the whole server) runs it.
//
//   LuaWSInstructions LOAD COUNT [SCRIPTS]
//     lua-echo   COUNT 16-byte text messages to the plugins of SCRIPTS (default: scripts)
//     swift-echo the same to BuiltinEcho
//     lua-idle   COUNT firings of an idle timer (time.lua with a 1 ms interval), no messages
//
// Each run does a fixed warm-up first; the script runs COUNT = 0 and COUNT = N and divides the
// difference by N, which cancels start-up, warm-up and teardown.
//
// The pipeline is installed through `WebSocketServer.configureForTesting` (WSEngine's testing
// SPI, as WSEngineTesting does), so this builds as a plain release build would, with whole-module
// optimisation and without -enable-testing: -enable-testing keeps internal declarations visible
// to other modules, which costs optimisation (dynamic exclusivity checks stay on every internal
// class property, for one) and made the counts about 5 % higher than the product's. instructions.sh
// builds with -DINSTRUCTIONS; elsewhere (a plain release build) this is an empty stub.

#if INSTRUCTIONS || DEBUG
import Foundation
import Logging
import LuaWSApp
import NIOCore
import NIOEmbedded
import ScriptHost
@_spi(Testing) import WSEngine

enum Load: String {
    case luaEcho = "lua-echo"
    case swiftEcho = "swift-echo"
    case luaIdle = "lua-idle"
}

func fail(_ message: String) -> Never {
    FileHandle.standardError.write(Data("LuaWSInstructions: \(message)\n".utf8))
    exit(1)
}

/// Messages per read: a client that pipelines sends a few frames per TCP segment.
let framesPerRead = 4
let warmUpMessages = 1_000
let warmUpFirings = 50

/// One connection through the real pipeline, on an EmbeddedChannel.
final class Connection {
    static let payload = Array("0123456789abcdef".utf8)
    static let reply = Array("Message received: 0123456789abcdef".utf8)
    static let handshake = ByteBuffer(string:
        "GET /ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")

    /// `framesPerRead` masked text frames of `payload`, each with its own mask, in one buffer.
    static let read: ByteBuffer = {
        var buffer = ByteBuffer()
        for frame in 0..<framesPerRead {
            let mask: [UInt8] = [0x37, 0xFA, 0x21, UInt8(0x3D + frame)]
            buffer.writeBytes([0x81, 0x80 | UInt8(payload.count)] + mask)
            buffer.writeBytes(payload.enumerated().map { $0.element ^ mask[$0.offset % 4] })
        }
        return buffer
    }()

    let loop = EmbeddedEventLoop()
    let channel: EmbeddedChannel
    /// Server output not yet parsed into frames.
    private var pending = ByteBuffer()
    private var handshakeDone = false

    init(load: Load, scripts: String) throws {
        // Before anything is scheduled: the engine's timers follow the loop's clock, which starts
        // at 0; start it at the wall clock's now, where idle() moves it, else idle()'s first turn
        // would replay every 1 ms firing since the machine booted (millions under callgrind after
        // a few hours of uptime: lua-idle never ended).
        loop.advanceTime(to: .now())
        let logger = Logger(label: "instructions", factory: { _ in SwiftLogNoOpLogHandler() })
        let application: WebSocketApplication
        switch load {
        case .swiftEcho:
            application = BuiltinEcho()
        case .luaEcho, .luaIdle:
            // As Luaws.swift does; lua-idle shortens time.lua's wait (it reads this var) to 1 ms.
            let vars = load == .luaIdle ? ["time_interval": "0.001"] : [:]
            let cluster = ScriptCluster(plugins: try PluginSet.read(from: scripts), vars: vars, logger: logger)
            application = LuaApplication(plugins: try cluster.makeHost(on: loop))
        }
        channel = EmbeddedChannel(loop: loop)
        try WebSocketServer.configureForTesting(channel, configuration: ServerConfiguration(), application: application, logger: logger)
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 9)).wait()
        try channel.writeInbound(Self.handshake)
        loop.run()  // the upgrade completes in a task
        guard drain().isEmpty, handshakeDone else { fail("no handshake response") }
    }

    /// The payloads of the frames the server wrote since the last call (the handshake's 101
    /// response is no frame). Every reply of these loads is one short, uncompressed frame.
    func drain() -> [ByteBufferView] {
        // The server writes ByteBuffers (the 101 response and the frames alike).
        while var buffer = try? channel.readOutbound(as: ByteBuffer.self) { pending.writeBuffer(&buffer) }
        if !handshakeDone {
            guard let end = pending.readableBytesView.firstRange(of: Array("\r\n\r\n".utf8)) else { return [] }
            let head = pending.readString(length: end.upperBound - pending.readerIndex) ?? ""
            guard head.hasPrefix("HTTP/1.1 101") else { fail("handshake refused: \(head)") }
            handshakeDone = true
        }
        var payloads: [ByteBufferView] = []
        while pending.readableBytes >= 2,
              let length = pending.getInteger(at: pending.readerIndex + 1, as: UInt8.self).map(Int.init),
              length < 126, pending.readableBytes >= 2 + length {
            pending.moveReaderIndex(forwardBy: 2)
            payloads.append(pending.readSlice(length: length)!.readableBytesView)
        }
        pending.discardReadBytes()
        return payloads
    }

    /// Sends `messages` (a multiple of `framesPerRead`) and checks that each got its echo: one
    /// by one with `verify` (the warm-up), else only by the byte count, so that the figure
    /// holds little of this harness's own work.
    func echo(_ messages: Int, verify: Bool) throws {
        var replies = 0
        var bytes = 0
        for _ in 0..<(messages / framesPerRead) {
            try channel.writeInbound(Self.read)
            loop.run()  // as a real loop does after a read: run what the read scheduled
            if verify {
                for frame in drain() {
                    guard frame.elementsEqual(Self.reply) else { fail("unexpected reply: \(String(decoding: frame, as: UTF8.self))") }
                    replies += 1
                }
            } else {
                while let buffer = try? channel.readOutbound(as: ByteBuffer.self) { bytes += buffer.readableBytes }
            }
        }
        if !verify { replies = bytes / (2 + Self.reply.count) }
        guard replies == messages, verify || bytes == messages * (2 + Self.reply.count) else {
            fail("\(replies) replies (\(bytes) bytes) to \(messages) messages")
        }
    }

    /// Waits for `firings` idle-timer firings (each sends "It is: ..."). The idle timers follow
    /// the loop's clock (virtual here); this still sleeps a little over their 1 ms between turns
    /// and moves the loop to the wall clock's now, as it did when they read the wall clock, so
    /// that the figures stay comparable; a turn that finds nothing due costs a little, which is
    /// why the figure is per firing and the interval is short.
    func idle(_ firings: Int) {
        var seen = 0
        while seen < firings {
            usleep(1_100)
            loop.advanceTime(to: .now())
            for frame in drain() {
                guard frame.starts(with: Array("It is: ".utf8)) else { fail("unexpected push: \(String(decoding: frame, as: UTF8.self))") }
                seen += 1
            }
        }
    }

    func finish() throws {
        _ = try channel.finish(acceptAlreadyClosed: true)
        try loop.syncShutdownGracefully()
    }
}

let arguments = CommandLine.arguments
guard arguments.count >= 3, let load = Load(rawValue: arguments[1]), let count = Int(arguments[2]), count >= 0 else {
    fail("usage: LuaWSInstructions lua-echo|swift-echo|lua-idle COUNT [SCRIPTS]")
}
do {
    let connection = try Connection(load: load, scripts: arguments.count > 3 ? arguments[3] : "scripts")
    switch load {
    case .luaEcho, .swiftEcho:
        try connection.echo(warmUpMessages, verify: true)
        try connection.echo(count - count % framesPerRead, verify: false)
    case .luaIdle:
        connection.idle(warmUpFirings)
        connection.idle(count)
    }
    try connection.finish()
} catch {
    fail("\(error)")
}
print("\(load.rawValue) \(count) done")
#else
import Foundation
FileHandle.standardError.write(Data("LuaWSInstructions: build it with Benchmarks/instructions.sh (it needs -DINSTRUCTIONS)\n".utf8))
exit(2)
#endif
