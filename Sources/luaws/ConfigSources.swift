import ArgumentParser
import Foundation
import TOMLKit
import Yams

// `--config FILE` and `LUAWS_*` environment variables.
//
// Neither is read into Serve's properties directly: before ArgumentParser parses, their settings
// are turned into ordinary arguments (`max-connections = 100` becomes `--max-connections=100`)
// placed before the subcommand's own arguments, and a setting the command line also gives is left
// out. So every value goes through the same parsing and `validate()` as a flag, and the list of
// keys is the list of options ArgumentParser knows (read from its `_dumpHelp()`): an option added
// to Serve gets its key and its variable without anyone writing them down.

/// Where an option's value came from.
enum ConfigSource: String, Sendable {
    case `default`, file, env, flag
}

/// An option of `serve` as ArgumentParser describes it.
struct OptionSpec: Sendable {
    /// The long name: `max-connections`. Also the file key (`max_connections` is accepted too).
    let name: String
    let isFlag: Bool
    let isRepeating: Bool
    /// A flag that also has `--no-NAME`.
    let hasInversion: Bool
    let defaultValue: String?

    var environmentName: String { "LUAWS_" + name.uppercased().replacingOccurrences(of: "-", with: "_") }
    /// `var` merges across the sources (each NAME is its own setting; a higher source wins per
    /// NAME); any other list from a higher source replaces the lower one whole.
    var mergesAcrossSources: Bool { name == "var" }
}

/// The options of `serve`, read from ArgumentParser's own description of it.
enum OptionCatalog {
    private struct ToolInfo: Decodable {
        struct Command: Decodable { var arguments: [Argument]? }
        struct Argument: Decodable {
            struct Name: Decodable { var kind: String; var name: String }
            var kind: String
            var shouldDisplay: Bool
            var isRepeating: Bool
            var names: [Name]?
            var defaultValue: String?
        }
        var command: Command
    }

    /// Names that are not settings: help, version, and the file itself.
    static let notSettings: Set<String> = ["help", "version", "config", "experimental-dump-help"]

    static let serve: [OptionSpec] = {
        guard let info = try? JSONDecoder().decode(ToolInfo.self, from: Data(Serve._dumpHelp().utf8)) else {
            // Only if ArgumentParser changed its format: no option could then be read from a file.
            return []
        }
        let arguments = (info.command.arguments ?? []).filter { $0.shouldDisplay && $0.kind != "positional" }
        var longNames: [[String]] = arguments.map { ($0.names ?? []).filter { $0.kind == "long" }.map(\.name) }
        let allNames = Set(longNames.joined())
        var specs: [OptionSpec] = []
        for (index, argument) in arguments.enumerated() {
            // An inverted flag may come as one argument with both names or as two arguments.
            longNames[index].removeAll { $0.hasPrefix("no-") && allNames.contains(String($0.dropFirst(3))) }
            guard let name = longNames[index].first, !notSettings.contains(name), !specs.contains(where: { $0.name == name }) else { continue }
            let isFlag = argument.kind == "flag"
            specs.append(OptionSpec(
                name: name, isFlag: isFlag, isRepeating: argument.isRepeating && !isFlag,
                hasInversion: isFlag && allNames.contains("no-" + name), defaultValue: argument.defaultValue))
        }
        return specs
    }()
}

/// A stop: the message names the file and key (or the variable) and the reason.
struct ConfigError: Error, CustomStringConvertible {
    let description: String
}

/// One option's setting from one source: the values as they would be written after `--NAME=`
/// (flags: "true" or "false").
struct Setting: Sendable {
    var values: [String]
    var source: ConfigSource
    /// For messages: `/etc/luaws/luaws.toml: key 'port'` or `environment variable LUAWS_PORT`.
    var origin: String
}

/// A value read from a file, before it is known which option it is for.
indirect enum ConfigValue {
    /// The text as written; `bool` when the value is a boolean in the file's own terms.
    case scalar(String, bool: Bool?)
    case list([ConfigValue])
    case table([(key: String, value: ConfigValue)])
}

