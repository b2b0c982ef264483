/*
 * wsbench: a small, fast, honest WebSocket load generator (one thread, epoll).
 *
 *   wsbench [options] ws://127.0.0.1:PORT/PATH
 *
 * echo mode (default): C connections each keep P messages of S bytes in flight; every reply
 *   is checked byte for byte against PREFIX + the message sent (each message carries the
 *   connection's sequence number, so a lost, duplicated or reordered reply is a mismatch).
 *   Reports messages/s, latency percentiles, errors, mismatches and, with -P, the server's CPU
 *   time per message (utime+stime from /proc/PID/stat over the measured window).
 * idle mode (-m idle): opens C connections, holds them H seconds and reports the server's RSS
 *   growth per connection (with -P) and the text pushes received (count and how late against
 *   the expected period -e).
 * fanout mode (-m fanout): C subscribers connect to PATH?role=sub (spread round-robin over the
 *   URLs given) and wait for the server's "ready" text on each (sent once subscribed); one
 *   publisher connects to the first URL's PATH?role=pub and sends W warm-up messages, then N
 *   measured ones (-n), keeping at most P published but not yet received by every subscriber.
 *   Every subscriber must receive every message, in order, byte for byte (the payload carries
 *   the sequence number). Reports deliveries/s, delivery latency (publish to receipt), the
 *   server's CPU per delivery (-P) and the backend's (-B, e.g. Redis), and how many
 *   subscribers received all W + N messages. Bounded: N messages or -d seconds, whichever first.
 * -B PIDS: a backend's processes (an HTTP server, Redis), whose CPU is reported separately.
 * -j: JSON-like text payloads (echo mode): {"seq":"<20 digits>",...,"text":"<words>"}, S bytes,
 *   each message's words a different slice of a fixed text, so that they compress as chat
 *   messages do (about 3:1), not as the default padding ('x' repeated) does.
 * -z: permessage-deflate (RFC 7692, echo mode): offers "permessage-deflate;
 *   client_no_context_takeover; server_no_context_takeover", compresses every message on its own
 *   (raw deflate, window 15, sync flush, the 00 00 ff ff tail removed, RSV1 set) and inflates
 *   every reply that has RSV1 (a fresh context each: no context takeover), then checks it byte
 *   for byte as usual. A server that does not accept the offer (or keeps its context) is not
 *   measured: wsbench reports "unsupported" and exits with status 3.
 * -n N (echo mode): end the measured window after N replies, or at -d, whichever comes first.
 * Connections open 200 at a time. In echo mode none sends until all are open (at most 20 s;
 * "open_seconds" says how long it took, "open" how many were open at the end); then the
 * warm-up (-w), then the measured window.
 * Several ws:// URLs: connections are spread over them round-robin (several processes).
 *
 * Loopback only: the host must be 127.0.0.1 or ::1. Every run is bounded by -d / -H.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

typedef struct {
    int fd;
    int state;              /* 0 connecting/handshake, 1 open, 2 dead */
    uint64_t next_seq;      /* next message to send */
    uint64_t next_reply;    /* next reply expected */
    uint64_t *sent_at;      /* ring of send times, size depth */
    char *in; size_t in_len, in_cap;
    char *out; size_t out_len, out_off, out_cap;
    uint64_t opened_at;
    uint64_t pushes;
    int target;             /* index into targets[] */
    int role;               /* 0 echo/idle, 1 subscriber, 2 publisher */
    int ready;              /* subscriber: the server said it is subscribed */
    uint64_t received;      /* subscriber: messages received */
    int deflate;            /* permessage-deflate was agreed */
} conn_t;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- latency histogram: 64 linear sub-buckets per power of two, in ns ---- */
#define SUB 64
static uint64_t hist[64 * SUB];
static uint64_t hist_count;
static void hist_add(uint64_t ns) {
    if (ns < SUB) { hist[ns]++; hist_count++; return; }
    int msb = 63 - __builtin_clzll(ns);
    int shift = msb - 6;
    uint64_t sub = (ns >> shift) & (SUB - 1);
    hist[(shift + 1) * SUB + sub]++;
    hist_count++;
}
static double hist_pct(double p) {
    uint64_t target = (uint64_t)(p / 100.0 * (double)hist_count), seen = 0;
    for (int i = 0; i < 64 * SUB; i++) {
        seen += hist[i];
        if (seen > target && hist[i]) {
            if (i < SUB) return (double)i;
            int shift = i / SUB - 1;
            uint64_t sub = (uint64_t)(i % SUB);
            return (double)(((uint64_t)SUB + sub) << shift);
        }
    }
    return 0;
}

