/*
 * CHiredis: hiredis (Debian's libhiredis-dev, 0.14, RESP2) for Swift.
 *
 * Only two pieces of hiredis are used: the reply reader (redisReader) and the
 * command formatter (redisFormatCommandArgv). The connection, its I/O and the
 * async API stay unused: SwiftNIO does the I/O and feeds the reader.
 *
 * The helpers below keep the pointer work in C, so the Swift side handles
 * one opaque reader and reads replies through accessors:
 *
 *  - luaws_redis_reader wraps a redisReader whose object functions are
 *    hiredis's own, decorated to bound each reply *while it is parsed*:
 *    hiredis 0.14 has no limit on a multi-bulk count (it callocs what the
 *    header announces) and `maxbuf` only says when to free an idle buffer.
 *    So every object created for the reply being read is charged to a budget
 *    (string bytes, and 16 bytes per object and per array slot); an array
 *    longer than max_elements or a reply past max_bytes makes the object
 *    function return NULL, which hiredis turns into a reader error (and frees
 *    the partial reply). Bytes buffered for an unfinished reply are bounded
 *    by the same max_bytes, so a huge bulk string is refused before it has
 *    fully arrived.
 *  - luaws_redis_format formats one command from a packed buffer (all the
 *    arguments back to back) and their lengths, so Swift passes two arrays
 *    instead of an array of pointers.
 */
#ifndef LUAWS_CHIREDIS_SHIMS_H
#define LUAWS_CHIREDIS_SHIMS_H

#include <hiredis/hiredis.h>
#include <hiredis/read.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct luaws_redis_reader {
    redisReader *reader;
    /* hiredis's default object functions, and our decorated copy. */
    redisReplyObjectFunctions *defaults;
    redisReplyObjectFunctions fns;
    size_t max_bytes;       /* bound on one reply (charged as described above) */
    long long max_elements; /* bound on one array's length */
    size_t used;            /* charged so far to the reply being read */
    int too_large;          /* set when a bound refused the reply */
} luaws_redis_reader;

#define LUAWS_REDIS_OBJECT_COST 16

static inline int luaws_redis_charge(luaws_redis_reader *lr, size_t bytes) {
    if (bytes > lr->max_bytes || lr->used > lr->max_bytes - bytes) {
        lr->too_large = 1;
        return 0;
    }
    lr->used += bytes;
    return 1;
}

static inline luaws_redis_reader *luaws_redis_task_owner(const redisReadTask *task) {
    return (luaws_redis_reader *)task->privdata;
}

static inline void *luaws_redis_create_string(const redisReadTask *task, char *str, size_t len) {
    luaws_redis_reader *lr = luaws_redis_task_owner(task);
    if (len > lr->max_bytes || !luaws_redis_charge(lr, len + LUAWS_REDIS_OBJECT_COST)) return NULL;
    return lr->defaults->createString(task, str, len);
}

static inline void *luaws_redis_create_array(const redisReadTask *task, int elements) {
    luaws_redis_reader *lr = luaws_redis_task_owner(task);
    if (elements < 0 || (long long)elements > lr->max_elements) {
        lr->too_large = 1;
        return NULL;
    }
    if (!luaws_redis_charge(lr, LUAWS_REDIS_OBJECT_COST + (size_t)elements * sizeof(void *))) return NULL;
    return lr->defaults->createArray(task, elements);
}

static inline void *luaws_redis_create_integer(const redisReadTask *task, long long value) {
    luaws_redis_reader *lr = luaws_redis_task_owner(task);
    if (!luaws_redis_charge(lr, LUAWS_REDIS_OBJECT_COST)) return NULL;
    return lr->defaults->createInteger(task, value);
}

static inline void *luaws_redis_create_nil(const redisReadTask *task) {
    luaws_redis_reader *lr = luaws_redis_task_owner(task);
    if (!luaws_redis_charge(lr, LUAWS_REDIS_OBJECT_COST)) return NULL;
    return lr->defaults->createNil(task);
}

