import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// The reconnecting connection shared by `RedisConnection` and `RedisSubscriber`: connects,
/// logs in (AUTH, SELECT), runs the owner's extra handshake (`prepare`), reconnects with back-off
/// when the connection drops or cannot be made, and publishes state changes.
///
/// Thread safety: every mutable property is touched on `eventLoop` only; the public types hop
/// there before calling in. The one exception is `observed`, a locked copy of the state that
/// any thread may read. Hence `@unchecked Sendable`.
final class RedisConnectionCore: @unchecked Sendable {
    let url: RedisURL
    let configuration: RedisConfiguration
    let eventLoop: EventLoop
    let logger: Logger
    let allocator = ByteBufferAllocator()
    private let onPush: (@Sendable (RedisReply) -> Void)?

    // Event loop only.
    private var machine: RedisConnectionStateMachine
    /// The handler of the live channel, or of the one being set up.
    private var handler: RedisChannelHandler?
    private var reconnectTask: Scheduled<Void>?
    /// Why the last attempt failed or the connection dropped; shown in `unavailable` errors.
    private var lastError: String?
    private var published: RedisConnectionState = .connecting
    private var stateCallbacks: [@Sendable (RedisConnectionState) -> Void] = []
    private var connectedWaiters: [EventLoopPromise<Void>] = []
    /// Runs after AUTH/SELECT succeed and before the connection counts as connected.
    var prepare: ((RedisChannelHandler) -> EventLoopFuture<Void>)?
    /// Runs after the state became `.connected`.
    var didConnect: (() -> Void)?
    /// Runs after the live connection dropped (not after failed attempts).
    var didDisconnect: (() -> Void)?

    // Any thread.
    private let observed = NIOLockedValueBox<RedisConnectionState>(.connecting)

    init(url: RedisURL, configuration: RedisConfiguration, eventLoop: EventLoop, logger: Logger,
         onPush: (@Sendable (RedisReply) -> Void)? = nil) {
        self.url = url
        self.configuration = configuration
        self.eventLoop = eventLoop
        self.logger = logger
        self.onPush = onPush
        self.machine = RedisConnectionStateMachine(backoff: configuration.reconnectBackoff)
    }

    var state: RedisConnectionState { observed.withLockedValue { $0 } }

    // MARK: Called on the event loop

    func start() {
        eventLoop.preconditionInEventLoop()
        perform(machine.start())
    }

    /// Fails fast unless connected: a command never waits for a connection.
    func send(_ command: ByteBuffer) -> EventLoopFuture<RedisReply> {
        eventLoop.preconditionInEventLoop()
        switch machine.state {
        case .connected:
            // A failed handler means the channel is closing: the state catches up when it has.
            guard let handler, handler.isUsable else { return eventLoop.makeFailedFuture(RedisError.unavailable("connection lost")) }
            return handler.send(command, eventLoop: eventLoop)
        case .closed:
            return eventLoop.makeFailedFuture(RedisError.closed)
        case .idle, .connecting, .backingOff:
            return eventLoop.makeFailedFuture(RedisError.unavailable(lastError))
        }
    }

    func send(_ arguments: [[UInt8]]) -> EventLoopFuture<RedisReply> {
        do {
            return send(try RedisCommandFormatter.format(arguments, maxBytes: configuration.maxCommandBytes, allocator: allocator))
        } catch {
            return eventLoop.makeFailedFuture(error)
        }
    }

    func onStateChange(_ callback: @escaping @Sendable (RedisConnectionState) -> Void) {
        eventLoop.preconditionInEventLoop()
        stateCallbacks.append(callback)
    }

    func whenConnected() -> EventLoopFuture<Void> {
        eventLoop.preconditionInEventLoop()
        switch machine.state {
        case .connected where handler?.isUsable == true: return eventLoop.makeSucceededVoidFuture()
        case .closed: return eventLoop.makeFailedFuture(RedisError.closed)
        case .idle, .connecting, .backingOff, .connected:
            let promise = eventLoop.makePromise(of: Void.self)
            connectedWaiters.append(promise)
            return promise.futureResult
        }
    }

    /// Stops reconnecting, fails every waiting command with `.closed` and closes the channel.
    func close() -> EventLoopFuture<Void> {
        eventLoop.preconditionInEventLoop()
        let action = machine.close()
        guard case .shutDown(let channel) = action else { return eventLoop.makeSucceededVoidFuture() }
        reconnectTask?.cancel()
        reconnectTask = nil
        // Also reaches a handshake in progress: its commands fail and the attempt ends.
        handler?.fail(.closed)
        handler = nil
        let waiters = connectedWaiters
        connectedWaiters.removeAll()
        for waiter in waiters { waiter.fail(RedisError.closed) }
        publish()
        logger.info("redis connection closed", metadata: ["redis": "\(url)"])
        guard let channel else { return eventLoop.makeSucceededVoidFuture() }
        channel.close(promise: nil)
        return channel.closeFuture.recover { _ in }
    }

    // MARK: Connecting