/* ---- server figures from /proc ---- */
static int npids; static int pids[16];
static int nbpids; static int bpids[16];
static long long cpu_ticks_of(const int *list, int count) {
    long long total = 0;
    for (int i = 0; i < count; i++) {
        char path[64], buf[4096];
        snprintf(path, sizeof path, "/proc/%d/stat", list[i]);
        FILE *f = fopen(path, "r");
        if (!f) continue;
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        fclose(f);
        buf[n] = 0;
        char *p = strrchr(buf, ')');
        if (!p) continue;
        unsigned long utime = 0, stime = 0;
        /* fields after ")": state(3) ... utime(14) stime(15) */
        sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &utime, &stime);
        total += (long long)(utime + stime);
    }
    return total;
}
static long long server_cpu_ticks(void) { return cpu_ticks_of(pids, npids); }
static long long backend_cpu_ticks(void) { return cpu_ticks_of(bpids, nbpids); }
static long long server_rss_kb(void) {
    long long total = 0;
    for (int i = 0; i < npids; i++) {
        char path[64], line[256];
        snprintf(path, sizeof path, "/proc/%d/status", pids[i]);
        FILE *f = fopen(path, "r");
        if (!f) continue;
        while (fgets(line, sizeof line, f))
            if (strncmp(line, "VmRSS:", 6) == 0) total += atoll(line + 6);
        fclose(f);
    }
    return total;
}

/* ---- options ---- */
static int C = 50, P = 1, S = 16, idle_mode = 0, fanout_mode = 0, json_payload = 0, deflate_mode = 0;
static double duration = 5, warmup = 1, hold = 12, period = 0;
static uint64_t fan_n = 2000, fan_warm = 200, count_n = 0;
static int count_given = 0;
static const char *prefix = "Message received: ";
typedef struct { char host[64]; char path[256]; int port; } target_t;
#define MAX_TARGETS 8
static target_t targets[MAX_TARGETS];
static int ntargets;

static void die(const char *m) { perror(m); exit(2); }

static void out_reserve(conn_t *c, size_t more) {
    if (c->out_len + more <= c->out_cap) return;
    if (c->out_off > 0) {
        memmove(c->out, c->out + c->out_off, c->out_len - c->out_off);
        c->out_len -= c->out_off; c->out_off = 0;
        if (c->out_len + more <= c->out_cap) return;
    }
    c->out_cap = (c->out_len + more) * 2;
    c->out = realloc(c->out, c->out_cap);
}

/* -j: a fixed text of words (xorshift-chosen from a small vocabulary, so it compresses as prose
 * does) that JSON-like payloads take slices of. */
#define CORPUS_SPAN (1 << 18)
static char *corpus;
static void make_corpus(void) {
    static const char *words[] = {
        "hello", "world", "luaws", "message", "the", "a", "chat", "room", "lobby", "user", "sent",
        "received", "is", "are", "was", "to", "from", "and", "or", "not", "with", "without", "this",
        "that", "server", "client", "socket", "frame", "text", "binary", "ping", "pong", "close",
        "open", "event", "loop", "plugin", "hook", "script", "state", "table", "string", "number",
        "true", "false", "null", "yes", "no", "ok", "error", "retry", "later", "now", "today",
        "tomorrow", "42", "7", "1999", "2026", "3.14", "alice", "bob", "carol", "dave"};
    size_t nwords = sizeof words / sizeof *words, len = CORPUS_SPAN + (size_t)S + 64, n = 0;
    uint64_t x = 88172645463325252ull;
    corpus = malloc(len);
    while (n < len) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        const char *w = words[x % nwords];
        size_t wl = strlen(w);
        for (size_t i = 0; i <= wl && n < len; i++) corpus[n++] = i < wl ? w[i] : (x >> 40) % 11 == 0 ? ',' : ' ';
    }
}

/* The payload of message `seq`: its number in 20 digits, padded with 'x' to S bytes; with -j,
 * a JSON-like object with the number first and a slice of the corpus as its text. */
static void payload_of(uint64_t seq, char *buf) {
    if (json_payload) {
        char head[160];
        int h = snprintf(head, sizeof head, "{\"seq\":\"%020llu\",\"user\":\"user%llu\",\"room\":\"lobby\","
                         "\"ts\":%llu,\"text\":\"", (unsigned long long)seq, (unsigned long long)(seq * 7919 % 500),
                         (unsigned long long)(1764000000 + seq));
        if (S < h + 2) { memcpy(buf, head, (size_t)S); return; }
        memcpy(buf, head, (size_t)h);
        size_t from = (size_t)((seq * 2654435761ull) % CORPUS_SPAN);
        memcpy(buf + h, corpus + from, (size_t)(S - h - 2));
        memcpy(buf + S - 2, "\"}", 2);
        return;
    }
    char num[32];
    int n = snprintf(num, sizeof num, "%020llu", (unsigned long long)seq);
    if (S >= n) { memcpy(buf, num, (size_t)n); memset(buf + n, 'x', (size_t)(S - n)); }
    else memcpy(buf, num + (n - S), (size_t)S);
}

