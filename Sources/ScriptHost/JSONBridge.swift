import CLua
import Foundation

/// A JSON value: the bridge between Foundation's coder and Lua's flattened nodes
/// (`luaws_json_node`, see luaws_bridge.h). Foundation reads and writes the text.
enum JSONValue: Codable, Equatable {
    case null
    case bool(Bool)
    case integer(Int64)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    init(from decoder: Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() { self = .null }
        else if let b = try? c.decode(Bool.self) { self = .bool(b) }
        else if let i = try? c.decode(Int64.self) { self = .integer(i) }
        else if let d = try? c.decode(Double.self) { self = .number(d) }
        else if let s = try? c.decode(String.self) { self = .string(s) }
        else if let a = try? c.decode([JSONValue].self) { self = .array(a) }
        else { self = .object(try c.decode([String: JSONValue].self)) }
    }

    func encode(to encoder: Encoder) throws {
        var c = encoder.singleValueContainer()
        switch self {
        case .null: try c.encodeNil()
        case .bool(let b): try c.encode(b)
        case .integer(let i): try c.encode(i)
        case .number(let d): try c.encode(d)
        case .string(let s): try c.encode(s)
        case .array(let a): try c.encode(a)
        case .object(let o): try c.encode(o)
        }
    }
}

enum JSONBridge {
    struct Failure: Error { var message: String }

    /// Text for the flattened Lua value. Keys are sorted, so equal tables give equal text.
    static func encode(_ nodes: UnsafeBufferPointer<luaws_json_node>) throws(Failure) -> String {
        var at = 0
        let value = try build(nodes, &at)
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
        do {
            return String(decoding: try encoder.encode(value), as: UTF8.self)
        } catch {
            throw Failure(message: "json.encode: \(error)")
        }
    }

    private static func build(_ nodes: UnsafeBufferPointer<luaws_json_node>, _ at: inout Int) throws(Failure) -> JSONValue {
        guard at < nodes.count else { throw Failure(message: "json.encode: truncated value") }
        let node = nodes[at]
        at += 1
        switch Int(node.type) {
        case LUAWS_JSON_NULL: return .null
        case LUAWS_JSON_FALSE: return .bool(false)
        case LUAWS_JSON_TRUE: return .bool(true)
        case LUAWS_JSON_INTEGER: return .integer(node.integer)
        case LUAWS_JSON_NUMBER: return .number(node.number)
        case LUAWS_JSON_STRING: return .string(try string(node))
        case LUAWS_JSON_ARRAY:
            var items: [JSONValue] = []
            items.reserveCapacity(node.count)
            for _ in 0..<node.count { items.append(try build(nodes, &at)) }
            return .array(items)
        case LUAWS_JSON_OBJECT:
            var object: [String: JSONValue] = [:]
            for _ in 0..<node.count {
                guard case .string(let key) = try build(nodes, &at) else { throw Failure(message: "json.encode: bad key") }
                object[key] = try build(nodes, &at)
            }
            return .object(object)
        default:
            throw Failure(message: "json.encode: bad node")
        }
    }

    private static func string(_ node: luaws_json_node) throws(Failure) -> String {
        let bytes = UnsafeRawBufferPointer(start: node.str, count: node.len)
        guard let s = String(bytes: bytes, encoding: .utf8) else {
            throw Failure(message: "json.encode: string is not valid UTF-8")
        }
        return s
    }

    /// Parses `text` and flattens it into `doc` (nodes and string arena malloc'ed; C frees them).
    static func decode(_ text: UnsafeRawBufferPointer, into doc: UnsafeMutablePointer<luaws_json_doc>) throws(Failure) {
        let value: JSONValue
        do {
            value = try JSONDecoder().decode(JSONValue.self, from: Data(text))
        } catch {
            throw Failure(message: "json.decode: not valid JSON (\(describe(error)))")
        }
        var nodes: [luaws_json_node] = []
        var strings: [String] = []
        flatten(value, into: &nodes, strings: &strings)
        let arenaSize = strings.reduce(0) { $0 + $1.utf8.count }
        let arena = malloc(max(arenaSize, 1))!.assumingMemoryBound(to: CChar.self)
        var offset = 0
        var stringIndex = 0
        for i in nodes.indices where Int(nodes[i].type) == LUAWS_JSON_STRING {
            let utf8 = Array(strings[stringIndex].utf8)
            stringIndex += 1
            utf8.withUnsafeBytes { src in
                if let base = src.baseAddress { memcpy(arena + offset, base, src.count) }
            }
            nodes[i].str = UnsafePointer(arena + offset)
            nodes[i].len = utf8.count
            offset += utf8.count
        }
        let out = malloc(max(nodes.count, 1) * MemoryLayout<luaws_json_node>.stride)!.assumingMemoryBound(to: luaws_json_node.self)
        for (i, node) in nodes.enumerated() { (out + i).initialize(to: node) }
        doc.pointee.nodes = out
        doc.pointee.count = nodes.count
        doc.pointee.arena = arena
    }

    private static func flatten(_ value: JSONValue, into nodes: inout [luaws_json_node], strings: inout [String]) {
        var node = luaws_json_node()
        switch value {
        case .null: node.type = Int32(LUAWS_JSON_NULL)
        case .bool(let b): node.type = Int32(b ? LUAWS_JSON_TRUE : LUAWS_JSON_FALSE)
        case .integer(let i): node.type = Int32(LUAWS_JSON_INTEGER); node.integer = i
        case .number(let d): node.type = Int32(LUAWS_JSON_NUMBER); node.number = d
        case .string(let s): node.type = Int32(LUAWS_JSON_STRING); strings.append(s)
        case .array(let items):
            node.type = Int32(LUAWS_JSON_ARRAY); node.count = items.count
            nodes.append(node)
            for item in items { flatten(item, into: &nodes, strings: &strings) }
            return
        case .object(let object):
            node.type = Int32(LUAWS_JSON_OBJECT); node.count = object.count
            nodes.append(node)
            for (key, item) in object.sorted(by: { $0.key < $1.key }) {
                flatten(.string(key), into: &nodes, strings: &strings)
                flatten(item, into: &nodes, strings: &strings)
            }
            return
        }
        nodes.append(node)
    }

    private static func describe(_ error: Error) -> String {
        if case DecodingError.dataCorrupted(let context) = error {
            return (context.underlyingError as NSError?)?.localizedDescription ?? context.debugDescription
        }
        return "\(error)"
    }
}
