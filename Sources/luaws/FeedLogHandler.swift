import Logging

/// The tap on the logging system for the dev console: every line goes to the wrapped handler
/// (stderr) as before, and then to the `EventFeed`. Lines marked `EventFeed.reported` (their
/// content is in the feed as an event of its own) go to the wrapped handler only, without the
/// mark. The level is the wrapped handler's: the console shows what the log shows.
struct FeedLogHandler<Wrapped: LogHandler>: LogHandler {
    var wrapped: Wrapped
    let feed: EventFeed

    init(_ wrapped: Wrapped, feed: EventFeed) {
        self.wrapped = wrapped
        self.feed = feed
    }

    var logLevel: Logger.Level {
        get { wrapped.logLevel }
        set { wrapped.logLevel = newValue }
    }

    var metadata: Logger.Metadata {
        get { wrapped.metadata }
        set { wrapped.metadata = newValue }
    }

    var metadataProvider: Logger.MetadataProvider? {
        get { wrapped.metadataProvider }
        set { wrapped.metadataProvider = newValue }
    }

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { wrapped[metadataKey: key] }
        set { wrapped[metadataKey: key] = newValue }
    }

    func log(event: LogEvent) {
        if event.metadata?[EventFeed.reportedKey] != nil {
            var event = event
            event.metadata?[EventFeed.reportedKey] = nil
            if event.metadata?.isEmpty == true { event.metadata = nil }
            wrapped.log(event: event)
            return
        }
        wrapped.log(event: event)
        feed.log(level: event.level, source: event.source, message: event.message.description)
    }
}