static uint64_t messages, mismatches, errors, pushes_total, late_pushes;
static uint64_t sent_measured, wire_out, wire_in, compressed_replies;
static int measuring;

/* ---- permessage-deflate (-z): one deflate and one inflate stream, reset for every message ---- */
#define MAX_PAYLOAD (1 << 17)
static z_stream zdef, zinf;
static unsigned char zbuf[MAX_PAYLOAD + 1024];       /* one compressed message */
static char inflated[MAX_PAYLOAD + 64];              /* one inflated reply */
static void zlib_init(void) {
    if (deflateInit2(&zdef, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -15, 8, Z_DEFAULT_STRATEGY) != Z_OK ||
        inflateInit2(&zinf, -15) != Z_OK) { fprintf(stderr, "zlib init failed\n"); exit(2); }
}
/* RFC 7692 §7.2.1: deflate with a sync flush, without its 00 00 ff ff tail. Returns the length. */
static size_t compress_message(const char *p, size_t n) {
    deflateReset(&zdef);
    zdef.next_in = (unsigned char *)p; zdef.avail_in = (uInt)n;
    zdef.next_out = zbuf; zdef.avail_out = (uInt)sizeof zbuf;
    int rc = deflate(&zdef, Z_SYNC_FLUSH);
    size_t len = sizeof zbuf - zdef.avail_out;
    if (rc != Z_OK || zdef.avail_in != 0 || zdef.avail_out == 0 || len < 4 || memcmp(zbuf + len - 4, "\0\0\xff\xff", 4)) {
        fprintf(stderr, "deflate failed\n"); exit(2);
    }
    return len - 4;
}
/* §7.2.2: inflate the payload with the tail appended; -1 if it is not valid or too long. */
static long inflate_message(const char *p, size_t n) {
    static const unsigned char tail[4] = {0, 0, 0xff, 0xff};
    inflateReset(&zinf);
    zinf.next_out = (unsigned char *)inflated; zinf.avail_out = (uInt)sizeof inflated;
    zinf.next_in = (unsigned char *)p; zinf.avail_in = (uInt)n;
    int rc = inflate(&zinf, Z_SYNC_FLUSH);
    if (rc == Z_OK || (rc == Z_BUF_ERROR && n == 0)) {
        zinf.next_in = (unsigned char *)tail; zinf.avail_in = 4;
        rc = inflate(&zinf, Z_SYNC_FLUSH);
    }
    if ((rc != Z_OK && rc != Z_STREAM_END && rc != Z_BUF_ERROR) || zinf.avail_out == 0) return -1;
    return (long)(sizeof inflated - zinf.avail_out);
}

static void queue_message(conn_t *c, uint64_t t) {
    static char payload[MAX_PAYLOAD];
    payload_of(c->next_seq, payload);
    const char *body = payload;
    size_t len = (size_t)S;
    uint8_t hdr[14]; size_t h = 0;
    hdr[h++] = 0x81;
    if (c->deflate) { len = compress_message(payload, (size_t)S); body = (const char *)zbuf; hdr[0] |= 0x40; }
    if (len < 126) hdr[h++] = 0x80 | (uint8_t)len;
    else if (len < 65536) { hdr[h++] = 0x80 | 126; hdr[h++] = (uint8_t)(len >> 8); hdr[h++] = (uint8_t)len; }
    else { hdr[h++] = 0x80 | 127; for (int i = 7; i >= 0; i--) hdr[h++] = (uint8_t)((uint64_t)len >> (8 * i)); }
    uint8_t key[4] = {0x37, 0xfa, 0x21, 0x3d};
    memcpy(hdr + h, key, 4); h += 4;
    out_reserve(c, h + len);
    memcpy(c->out + c->out_len, hdr, h); c->out_len += h;
    for (size_t i = 0; i < len; i++) c->out[c->out_len + i] = (char)(body[i] ^ key[i & 3]);
    c->out_len += len;
    if (measuring) { sent_measured++; wire_out += h + len; }
    c->sent_at[c->next_seq % (uint64_t)P] = t;
    c->next_seq++;
}
static int epfd;

