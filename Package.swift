// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "luaws",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "luaws", targets: ["luaws"])
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.3"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/adam-fowler/compress-nio.git", from: "1.5.0"),
        .package(url: "https://github.com/swift-server/async-http-client.git", from: "1.37.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        // --config files: TOML (toml++ underneath) and YAML (libyaml underneath).
        .package(url: "https://github.com/LebJe/TOMLKit.git", from: "0.6.0"),
        .package(url: "https://github.com/jpsim/Yams.git", from: "6.2.2"),
    ],
    targets: [
        // Lua 5.4 from the system (Debian: liblua5.4-dev), plus static-inline shims for its macros.
        .systemLibrary(
            name: "CLua",
            pkgConfig: "lua5.4",
            providers: [.apt(["liblua5.4-dev"])]
        ),
        // hiredis from the system (Debian: libhiredis-dev, 0.14, RESP2): only its reply reader
        // and command formatter are used, plus static-inline shims that keep pointer work in C.
        .systemLibrary(
            name: "CHiredis",
            // No pkgConfig: Debian's hiredis.pc adds -D_FILE_OFFSET_BITS=64, which SwiftPM drops
            // with a warning on every build; the headers are in the default include path.
            providers: [.apt(["libhiredis-dev"])]
        ),
        // A Redis client (commands, pub/sub, reconnect) over SwiftNIO. Knows nothing of Lua or
        // WebSockets.
        .target(
            name: "RedisClient",
            dependencies: [
                "CHiredis",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Lua VMs, the plugin API, sandbox and limits. Knows nothing of sockets.
        .target(
            name: "ScriptHost",
            dependencies: [
                "CLua",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The SwiftNIO server. Knows nothing of Lua.
        .target(
            name: "WSEngine",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "CompressNIO", package: "compress-nio"),
            ]
        ),
        // Folds the engine's and the Lua states' plain per-loop counters into a Prometheus
        // registry at scrape time: the only place that knows swift-metrics and swift-prometheus.
        .target(
            name: "LuaWSMetrics",
            dependencies: [
                "WSEngine",
                "ScriptHost",
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ]
        ),
        // Drives the engine's pipeline on an EmbeddedChannel: for the unit tests, the fuzzer and
        // `luaws test` (LuaWSTest); the server itself never runs on it.
        .target(
            name: "WSEngineTesting",
            dependencies: [
                "WSEngine",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The bridge between the two: engine events to Lua hooks (and the Swift-only echo).
        // A library so that the instruction-count benchmark can drive it without the server.
        .target(
            name: "LuaWSApp",
            dependencies: [
                "ScriptHost",
                "WSEngine",
                .product(name: "NIOCore", package: "swift-nio"),
            ]
        ),
        // `luaws test`: plugin tests on the real host and engine (EmbeddedServerLoop), on a
        // virtual clock, with stubbed HTTP and an in-process Redis.
        .target(
            name: "LuaWSTest",
            dependencies: [
                "LuaWSApp",
                "ScriptHost",
                "WSEngine",
                "WSEngineTesting",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .executableTarget(
            name: "luaws",
            dependencies: [
                "LuaWSApp",
                "LuaWSMetrics",
                "LuaWSTest",
                "ScriptHost",
                "WSEngine",
                "RedisClient",
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "TOMLKit", package: "TOMLKit"),
                .product(name: "Yams", package: "Yams"),
            ],
            // The dev console's page, compiled into the binary (PackageResources.console_html):
            // found wherever the binary runs from, with no bundle beside it to lose.
            resources: [.embedInCode("Console/console.html")]
        ),
        // libFuzzer target over FuzzHarness (see dev/fuzz.sh); without -DFUZZING it replays files.
        .executableTarget(
            name: "LuaWSFuzz",
            dependencies: ["WSEngineTesting"]
        ),
        // Counts instructions per message under callgrind (see Benchmarks/instructions.sh, which
        // builds it in release with -enable-testing -DINSTRUCTIONS: it needs WSEngine internals).
        .executableTarget(
            name: "LuaWSInstructions",
            dependencies: [
                "LuaWSApp",
                "ScriptHost",
                "WSEngine",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(
            name: "ScriptHostTests",
            dependencies: [
                "ScriptHost",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(
            name: "WSEngineTests",
            dependencies: [
                "WSEngine",
                "WSEngineTesting",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOWebSocket", package: "swift-nio"),
            ]
        ),
        .testTarget(
            name: "LuaWSMetricsTests",
            dependencies: [
                "LuaWSMetrics",
                "WSEngine",
                "ScriptHost",
            ]
        ),
        .testTarget(
            name: "RedisClientTests",
            dependencies: [
                "RedisClient",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