    private func perform(_ action: RedisConnectionStateMachine.Action) {
        switch action {
        case .none:
            break
        case .connect:
            connect()
        case .scheduleReconnect(let delay):
            logger.debug("redis reconnect scheduled", metadata: ["redis": "\(url)", "delay_ms": "\(delay.nanoseconds / 1_000_000)"])
            reconnectTask = eventLoop.scheduleTask(in: delay) { [self] in
                reconnectTask = nil
                perform(machine.reconnectTimerFired())
            }
        case .closeChannel(let channel):
            channel.close(promise: nil)
        case .shutDown:
            preconditionFailure("shutDown comes from close() only")
        }
        publish()
    }

    private func connect() {
        let configuration = self.configuration
        let onPush = self.onPush
        ClientBootstrap(group: eventLoop)
            .connectTimeout(configuration.connectTimeout)
            .channelOption(ChannelOptions.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        RedisChannelHandler(configuration: configuration, onPush: onPush))
                }
            }
            .connect(host: url.host, port: url.port)
            .whenComplete { [self] result in
                switch result {
                case .success(let channel): handshake(channel)
                case .failure(let error): attemptFailed(Self.reason(error))
                }
            }
    }

    /// AUTH and SELECT (pipelined), then the owner's `prepare`; only then is the connection live.
    private func handshake(_ channel: Channel) {
        eventLoop.preconditionInEventLoop()
        let handler: RedisChannelHandler
        do {
            handler = try channel.pipeline.syncOperations.handler(type: RedisChannelHandler.self)
        } catch {
            channel.close(promise: nil)
            attemptFailed("\(error)")
            return
        }
        if case .closed = machine.state {
            perform(machine.connectSucceeded(channel))
            return
        }
        self.handler = handler

        var steps: [EventLoopFuture<Void>] = []
        func step(_ label: String, _ arguments: [String]) {
            let command: ByteBuffer
            do {
                command = try RedisCommandFormatter.format(arguments.map { Array($0.utf8) }, maxBytes: configuration.maxCommandBytes, allocator: allocator)
            } catch {
                steps.append(eventLoop.makeFailedFuture(error))
                return
            }
            steps.append(handler.send(command, eventLoop: eventLoop).flatMapThrowing { reply in
                if case .error(let message) = reply { throw RedisError.errorReply("\(label) failed: \(message)") }
            })
        }
        if let password = url.password {
            step("AUTH", url.user.map { ["AUTH", $0, password] } ?? ["AUTH", password])
        }
        if url.database != 0 {
            step("SELECT \(url.database)", ["SELECT", String(url.database)])
        }
        let loggedIn = EventLoopFuture.andAllSucceed(steps, on: eventLoop)
        loggedIn.assumeIsolated()
            .flatMap { [self] () -> EventLoopFuture<Void> in prepare?(handler) ?? eventLoop.makeSucceededVoidFuture() }
            .whenComplete { [self] result in
                switch result {
                case .success:
                    connected(channel)
                case .failure(let error):
                    if self.handler === handler { self.handler = nil }
                    channel.close(promise: nil)
                    attemptFailed(Self.reason(error))
                }
            }
    }

    private func connected(_ channel: Channel) {
        let action = machine.connectSucceeded(channel)
        guard case .connected = machine.state else {
            perform(action)
            return
        }
        let wasDown = lastError != nil
        lastError = nil
        channel.closeFuture.whenComplete { [self] _ in channelClosed(channel) }
        logger.info(wasDown ? "redis reconnected" : "redis connected", metadata: ["redis": "\(url)"])
        publish()
        let waiters = connectedWaiters
        connectedWaiters.removeAll()
        for waiter in waiters { waiter.succeed() }
        didConnect?()
    }

    private func attemptFailed(_ reason: String) {
        eventLoop.preconditionInEventLoop()
        if case .closed = machine.state { return }
        let wasUp = lastError == nil
        lastError = reason
        // One warning per outage, not one per attempt.
        if wasUp {
            logger.warning("redis connect failed; retrying with back-off", metadata: ["redis": "\(url)", "error": "\(reason)"])
        } else {
            logger.debug("redis connect failed", metadata: ["redis": "\(url)", "error": "\(reason)"])
        }
        perform(machine.connectFailed())
    }

    private func channelClosed(_ channel: Channel) {
        let action = machine.channelClosed(channel)
        guard case .scheduleReconnect = action else { return }
        handler = nil
        lastError = "connection lost"
        logger.warning("redis connection lost; reconnecting", metadata: ["redis": "\(url)"])
        didDisconnect?()
        perform(action)
    }

    /// A short, password-free reason for `unavailable` errors and logs.
    private static func reason(_ error: Error) -> String {
        switch error {
        case RedisError.errorReply(let message):
            return message
        case let error as RedisError:
            return error.description
        case let error as NIOConnectionError:
            if let first = error.connectionErrors.first {
                return "connect to \(first.target) failed: \(first.error)"
            }
            return "connect to \(error.host):\(error.port) failed"
        case ChannelError.connectTimeout(let amount):
            return "connect timed out after \(amount.nanoseconds / 1_000_000) ms"
        default:
            return "\(error)"
        }
    }

    private func publish() {
        let now = machine.observable
        guard now != published else { return }
        published = now
        observed.withLockedValue { $0 = now }
        for callback in stateCallbacks { callback(now) }
    }
}