static void flush_out(conn_t *c) {
    while (c->out_off < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_off, c->out_len - c->out_off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) break;
            c->state = 2; errors++; return;
        }
        c->out_off += (size_t)n;
    }
    if (c->out_off == c->out_len) c->out_off = c->out_len = 0;
    struct epoll_event ev = {.events = EPOLLIN | (c->out_len ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}


/* ---- fanout ---- */
static conn_t *publisher;
static uint64_t fan_total;          /* fan_warm + fan_n */
static uint64_t completed;          /* every message below this one reached every subscriber */
static uint32_t *fan_counts;        /* ring of P: subscribers that received message seq */
static int ready_count;
static uint64_t fan_t0, fan_t1;
static long long fan_cpu0, fan_cpu1, fan_bcpu0, fan_bcpu1;
static uint64_t *pub_sent_at;       /* ring of P: when message seq was published */
static void flush_out(conn_t *c);
static void queue_message(conn_t *c, uint64_t t);

static uint64_t parse_seq(const char *p, size_t n) {
    uint64_t v = 0;
    for (size_t i = 0; i < n && p[i] >= '0' && p[i] <= '9'; i++) v = v * 10 + (uint64_t)(p[i] - '0');
    return v;
}

static void fan_pump(uint64_t t) {
    conn_t *c = publisher;
    if (!c || c->state != 1 || ready_count < C) return;
    int queued = 0;
    while (c->next_seq < fan_total && c->next_seq < completed + (uint64_t)P) {
        pub_sent_at[c->next_seq % (uint64_t)P] = t;
        queue_message(c, t);
        queued = 1;
    }
    if (queued) flush_out(c);
}

static void on_fanout_frame(conn_t *c, const char *p, size_t n, uint64_t t) {
    if (c->role != 1) return;  /* the publisher is not subscribed: ignore anything it gets */
    if (!c->ready) {
        if (n == 5 && memcmp(p, "ready", 5) == 0) { c->ready = 1; ready_count++; fan_pump(t); }
        else mismatches++;
        return;
    }
    if (!publisher) { mismatches++; return; }  /* nothing was published yet */
    char expect[64];
    payload_of(c->next_reply, expect);
    uint64_t seq = c->next_reply;
    if (n != (size_t)S || memcmp(p, expect, (size_t)S) != 0) {
        mismatches++;   /* lost, duplicated, reordered or garbled: count it where it says it belongs */
        seq = parse_seq(p, n);
        if (seq < completed || seq >= publisher->next_seq) return;
        c->next_reply = seq;
    }
    c->next_reply++;
    c->received++;
    if (measuring) { messages++; hist_add(t - pub_sent_at[seq % (uint64_t)P]); }
    uint32_t *slot = &fan_counts[seq % (uint64_t)P];
    if (++*slot < (uint32_t)C || seq != completed) return;
    while (completed < publisher->next_seq && fan_counts[completed % (uint64_t)P] >= (uint32_t)C) {
        fan_counts[completed % (uint64_t)P] = 0;
        completed++;
        if (completed == fan_warm) {
            measuring = 1; fan_t0 = now_ns(); fan_cpu0 = server_cpu_ticks(); fan_bcpu0 = backend_cpu_ticks();
        }
        if (completed == fan_total) {
            measuring = 0; fan_t1 = now_ns(); fan_cpu1 = server_cpu_ticks(); fan_bcpu1 = backend_cpu_ticks();
        }
    }
    fan_pump(t);
}

static void on_frame(conn_t *c, int opcode, const char *p, size_t n, uint64_t t) {
    if (opcode == 0x9) {  /* ping: answer */
        uint8_t hdr[6] = {0x8A, (uint8_t)(0x80 | n), 0, 0, 0, 0};
        out_reserve(c, 6 + n);
        memcpy(c->out + c->out_len, hdr, 6); c->out_len += 6;
        memcpy(c->out + c->out_len, p, n); c->out_len += n;
        return;
    }
    if (opcode == 0x8) { c->state = 2; errors++; return; }
    if (opcode != 0x1) return;
    if (fanout_mode) { on_fanout_frame(c, p, n, t); return; }
    if (idle_mode) {
        c->pushes++; pushes_total++;
        if (period > 0) {
            double expected = (double)c->opened_at + period * 1e9 * (double)c->pushes;
            if ((double)t - expected > 1e9 || expected - (double)t > 1e9) late_pushes++;
        }
        return;
    }
    size_t plen = strlen(prefix);
    static char expect[MAX_PAYLOAD];
    payload_of(c->next_reply, expect);
    if (n != plen + (size_t)S || memcmp(p, prefix, plen) != 0 || memcmp(p + plen, expect, (size_t)S) != 0) {
        if (n >= 7 && memcmp(p, "It is: ", 7) == 0) return; /* an idle push, not a reply */
        mismatches++;
    }
    uint64_t sent = c->sent_at[c->next_reply % (uint64_t)P];
    c->next_reply++;
    if (measuring) { messages++; hist_add(t - sent); }
    queue_message(c, t);
}

static int opened, deflate_refused;
static int sending;  /* echo mode: connections send once all are open (then at once on opening) */

/* Whether the 101 response (its first `n` bytes) agrees to permessage-deflate with
 * server_no_context_takeover, which inflating each reply on its own needs. */
static int agreed_deflate(const char *resp, size_t n) {
    char *head = strndup(resp, n);
    int ok = 0;
    for (char *save = NULL, *line = strtok_r(head, "\r\n", &save); line; line = strtok_r(NULL, "\r\n", &save)) {
        if (strncasecmp(line, "Sec-WebSocket-Extensions:", 25) == 0 && strcasestr(line, "permessage-deflate") &&
            strcasestr(line, "server_no_context_takeover") && !strcasestr(line, "client_max_window_bits"))
            ok = 1;
    }
    free(head);
    return ok;
}

static void on_readable(conn_t *c) {
    for (;;) {
        if (c->in_cap - c->in_len < 65536) { c->in_cap = c->in_cap * 2 + 65536; c->in = realloc(c->in, c->in_cap); }
        ssize_t n = recv(c->fd, c->in + c->in_len, c->in_cap - c->in_len, 0);
        if (n == 0) { c->state = 2; errors++; return; }
        if (n < 0) { if (errno == EAGAIN) break; c->state = 2; errors++; return; }
        c->in_len += (size_t)n;
    }
    uint64_t t = now_ns();
    size_t off = 0;
    if (c->state == 0) {
        char *end = memmem(c->in, c->in_len, "\r\n\r\n", 4);
        if (!end) return;
        if (strncmp(c->in, "HTTP/1.1 101", 12) != 0) { c->state = 2; errors++; return; }
        off = (size_t)(end - c->in) + 4;
        if (deflate_mode) {
            c->deflate = agreed_deflate(c->in, off);
            if (!c->deflate) { c->state = 2; deflate_refused++; return; }
        }
        c->state = 1;
        opened++;
        c->opened_at = t;
        if (fanout_mode) { if (c->role == 2) fan_pump(t); }
        else if (!idle_mode && sending) for (int i = 0; i < P; i++) queue_message(c, t);
    }
    while (c->in_len - off >= 2) {
        uint8_t b0 = (uint8_t)c->in[off], b1 = (uint8_t)c->in[off + 1];
        size_t h = 2, len = b1 & 0x7F;
        if (len == 126) { if (c->in_len - off < 4) break; len = ((size_t)(uint8_t)c->in[off + 2] << 8) | (uint8_t)c->in[off + 3]; h = 4; }
        else if (len == 127) { if (c->in_len - off < 10) break; len = 0; for (int i = 0; i < 8; i++) len = (len << 8) | (uint8_t)c->in[off + 2 + (size_t)i]; h = 10; }
        if (c->in_len - off < h + len) break;
        const char *payload = c->in + off + h;
        size_t plen = len;
        if (measuring && (b0 & 0x0F) == 0x1) wire_in += h + len;
        if (b0 & 0x40) {  /* RSV1: compressed, valid only if permessage-deflate was agreed */
            long n = c->deflate && (b0 & 0x0F) == 0x1 ? inflate_message(payload, len) : -1;
            if (n < 0) { mismatches++; }
            else { payload = inflated; plen = (size_t)n; if (measuring) compressed_replies++; }
        }
        on_frame(c, b0 & 0x0F, payload, plen, t);
        off += h + len;
    }
    memmove(c->in, c->in + off, c->in_len - off);
    c->in_len -= off;
    flush_out(c);
}

static conn_t *open_conn(int target, int role) {
    conn_t *c = calloc(1, sizeof *c);
    c->target = target;
    c->role = role;
    const char *host = targets[target].host;
    int port = targets[target].port;
    char path[300];
    const char *suffix = role == 1 ? "role=sub" : role == 2 ? "role=pub" : "";
    snprintf(path, sizeof path, "%s%s%s", targets[target].path, *suffix ? (strchr(targets[target].path, '?') ? "&" : "?") : "", suffix);
    c->sent_at = calloc((size_t)P, sizeof(uint64_t));
    int v6 = strchr(host, ':') != NULL;
    c->fd = socket(v6 ? AF_INET6 : AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) die("socket");
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int rc;
    if (v6) {
        struct sockaddr_in6 a = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)port)};
        inet_pton(AF_INET6, host, &a.sin6_addr);
        rc = connect(c->fd, (struct sockaddr *)&a, sizeof a);
    } else {
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
        inet_pton(AF_INET, host, &a.sin_addr);
        rc = connect(c->fd, (struct sockaddr *)&a, sizeof a);
    }
    if (rc < 0 && errno != EINPROGRESS) die("connect");
    char req[1024];
    int n = snprintf(req, sizeof req,
        "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n%s\r\n", path, host, port,
        deflate_mode ? "Sec-WebSocket-Extensions: permessage-deflate; client_no_context_takeover; server_no_context_takeover\r\n" : "");
    out_reserve(c, (size_t)n);
    memcpy(c->out, req, (size_t)n); c->out_len = (size_t)n;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
    return c;
}