/// The settings of every source for one run of `serve` or `config`.
struct ConfigSources {
    let specs: [OptionSpec]
    /// `--config`, else `LUAWS_CONFIG`.
    let configFile: String?
    let file: [String: Setting]
    let environment: [String: Setting]
    /// What the command line gives, in order (flags: "true"/"false").
    let commandLine: [String: [String]]
    /// LUAWS_* variables that are no option's: shown by `luaws config`, since a misspelt one is
    /// otherwise silently without effect (they cannot stop the server: LUAWS_BIN and the like
    /// may belong to other tools).
    let unknownVariables: [String]

    init(arguments: [String], environment variables: [String: String], specs: [OptionSpec] = OptionCatalog.serve) throws {
        self.specs = specs
        let byName = Dictionary(specs.map { ($0.name, $0) }, uniquingKeysWith: { first, _ in first })
        var given: [String: [String]] = [:]
        var configOnCommandLine: String?
        var index = 0
        while index < arguments.count {
            let argument = arguments[index]
            index += 1
            if argument == "--" { break }
            guard argument.hasPrefix("--") else { continue }
            var name = String(argument.dropFirst(2))
            var inline: String?
            if let equals = name.firstIndex(of: "=") {
                inline = String(name[name.index(after: equals)...])
                name = String(name[..<equals])
            }
            if name == "config" {
                configOnCommandLine = inline ?? (index < arguments.count ? arguments[index] : nil)
                if inline == nil { index += 1 }
            } else if let spec = byName[name] {
                if spec.isFlag {
                    given[name] = ["true"]
                } else {
                    guard let value = inline ?? (index < arguments.count ? arguments[index] : nil) else { continue }
                    if inline == nil { index += 1 }
                    given[name] = spec.isRepeating ? (given[name] ?? []) + [value] : [value]
                }
            } else if name.hasPrefix("no-"), let spec = byName[String(name.dropFirst(3))], spec.hasInversion {
                given[spec.name] = ["false"]
            }
        }
        commandLine = given
        let empty = variables["LUAWS_CONFIG"].map(\.isEmpty) ?? true
        configFile = configOnCommandLine ?? (empty ? nil : variables["LUAWS_CONFIG"])
        file = try configFile.map { try Self.readFile($0, specs: byName) } ?? [:]
        environment = try Self.readEnvironment(variables, specs: specs)
        let known = Set(specs.map(\.environmentName) + ["LUAWS_CONFIG"])
        unknownVariables = variables.keys.filter { $0.hasPrefix("LUAWS_") && !known.contains($0) }.sorted()
    }

    /// The arguments that carry the file's and the environment's settings, to go before the
    /// command line's own: for each option the environment's setting, else the file's, and
    /// neither where the command line gives the option (`var` excepted: see `OptionSpec`).
    func injectedArguments() -> [String] {
        var arguments: [String] = []
        for spec in specs {
            for setting in injectedSettings(for: spec) {
                arguments += Self.arguments(for: spec, values: setting.values)
            }
        }
        return arguments
    }

    /// The settings of the file and the environment that reach the parser for `spec`.
    func injectedSettings(for spec: OptionSpec) -> [Setting] {
        if spec.mergesAcrossSources { return [file[spec.name], environment[spec.name]].compactMap { $0 } }
        if commandLine[spec.name] != nil { return [] }
        return [environment[spec.name] ?? file[spec.name]].compactMap { $0 }
    }

    static func arguments(for spec: OptionSpec, values: [String]) -> [String] {
        if spec.isFlag {
            // false without an inversion is the flag's default: nothing to say.
            if values.last == "true" { return ["--\(spec.name)"] }
            return spec.hasInversion ? ["--no-\(spec.name)"] : []
        }
        // `--NAME=VALUE`: a value that starts with '-' is not taken for an option.
        return values.map { "--\(spec.name)=\($0)" }
    }

    /// Finds which setting of the file or the environment a parse error is about, so that the
    /// stop names the file and key (or the variable). Nil: the command line's own mistake, for
    /// ArgumentParser to report as usual.
    func attribute(_ message: String, reparse: ([String]) -> String?) -> ConfigError? {
        let injected = specs.flatMap { spec in injectedSettings(for: spec).map { (spec, $0) } }
        guard !injected.isEmpty else { return nil }
        // First: an option the message names (`The value 'x' is invalid for '--port <port>'`).
        var mentioned: [String] = []
        var rest = Substring(message)
        while let range = rest.range(of: "--") {
            let name = rest[range.upperBound...].prefix { $0.isLetter || $0.isNumber || $0 == "-" }
            mentioned.append(String(name))
            rest = rest[range.upperBound...]
        }
        for name in mentioned {
            let base = name.hasPrefix("no-") ? String(name.dropFirst(3)) : name
            if let (_, setting) = injected.first(where: { $0.0.name == base }) {
                return ConfigError(description: "\(setting.origin): \(message)")
            }
        }
        // Else (a check that names no option): the setting without which the error goes away.
        for (spec, setting) in injected {
            let without = injectedArguments(excluding: spec.name, setting: setting)
            if reparse(without) != message {
                return ConfigError(description: "\(setting.origin): \(message)")
            }
        }
        return nil
    }

