/// One event of an `HTTPEventStream`, as the `text/event-stream` format (WHATWG HTML, "Server-sent
/// events") carries it: a type and a text. What the text means is the publisher's business.
public struct ServerSentEvent: Sendable, Equatable {
    /// The event's type (`event:`); nil is the default type, `message` (what `EventSource.onmessage`
    /// gets). Line breaks are taken out: they would end the field.
    public var type: String?
    /// The event's data; each line goes in a `data:` field of its own, and the client joins them
    /// with `\n` again. `\r\n` and `\r` count as line breaks, as they do for the client.
    public var data: String

    public init(type: String? = nil, data: String) {
        self.type = type
        self.data = data
    }

    /// The fields, without `id:`, and the blank line that ends the event.
    func encodedFields() -> String {
        var text = ""
        text.reserveCapacity(data.utf8.count + 16)
        if let type {
            text += "event: "
            text += type.filter { $0 != "\n" && $0 != "\r" && $0 != "\r\n" }
            text += "\n"
        }
        // Split on every line break the client splits on; an empty data still sends one field
        // (an event without data fields is dropped by the client).
        var line = Substring(data)
        while let end = line.firstIndex(where: { $0 == "\n" || $0 == "\r" || $0 == "\r\n" }) {
            text += "data: "
            text += line[..<end]
            text += "\n"
            line = line[line.index(after: end)...]
        }
        text += "data: "
        text += line
        text += "\n\n"
        return text
    }

    /// `event: skipped` with the number of events a slow subscriber did not get.
    static func skipped(_ count: Int) -> String {
        "event: skipped\ndata: \(count)\n\n"
    }
}