static int (*stop_when)(void);
static void run_loop(conn_t **conns, double seconds) {
    struct epoll_event evs[512];
    uint64_t end = now_ns() + (uint64_t)(seconds * 1e9);
    while (now_ns() < end && !(stop_when && stop_when())) {
        int n = epoll_wait(epfd, evs, 512, 50);
        for (int i = 0; i < n; i++) {
            conn_t *c = evs[i].data.ptr;
            if (c->state == 2) continue;
            if (evs[i].events & (EPOLLERR | EPOLLHUP)) { c->state = 2; errors++; epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL); continue; }
            if (evs[i].events & EPOLLIN) on_readable(c);
            if (c->state != 2 && (evs[i].events & EPOLLOUT)) flush_out(c);
            if (c->state == 2) epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
        }
    }
    (void)conns;
}

static void parse_pids(const char *v, int *list, int *count) {
    char *copy = strdup(v), *save = NULL;
    for (char *t = strtok_r(copy, ",", &save); t && *count < 16; t = strtok_r(NULL, ",", &save)) list[(*count)++] = atoi(t);
    free(copy);
}

static int add_target(const char *url) {
    if (ntargets == MAX_TARGETS) { fprintf(stderr, "at most %d URLs\n", MAX_TARGETS); return -1; }
    target_t *tg = &targets[ntargets];
    const char *h = url + 5, *colon;
    if (*h == '[') {
        const char *e = strchr(h, ']');
        if (!e) return -1;
        snprintf(tg->host, sizeof tg->host, "%.*s", (int)(e - h - 1), h + 1); colon = e + 1;
    } else {
        colon = strchr(h, ':');
        if (!colon) return -1;
        snprintf(tg->host, sizeof tg->host, "%.*s", (int)(colon - h), h);
    }
    tg->port = atoi(colon + 1);
    snprintf(tg->path, sizeof tg->path, "/ws");
    const char *slash = strchr(colon, '/');
    if (slash) snprintf(tg->path, sizeof tg->path, "%s", slash);
    if (strcmp(tg->host, "127.0.0.1") && strcmp(tg->host, "::1") && strcmp(tg->host, "localhost")) { fprintf(stderr, "loopback only\n"); return -1; }
    if (!strcmp(tg->host, "localhost")) strcpy(tg->host, "127.0.0.1");
    ntargets++;
    return 0;
}