    private func injectedArguments(excluding name: String, setting excluded: Setting) -> [String] {
        var arguments: [String] = []
        for spec in specs {
            for setting in injectedSettings(for: spec) where !(spec.name == name && setting.origin == excluded.origin) {
                arguments += Self.arguments(for: spec, values: setting.values)
            }
        }
        return arguments
    }

    // MARK: the file

    static func readFile(_ path: String, specs: [String: OptionSpec]) throws -> [String: Setting] {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ConfigError(description: "\(path): cannot read the config file")
        }
        let text = String(decoding: data, as: UTF8.self)
        let entries: [(key: String, value: ConfigValue)]
        switch URL(fileURLWithPath: path).pathExtension.lowercased() {
        case "toml":
            do {
                entries = try Self.entries(of: TOMLTable(string: text))
            } catch let error as TOMLParseError {
                throw ConfigError(description: "\(path):\(error.source.begin.line):\(error.source.begin.column): \(error.description)")
            }
        case "yaml", "yml":
            let root: Node?
            do {
                root = try Yams.compose(yaml: text)
            } catch {
                throw ConfigError(description: "\(path): \(error)")
            }
            switch root.map(fromYAML) {
            case nil: entries = []  // an empty file
            case .table(let pairs)?: entries = pairs
            default: throw ConfigError(description: "\(path): expected a mapping of option names to values")
            }
        default:
            throw ConfigError(description: "\(path): a config file ends in .toml, .yaml or .yml")
        }

