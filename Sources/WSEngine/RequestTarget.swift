import NIOHTTP1

extension HTTPRequestHead {
    /// The request target (`/ws?room=1#x`) split at the first `?` or `#`: the path, and the
    /// query without its `?` (empty if none). A fragment, which clients should not send, is dropped.
    var pathAndQuery: (path: String, query: String) {
        let uri = self.uri
        let pathEnd = uri.firstIndex { $0 == "?" || $0 == "#" } ?? uri.endIndex
        var query = ""
        if pathEnd < uri.endIndex, uri[pathEnd] == "?" {
            query = String(uri[uri.index(after: pathEnd)...].prefix { $0 != "#" })
        }
        return (String(uri[..<pathEnd]), query)
    }
}