static double open_seconds;
static int handshakes_refused(void) { return deflate_refused > 0; }
static int all_open_or_refused(void) { return opened + (int)errors >= C || deflate_refused > 0; }
static int counted_enough(void) { return messages >= count_n; }
static int fan_all_ready(void) { return ready_count == C && publisher->state == 1; }
static int fan_done(void) { return completed == fan_total || publisher->state == 2; }

static int run_fanout(void) {
    fan_total = fan_warm + fan_n;
    fan_counts = calloc((size_t)P, sizeof *fan_counts);
    pub_sent_at = calloc((size_t)P, sizeof *pub_sent_at);
    conn_t **subs = calloc((size_t)C, sizeof *subs);
    for (int i = 0; i < C; i++) {
        subs[i] = open_conn(i % ntargets, 1);
        if (i % 200 == 199) run_loop(subs, 0.01);  /* let handshakes through */
    }
    stop_when = fan_all_ready;
    publisher = open_conn(0, 2);
    run_loop(subs, 20);
    int ready = ready_count, pub_open = publisher->state == 1;
    stop_when = fan_done;
    if (ready == C && pub_open) {
        fan_pump(now_ns());
        run_loop(subs, duration);  /* ends at W + N messages received by all, or at -d */
    }
    stop_when = NULL;
    run_loop(subs, 0.2);  /* anything late (a duplicate) still counts as a mismatch */
    int complete = 0, open = 0;
    uint64_t delivered = 0;
    for (int i = 0; i < C; i++) {
        complete += subs[i]->received == fan_total;
        open += subs[i]->state == 1;
        delivered += subs[i]->received;
    }
    int finished = completed == fan_total;
    double secs = finished ? (double)(fan_t1 - fan_t0) / 1e9 : 0;
    double tick_us = 1e6 / (double)sysconf(_SC_CLK_TCK);
    double cpu_us = finished && npids ? (double)(fan_cpu1 - fan_cpu0) * tick_us : 0;
    double bcpu_us = finished && nbpids ? (double)(fan_bcpu1 - fan_bcpu0) * tick_us : 0;
    char bper[32] = "null", bpct[32] = "null";
    if (nbpids && messages && secs > 0) {
        snprintf(bper, sizeof bper, "%.3f", bcpu_us / (double)messages);
        snprintf(bpct, sizeof bpct, "%.1f", bcpu_us / (secs * 1e6) * 100);
    }
    printf("{\"mode\":\"fanout\",\"subscribers\":%d,\"ready\":%d,\"open\":%d,\"window\":%d,\"size\":%d,"
           "\"warmup_messages\":%llu,\"messages\":%llu,\"published\":%llu,\"finished\":%s,\"seconds\":%.3f,"
           "\"deliveries\":%llu,\"deliveries_expected\":%llu,\"subscribers_complete\":%d,"
           "\"measured_deliveries\":%llu,\"delivered_per_s\":%.0f,\"published_per_s\":%.0f,"
           "\"p50_us\":%.0f,\"p99_us\":%.0f,\"p999_us\":%.0f,\"errors\":%llu,\"mismatches\":%llu,"
           "\"server_cpu_us_per_delivery\":%.3f,\"server_cpu_percent\":%.1f,"
           "\"backend_cpu_us_per_delivery\":%s,\"backend_cpu_percent\":%s}\n",
           C, ready, open, P, S, (unsigned long long)fan_warm, (unsigned long long)fan_n,
           (unsigned long long)(publisher ? publisher->next_seq : 0), finished ? "true" : "false", secs,
           (unsigned long long)delivered, (unsigned long long)(fan_total * (uint64_t)C), complete,
           (unsigned long long)messages, secs > 0 ? (double)messages / secs : 0, secs > 0 ? (double)fan_n / secs : 0,
           hist_pct(50) / 1e3, hist_pct(99) / 1e3, hist_pct(99.9) / 1e3,
           (unsigned long long)errors, (unsigned long long)mismatches,
           messages ? cpu_us / (double)messages : 0, secs > 0 ? cpu_us / (secs * 1e6) * 100 : 0,
           bper, bpct);
    return errors || mismatches || !finished || complete != C ? 1 : 0;
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : "";
        if (!strcmp(a, "-c")) { C = atoi(v); i++; }
        else if (!strcmp(a, "-p")) { P = atoi(v); i++; }
        else if (!strcmp(a, "-s")) { S = atoi(v); i++; }
        else if (!strcmp(a, "-d")) { duration = atof(v); i++; }
        else if (!strcmp(a, "-w")) { warmup = atof(v); i++; }
        else if (!strcmp(a, "-H")) { hold = atof(v); i++; }
        else if (!strcmp(a, "-e")) { period = atof(v); i++; }
        else if (!strcmp(a, "-n")) { count_n = strtoull(v, NULL, 10); count_given = 1; i++; }
        else if (!strcmp(a, "-W")) { fan_warm = strtoull(v, NULL, 10); i++; }
        else if (!strcmp(a, "-m")) { idle_mode = !strcmp(v, "idle"); fanout_mode = !strcmp(v, "fanout"); i++; }
        else if (!strcmp(a, "-j")) { json_payload = 1; }
        else if (!strcmp(a, "-z")) { deflate_mode = 1; }
        else if (!strcmp(a, "--prefix")) { prefix = v; i++; }
        else if (!strcmp(a, "-P")) { parse_pids(v, pids, &npids); i++; }
        else if (!strcmp(a, "-B")) { parse_pids(v, bpids, &nbpids); i++; }
        else if (!strncmp(a, "ws://", 5)) { if (add_target(a)) return 2; }
        else { fprintf(stderr, "unknown argument %s\n", a); return 2; }
    }
    if (!ntargets) {
        fprintf(stderr, "usage: wsbench [-c conns] [-p depth] [-s bytes] [-d secs] [-w secs] [-m echo|idle|fanout] [-H secs] [-e period]\n"
                        "               [-n messages] [-W warm-up messages] [-j] [-z] [--prefix P] [-P pid,pid] [-B pid,pid]\n"
                        "               ws://127.0.0.1:PORT/PATH [ws://...]\n");
        return 2;
    }
    if (S < 1 || S > MAX_PAYLOAD - 64 || C < 1 || P < 1) { fprintf(stderr, "bad sizes\n"); return 2; }
    if (fanout_mode && count_given) fan_n = count_n;
    if (fanout_mode && (S > 60 || fan_n < 1)) { fprintf(stderr, "fanout: -s at most 60, -n at least 1\n"); return 2; }
    if ((json_payload || deflate_mode) && (idle_mode || fanout_mode)) { fprintf(stderr, "-j and -z are for echo mode\n"); return 2; }
    if (json_payload) make_corpus();
    if (deflate_mode) zlib_init();

    struct rlimit rl; getrlimit(RLIMIT_NOFILE, &rl); rl.rlim_cur = rl.rlim_max; setrlimit(RLIMIT_NOFILE, &rl);
    epfd = epoll_create1(0);
    if (fanout_mode) return run_fanout();
    long long rss_before = server_rss_kb();
    conn_t **conns = calloc((size_t)C, sizeof *conns);
    stop_when = handshakes_refused;
    for (int i = 0; i < C && !deflate_refused; i++) {
        conns[i] = open_conn(i % ntargets, 0);
        if (i % 200 == 199) run_loop(conns, 0.01);  /* let handshakes through */
    }
    if (!idle_mode) {
        stop_when = all_open_or_refused;
        uint64_t open_t0 = now_ns();
        run_loop(conns, 20);
        open_seconds = (double)(now_ns() - open_t0) / 1e9;
        if (deflate_refused) {
            printf("{\"mode\":\"echo\",\"connections\":%d,\"depth\":%d,\"size\":%d,\"deflate\":true,"
                   "\"unsupported\":\"permessage-deflate with server_no_context_takeover was not agreed\"}\n", C, P, S);
            return 3;
        }
        sending = 1;
        uint64_t t = now_ns();
        for (int i = 0; i < C; i++) {
            if (conns[i]->state != 1) continue;
            for (int k = 0; k < P; k++) queue_message(conns[i], t);
            flush_out(conns[i]);
        }
    }
    stop_when = NULL;
    if (idle_mode) {
        run_loop(conns, hold);
        int open = 0;
        for (int i = 0; i < C; i++) open += conns[i]->state == 1;
        long long rss_after = server_rss_kb();
        printf("{\"mode\":\"idle\",\"connections\":%d,\"open\":%d,\"errors\":%llu,\"rss_before_kb\":%lld,\"rss_after_kb\":%lld,"
               "\"rss_per_conn_kb\":%.2f,\"pushes\":%llu,\"late_pushes\":%llu}\n",
               C, open, (unsigned long long)errors, rss_before, rss_after,
               open ? (double)(rss_after - rss_before) / open : 0.0, (unsigned long long)pushes_total, (unsigned long long)late_pushes);
        return errors || open != C ? 1 : 0;
    }
    run_loop(conns, warmup);
    measuring = 1;
    long long cpu0 = server_cpu_ticks(), bcpu0 = backend_cpu_ticks();
    uint64_t t0 = now_ns();
    if (count_n) stop_when = counted_enough;
    run_loop(conns, duration);
    stop_when = NULL;
    uint64_t t1 = now_ns();
    long long cpu1 = server_cpu_ticks(), bcpu1 = backend_cpu_ticks();
    measuring = 0;
    double secs = (double)(t1 - t0) / 1e9;
    double tick_us = 1e6 / (double)sysconf(_SC_CLK_TCK);
    double cpu_us = npids ? (double)(cpu1 - cpu0) * tick_us : 0;
    double bcpu_us = (double)(bcpu1 - bcpu0) * tick_us;
    char backend[96] = "";
    if (nbpids) snprintf(backend, sizeof backend, ",\"backend_cpu_us_per_msg\":%.3f,\"backend_cpu_percent\":%.1f",
                         messages ? bcpu_us / (double)messages : 0, bcpu_us / (secs * 1e6) * 100);
    int open = 0;
    for (int i = 0; i < C; i++) open += conns[i]->state == 1;
    printf("{\"mode\":\"echo\",\"connections\":%d,\"open\":%d,\"open_seconds\":%.2f,\"depth\":%d,\"size\":%d,"
           "\"payload\":\"%s\",\"deflate\":%s,\"seconds\":%.2f,\"messages\":%llu,"
           "\"msg_per_s\":%.0f,\"p50_us\":%.0f,\"p99_us\":%.0f,\"p999_us\":%.0f,\"errors\":%llu,\"mismatches\":%llu,"
           "\"server_cpu_us_per_msg\":%.3f,\"server_cpu_percent\":%.1f,"
           "\"wire_bytes_out_per_msg\":%.1f,\"wire_bytes_in_per_msg\":%.1f,\"compressed_replies\":%llu%s}\n",
           C, open, open_seconds, P, S, json_payload ? "json" : "pad", deflate_mode ? "true" : "false",
           secs, (unsigned long long)messages, (double)messages / secs,
           hist_pct(50) / 1e3, hist_pct(99) / 1e3, hist_pct(99.9) / 1e3,
           (unsigned long long)errors, (unsigned long long)mismatches,
           messages ? cpu_us / (double)messages : 0, cpu_us / (secs * 1e6) * 100,
           sent_measured ? (double)wire_out / (double)sent_measured : 0, messages ? (double)wire_in / (double)messages : 0,
           (unsigned long long)compressed_replies, backend);
    return errors || mismatches || open != C ? 1 : 0;
}