        var settings: [String: Setting] = [:]
        var keyOf: [String: String] = [:]
        for (key, value) in entries {
            let name = key.replacingOccurrences(of: "_", with: "-")
            let origin = "\(path): key '\(key)'"
            if OptionCatalog.notSettings.contains(name) {
                throw ConfigError(description: "\(origin): not an option a file can set")
            }
            guard let spec = specs[name] else {
                throw ConfigError(description: "\(origin): unknown key (the keys are the long options of `luaws serve --help`)")
            }
            if let earlier = keyOf[name] {
                throw ConfigError(description: "\(origin): the same option as key '\(earlier)'")
            }
            keyOf[name] = key
            if let values = try values(of: value, for: spec, origin: origin) {
                settings[name] = Setting(values: values, source: .file, origin: origin)
            }
        }
        return settings
    }

    /// The argument values of one key, or nil for a YAML null (as if the key were absent).
    private static func values(of value: ConfigValue, for spec: OptionSpec, origin: String) throws -> [String]? {
        if case .scalar(let text, let bool) = value, bool == nil, ["~", "null"].contains(text) { return nil }
        if spec.isFlag {
            guard case .scalar(_, let bool?) = value else {
                throw ConfigError(description: "\(origin): takes true or false")
            }
            return [bool ? "true" : "false"]
        }
        switch value {
        case .scalar(let text, _):
            return [text]
        case .list(let items):
            guard spec.isRepeating else { throw ConfigError(description: "\(origin): takes one value, not a list") }
            return try items.map { item in
                guard case .scalar(let text, _) = item else { throw ConfigError(description: "\(origin): a list of plain values") }
                return text
            }
        case .table(let pairs):
            // `[var]` tables: NAME = VALUE pairs, nicer to write than a list of "NAME=VALUE".
            guard spec.mergesAcrossSources else { throw ConfigError(description: "\(origin): takes a value, not a table") }
            return try pairs.map { pair in
                guard case .scalar(let text, _) = pair.value else { throw ConfigError(description: "\(origin).\(pair.key): takes a plain value") }
                return "\(pair.key)=\(text)"
            }
        }
    }

    private static func entries(of table: TOMLTable) -> [(key: String, value: ConfigValue)] {
        // toml++ keeps keys sorted, not in file order; the order only matters for messages.
        table.keys.compactMap { key in table[key].map { (key, fromTOML($0)) } }
    }

    private static func fromTOML(_ value: any TOMLValueConvertible) -> ConfigValue {
        switch value.type {
        case .bool: return .scalar(value.bool == true ? "true" : "false", bool: value.bool)
        case .int: return .scalar(value.int.map(String.init) ?? "", bool: nil)
        case .double: return .scalar(value.double.map { "\($0)" } ?? "", bool: nil)
        case .string: return .scalar(value.string ?? "", bool: nil)
        case .array: return .list(value.array.map { $0.map(fromTOML) } ?? [])
        case .table: return .table(value.table.map(entries(of:)) ?? [])
        case .date, .time, .dateTime: return .scalar(value.debugDescription, bool: nil)
        }
    }

    private static func fromYAML(_ node: Node) -> ConfigValue {
        switch node {
        case .scalar(let scalar):
            // Quoted text is never a boolean; plain `on`/`off` is text for `access-log` and a
            // boolean for a flag: which one is decided by the option.
            return .scalar(scalar.string, bool: scalar.style == .plain ? Bool.construct(from: scalar) : nil)
        case .sequence(let sequence):
            return .list(sequence.map(fromYAML))
        case .mapping(let mapping):
            return .table(mapping.map { ($0.key.string ?? "\($0.key)", fromYAML($0.value)) })
        case .alias:
            return .scalar("", bool: nil)
        }
    }

    // MARK: the environment

    static func readEnvironment(_ variables: [String: String], specs: [OptionSpec]) throws -> [String: Setting] {
        var settings: [String: Setting] = [:]
        for spec in specs {
            // An empty variable counts as unset: what `Environment=LUAWS_X=` means to systemd.
            guard let text = variables[spec.environmentName], !text.isEmpty else { continue }
            let origin = "environment variable \(spec.environmentName)"
            let values: [String]
            if spec.isFlag {
                switch text.lowercased() {
                case "1", "true", "yes", "on": values = ["true"]
                case "0", "false", "no", "off": values = ["false"]
                default: throw ConfigError(description: "\(origin): takes true or false, got '\(text)'")
                }
            } else if spec.isRepeating {
                // Lists are comma-separated (a --var value with a comma: use --var-file).
                values = text.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
            } else {
                values = [text]
            }
            settings[spec.name] = Setting(values: values, source: .env, origin: origin)
        }
        return settings
    }

    // MARK: `luaws config`

    /// Every option with its value and where it came from; secrets masked.
    func effectiveLines() -> [String] {
        var lines = ["# luaws: effective configuration (command line > environment LUAWS_* > file > default)",
                     "# config file: \(configFile ?? "none")"]
        if !unknownVariables.isEmpty {
            lines.append("# ignored, no such option: \(unknownVariables.joined(separator: " "))")
        }
        let width = (specs.map(\.name.count).max() ?? 0) + 3
        for spec in specs {
            let values: [String]?
            let source: String
            if spec.mergesAcrossSources {
                var merged: [String] = []
                var sources: [String] = []
                for setting in injectedSettings(for: spec) {
                    merged += setting.values
                    sources.append(setting.source.rawValue)
                }
                if let given = commandLine[spec.name] {
                    merged += given
                    sources.append(ConfigSource.flag.rawValue)
                }
                values = sources.isEmpty ? defaultValues(spec) : merged
                source = sources.isEmpty ? ConfigSource.default.rawValue : sources.joined(separator: "+")
            } else if let given = commandLine[spec.name] {
                values = spec.isRepeating ? given : [given.last ?? ""]
                source = ConfigSource.flag.rawValue
            } else if let setting = environment[spec.name] ?? file[spec.name] {
                values = setting.values
                source = setting.source.rawValue
            } else {
                values = defaultValues(spec)
                source = ConfigSource.default.rawValue
            }
            let shown: String
            if let values {
                let masked = values.map { Self.masked($0, option: spec.name) }
                if spec.isFlag {
                    shown = masked.last ?? "false"
                } else if spec.isRepeating {
                    shown = "[" + masked.map(Self.literal).joined(separator: ", ") + "]"
                } else {
                    shown = Self.literal(masked.last ?? "")
                }
                let assignment = "\(spec.name) = \(shown)"
                lines.append(assignment.padding(toLength: max(width + 20, assignment.count + 2), withPad: " ", startingAt: 0) + "# \(source)")
            } else {
                lines.append("# \(spec.name) (not set)")
            }
        }
        return lines
    }

    /// The default as values, or nil for an option that has none (unset).
    private func defaultValues(_ spec: OptionSpec) -> [String]? {
        // ArgumentParser names an inverted flag's default by the flag that gives it: `--compression`.
        if spec.isFlag { return [spec.defaultValue == "true" || spec.defaultValue == "--\(spec.name)" ? "true" : "false"] }
        if spec.isRepeating {
            // ArgumentParser shows an array's default as its elements joined by spaces.
            return spec.defaultValue.map { $0.split(separator: " ").map(String.init) } ?? []
        }
        return spec.defaultValue.map { [$0] }
    }

    /// A TOML literal: numbers and booleans bare, anything else a quoted string.
    static func literal(_ value: String) -> String {
        if Int(value) != nil || (Double(value) != nil && value.contains(".")) || value == "true" || value == "false" { return value }
        var out = ""
        LineLogHandler.appendJSON(string: value, to: &out)
        return out
    }

    /// The password of a Redis URL, and `--var` values whose name says they are secret.
    static func masked(_ value: String, option: String) -> String {
        switch option {
        case "redis":
            guard let scheme = value.range(of: "://") else { return value }
            // As RedisURL reads it: the user information ends at the last "@" (a password may
            // hold "/" or "@").
            guard let at = value[scheme.upperBound...].lastIndex(of: "@") else { return value }
            let userInfo = value[scheme.upperBound..<at]
            let user = userInfo.firstIndex(of: ":").map { userInfo[..<$0] + ":" } ?? ""
            return String(value[..<scheme.upperBound]) + user + "****" + String(value[at...])
        case "var":
            guard let equals = value.firstIndex(of: "=") else { return value }
            let name = value[..<equals].uppercased()
            let secret = ["KEY", "SECRET", "TOKEN", "PASSWORD"].contains { name.contains($0) }
            return secret ? String(value[...equals]) + "****" : value
        default:
            return value
        }
    }
}

