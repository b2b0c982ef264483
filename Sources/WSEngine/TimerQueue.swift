import NIOCore

/// The idle timers of every connection of one event loop, in one binary heap, woken by a single
/// NIO scheduled task for the earliest deadline.
///
/// Why not one NIO task per connection timer: each costs ~0.7 KB (task, promise, closure) for
/// as long as the connection lives, and idle connections are the common case. An entry here is
/// a few words. Entries are not removed one by one: a connection that closed, or replaced its
/// timers (a newer `generation`), ignores the entries it no longer wants when they come due,
/// and tells the queue (`retire`), which drops them all in one pass once they are more than
/// half of the heap, so churn with long intervals cannot pile up closed connections.
final class TimerQueue {
    private struct Entry {
        var due: NIODeadline
        var handler: WebSocketConnectionHandler
        var timer: Int
        var generation: Int
    }

    private let eventLoop: EventLoop
    private var heap: [Entry] = []
    private var wake: Scheduled<Void>?
    private var wakeAt: NIODeadline?
    /// While `fire` runs, adds do not schedule: `fire` schedules for the earliest entry at its end.
    private var firing = false
    /// Entries still wanted (added and neither retired nor fired).
    private var live = 0

    init(eventLoop: EventLoop) {
        self.eventLoop = eventLoop
    }

    func add(due: NIODeadline, handler: WebSocketConnectionHandler, timer: Int, generation: Int) {
        live += 1
        heap.append(Entry(due: due, handler: handler, timer: timer, generation: generation))
        siftUp(heap.count - 1)
        if !firing, wakeAt.map({ due < $0 }) ?? true { scheduleWake(at: due) }
    }

    /// `count` entries are no longer wanted (their connection closed or replaced its timers).
    func retire(_ count: Int) {
        live -= count
        if heap.count > 64 && heap.count > 2 * live { compact() }
    }

    private func compact() {
        heap.removeAll { !$0.handler.wantsTimer(generation: $0.generation) }
        for index in stride(from: heap.count / 2 - 1, through: 0, by: -1) { siftDown(index) }
        live = heap.count
    }

    private func scheduleWake(at due: NIODeadline) {
        wake?.cancel()
        wakeAt = due
        let queue = NIOLoopBound(self, eventLoop: eventLoop)
        wake = eventLoop.assumeIsolated().scheduleTask(deadline: due) { queue.value.fire() }
    }

    /// Runs every entry that is due, then sleeps until the next.
    private func fire() {
        wake = nil
        wakeAt = nil
        firing = true
        let now = eventLoop.now  // the loop's clock: virtual on an embedded loop
        while let top = heap.first, top.due <= now {
            let entry = removeTop()
            if entry.handler.wantsTimer(generation: entry.generation) {
                live -= 1
                entry.handler.idleTimerDue(entry.timer, generation: entry.generation, now: now)
            }
        }
        firing = false
        if let next = heap.first { scheduleWake(at: next.due) }
    }

    // MARK: binary heap on `due`

    private func removeTop() -> Entry {
        let top = heap[0]
        let last = heap.removeLast()
        if !heap.isEmpty {
            heap[0] = last
            siftDown(0)
        }
        return top
    }

    private func siftUp(_ index: Int) {
        var child = index
        while child > 0 {
            let parent = (child - 1) / 2
            guard heap[child].due < heap[parent].due else { return }
            heap.swapAt(child, parent)
            child = parent
        }
    }

    private func siftDown(_ index: Int) {
        var parent = index
        while true {
            let left = 2 * parent + 1
            let right = left + 1
            var smallest = parent
            if left < heap.count, heap[left].due < heap[smallest].due { smallest = left }
            if right < heap.count, heap[right].due < heap[smallest].due { smallest = right }
            guard smallest != parent else { return }
            heap.swapAt(parent, smallest)
            parent = smallest
        }
    }
}