/* A reader bounded by max_bytes per reply and max_elements per array; NULL on OOM. */
static inline luaws_redis_reader *luaws_redis_reader_new(size_t max_bytes, long long max_elements) {
    luaws_redis_reader *lr = (luaws_redis_reader *)calloc(1, sizeof(luaws_redis_reader));
    if (lr == NULL) return NULL;
    lr->reader = redisReaderCreate();
    if (lr->reader == NULL) { free(lr); return NULL; }
    lr->defaults = lr->reader->fn;
    lr->fns = *lr->defaults;
    lr->fns.createString = luaws_redis_create_string;
    lr->fns.createArray = luaws_redis_create_array;
    lr->fns.createInteger = luaws_redis_create_integer;
    lr->fns.createNil = luaws_redis_create_nil;
    lr->reader->fn = &lr->fns;
    lr->reader->privdata = lr; /* copied by hiredis into every read task */
    lr->max_bytes = max_bytes;
    lr->max_elements = max_elements;
    return lr;
}

static inline void luaws_redis_reader_free(luaws_redis_reader *lr) {
    if (lr == NULL) return;
    redisReaderFree(lr->reader);
    free(lr);
}

/* 0 on success, -1 when the reader is in error or out of memory. */
static inline int luaws_redis_reader_feed(luaws_redis_reader *lr, const void *bytes, size_t len) {
    if (len == 0) return 0;
    return redisReaderFeed(lr->reader, (const char *)bytes, len) == REDIS_OK ? 0 : -1;
}

/*
 * 1 and *out set: a complete reply (free it with freeReplyObject);
 * 0: more bytes needed; -1: protocol error or a bound refused the reply
 * (see luaws_redis_reader_error); the reader is then unusable.
 */
static inline int luaws_redis_reader_next(luaws_redis_reader *lr, redisReply **out) {
    void *reply = NULL;
    *out = NULL;
    if (redisReaderGetReply(lr->reader, &reply) != REDIS_OK) return -1;
    if (reply != NULL) {
        lr->used = 0;
        *out = (redisReply *)reply;
        return 1;
    }
    /* An unfinished reply: bound what waits in the buffer for it. */
    if (lr->reader->len - lr->reader->pos > lr->max_bytes + 64) {
        lr->too_large = 1;
        return -1;
    }
    return 0;
}

static inline int luaws_redis_reader_too_large(const luaws_redis_reader *lr) { return lr->too_large; }
static inline const char *luaws_redis_reader_error(const luaws_redis_reader *lr) { return lr->reader->errstr; }

/* Reply accessors (hiredis's redisReply, RESP2 types REDIS_REPLY_*). */
static inline int luaws_redis_reply_type(const redisReply *r) { return r->type; }
static inline long long luaws_redis_reply_integer(const redisReply *r) { return r->integer; }
static inline const uint8_t *luaws_redis_reply_bytes(const redisReply *r) { return (const uint8_t *)r->str; }
static inline size_t luaws_redis_reply_length(const redisReply *r) { return r->len; }
static inline size_t luaws_redis_reply_count(const redisReply *r) { return r->elements; }
static inline const redisReply *luaws_redis_reply_element(const redisReply *r, size_t i) {
    return i < r->elements ? r->element[i] : NULL;
}
static inline void luaws_redis_reply_free(const redisReply *r) { freeReplyObject((void *)r); }

enum {
    LUAWS_REDIS_STRING = REDIS_REPLY_STRING,
    LUAWS_REDIS_ARRAY = REDIS_REPLY_ARRAY,
    LUAWS_REDIS_INTEGER = REDIS_REPLY_INTEGER,
    LUAWS_REDIS_NIL = REDIS_REPLY_NIL,
    LUAWS_REDIS_STATUS = REDIS_REPLY_STATUS,
    LUAWS_REDIS_ERROR = REDIS_REPLY_ERROR,
};

/*
 * Formats `argc` arguments, packed back to back in `data` with lengths
 * `lens`, as a RESP command. Returns its length and sets *out (free it with
 * luaws_redis_command_free), or -1 on OOM.
 */
static inline long long luaws_redis_format(char **out, int argc, const void *data, const size_t *lens) {
    const char **argv;
    size_t offset = 0;
    int i, n;
    *out = NULL;
    if (argc <= 0) return -1;
    argv = (const char **)malloc(sizeof(char *) * (size_t)argc);
    if (argv == NULL) return -1;
    for (i = 0; i < argc; i++) {
        argv[i] = (const char *)data + offset;
        offset += lens[i];
    }
    n = redisFormatCommandArgv(out, argc, argv, lens);
    free(argv);
    return n < 0 ? -1 : (long long)n;
}

static inline void luaws_redis_command_free(char *command) { redisFreeCommand(command); }

#endif