/// `luaws config [serve's options]`: what `serve` would run with, and where each value came from.
struct ShowConfig: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "config",
        abstract: "Print the effective configuration of serve (every option, its value and its source: default, file, env or flag), secrets masked.")

    // Parsed (and validated) exactly as serve would be, so that what is printed would start.
    @OptionGroup var options: Serve

    func run() async throws {
        let arguments = Array(CommandLine.arguments.dropFirst())
        let own = arguments.firstIndex(of: "config").map { Array(arguments[($0 + 1)...]) } ?? []
        let sources = try ConfigSources(arguments: own, environment: ProcessInfo.processInfo.environment)
        print(sources.effectiveLines().joined(separator: "\n"))
    }
}

extension Luaws {
    /// ArgumentParser's own entry point, after the file's and the environment's settings are
    /// turned into arguments for `serve` and `config`.
    static func main() async {
        var arguments = Array(CommandLine.arguments.dropFirst())
        // Help and version must work even with a broken config file.
        let asksForHelp = arguments.contains { ["-h", "--help", "--version", "--experimental-dump-help"].contains($0) }
        let first = arguments.first
        let subcommand = first.map { !$0.hasPrefix("-") } ?? false ? first : nil
        if !asksForHelp, subcommand == nil || subcommand == "serve" || subcommand == "config" {
            let head = subcommand.map { [$0] } ?? []
            let own = Array(arguments.dropFirst(head.count))
            do {
                let sources = try ConfigSources(arguments: own, environment: ProcessInfo.processInfo.environment)
                let injected = sources.injectedArguments()
                // A bad value from the file or the environment is reported with its origin.
                func parseError(_ candidate: [String]) -> String? {
                    do {
                        _ = try Serve.parse(candidate + own)
                        return nil
                    } catch {
                        return Serve.message(for: error)
                    }
                }
                if !injected.isEmpty, let message = parseError(injected),
                   let error = sources.attribute(message, reparse: parseError) {
                    throw error
                }
                arguments = head + injected + own
            } catch {
                FileHandle.standardError.write(Data("Error: \(error)\n".utf8))
                Foundation.exit(ExitCode.validationFailure.rawValue)
            }
        }
        await main(arguments)
    }
}
