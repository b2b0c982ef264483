/*
 * The protected bridge between ScriptHost (Swift) and a Lua state.
 *
 * Invariants:
 *  - Swift calls into Lua only through luaws_open, luaws_call and
 *    luaws_unref; each of them runs its Lua work under lua_pcall, so no Lua
 *    error (syntax, runtime, memory, budget) can longjmp through Swift.
 *  - The C functions Lua can call (the `core` table) are written here and in
 *    luaws_json.h, check their arguments in C, and reach Swift through the
 *    callbacks in luaws_host, which take plain values and never call back
 *    into Lua.
 *  - Every path leaves the Lua stack as it found it.
 *  - Memory: every allocation of the state goes through luaws_alloc, which
 *    refuses (returns NULL, so Lua raises LUA_ERRMEM) past mem_limit.
 *  - CPU: one budget per call from Swift (`remaining`, reset by
 *    luaws_protected) covers the call and every coroutine it runs. A count
 *    hook, set on the main thread before anything runs and so inherited by
 *    every coroutine (lua_newthread copies it), charges LUAWS_HOOK_STEP
 *    instructions each time it fires; a new coroutine starts with a fresh
 *    count, so creating one is charged LUAWS_HOOK_STEP up front. C functions
 *    that can do unbounded work charge by work (luaws_charge). Once the
 *    budget is spent, the running code gets an error and from then on every
 *    instruction of the erring thread and of the main thread errors too
 *    (their count drops to 1), so a script cannot catch the error with pcall
 *    and carry on; any other coroutine errors at its next hook.
 *  - Finalizers never run script code: the sandbox refuses `__gc`
 *    metatables (see the prelude), because hooks do not fire inside them.
 *    The hook never fires inside a C function, so C functions whose work
 *    grows with their input or output (JSON in luaws_json.h, and the string
 *    and table functions of luaws_strlib.h) pay for it with luaws_charge.
 */
#ifndef LUAWS_BRIDGE_H
#define LUAWS_BRIDGE_H

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/time.h>
#include <math.h>

#define LUAWS_ERR_MAX 2048

enum { LUAWS_ARG_NIL, LUAWS_ARG_INT, LUAWS_ARG_NUM, LUAWS_ARG_STR, LUAWS_ARG_REF, LUAWS_ARG_BOOL };

typedef struct luaws_arg {
    int type;
    lua_Integer i;       /* INT, REF (a registry reference), BOOL */
    lua_Number n;        /* NUM */
    const char *s;       /* STR: bytes, not necessarily NUL-terminated */
    size_t len;
} luaws_arg;

/* A value Swift hands back to Lua. A string is malloc'ed by Swift and freed by C. */
enum { LUAWS_REPLY_NIL, LUAWS_REPLY_BOOL, LUAWS_REPLY_NUM, LUAWS_REPLY_STR, LUAWS_REPLY_ERROR, LUAWS_REPLY_INT };

typedef struct luaws_reply {
    int type;
    int boolean;
    lua_Number number;
    lua_Integer integer;
    char *str;           /* STR and ERROR: malloc'ed, owned by C once returned */
    size_t len;
} luaws_reply;

/* What Swift hands to C for one Lua state. Lives as long as the state. */
typedef struct luaws_host {
    void *swift;                 /* the Swift owner (an Unmanaged reference) */
    size_t mem_used;             /* bytes currently allocated by the state */
    size_t mem_limit;            /* 0 = no limit */
    int budget;                  /* VM instructions per call, 0 = no limit */
    lua_Integer remaining;       /* what is left of the current call's budget */
    int budget_hit;              /* set once the current call's budget is spent */
    lua_State *hook_thread;      /* the coroutine running a hook now, or NULL: where core.wait may yield */
    int wait_pending;            /* set by core.wait as it yields: a yield without it is the script's own */
    char error[LUAWS_ERR_MAX];   /* the last error of luaws_call, NUL-terminated */
    const void *conn_mt;         /* the conn metatable (kept in the registry): conn checks compare it */
    int kind_text_ref;           /* registry references of "text" and "binary", on_message's third */
    int kind_binary_ref;         /* argument: pushed without hashing them each time */

    /* Callbacks into Swift. They get plain values and must not call Lua. */
    int (*send)(void *swift, lua_Integer conn, const char *data, size_t len, int binary);
    int (*close)(void *swift, lua_Integer conn, lua_Integer code, const char *reason, size_t len);
    void (*log)(void *swift, int level, const char *msg, size_t len);
    /* Everything else scripts ask of Swift: see luaws_core_command. */
    void (*command)(void *swift, int op, const struct luaws_arg *args, int nargs, struct luaws_reply *reply);
    /* The time scripts see (luaws.now, luaws.utcnow_iso, os.time, os.date), in nanoseconds
     * since the Unix epoch; NULL reads the system clock. `luaws test` sets it to follow its
     * virtual clock. */
    int64_t (*clock_ns)(void *swift);
} luaws_host;

/* ---------- memory ---------- */

static void *luaws_alloc(void *ud, void *ptr, size_t osize, size_t nsize) {
    luaws_host *h = (luaws_host *)ud;
    size_t old = ptr ? osize : 0;   /* with ptr == NULL, osize encodes a type */
    if (nsize == 0) {
        h->mem_used -= old;
        free(ptr);
        return NULL;
    }
    if (h->mem_limit && nsize > old && h->mem_used + (nsize - old) > h->mem_limit)
        return NULL;
    void *p = realloc(ptr, nsize);
    if (p == NULL) return NULL;
    h->mem_used = h->mem_used - old + nsize;
    return p;
}

static inline luaws_host *luaws_host_of(lua_State *L) {
    void *ud = NULL;
    lua_getallocf(L, &ud);
    return (luaws_host *)ud;
}

/* ---------- instruction budget ---------- */

/* How many VM instructions pass between two calls of the count hook. */
#define LUAWS_HOOK_STEP 1000
/* A call that is not budgeted (a field read, an unref) gets this much. */
#define LUAWS_UNLIMITED ((lua_Integer)1 << 62)

static void luaws_budget_hook(lua_State *L, lua_Debug *ar);

/* The budget is spent: from now on every instruction of this thread and of the main
 * thread errors (count 1), then the error is raised here, at the script's line. */
static int luaws_budget_exceeded(lua_State *L) {
    luaws_host *h = luaws_host_of(L);
    h->budget_hit = 1;
    h->remaining = 0;
    lua_sethook(L, luaws_budget_hook, LUA_MASKCOUNT, 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
    lua_State *main = lua_tothread(L, -1);
    lua_pop(L, 1);
    if (main && main != L) lua_sethook(main, luaws_budget_hook, LUA_MASKCOUNT, 1);
    lua_Debug where;
    for (int level = 0; lua_getstack(L, level, &where); level++) {
        if (lua_getinfo(L, "Sl", &where) && where.currentline > 0 && strcmp(where.source, "=luaws-prelude") != 0)
            return luaL_error(L, "%s:%d: instruction budget exceeded (%d instructions)",
                              where.short_src, where.currentline, h->budget);
    }
    return luaL_error(L, "instruction budget exceeded (%d instructions)", h->budget);
}

/* Fires every `lua_gethookcount(L)` instructions of any thread; charges them. */
static void luaws_budget_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    luaws_host *h = luaws_host_of(L);
    int step = lua_gethookcount(L);
    if (!h->budget_hit) {
        h->remaining -= step;
        if (h->remaining > 0) {
            /* A thread left at count 1 by an earlier call's overrun goes back to the normal step. */
            if (step != LUAWS_HOOK_STEP) lua_sethook(L, luaws_budget_hook, LUA_MASKCOUNT, LUAWS_HOOK_STEP);
            return;
        }
    }
    luaws_budget_exceeded(L);
}

/* Charges `units` (VM-instruction equivalents) of work done in C to the running call;
 * raises the budget error when it is spent. For C functions whose work a count hook
 * cannot see (pattern matching, string.rep, table.concat, JSON ...). */
static void luaws_charge(lua_State *L, lua_Integer units) {
    luaws_host *h = luaws_host_of(L);
    if (units <= 0) return;
    if (h->budget_hit || units >= h->remaining) luaws_budget_exceeded(L);
    h->remaining -= units;
}

/* coroutine.create and coroutine.wrap, charged: a new thread starts with a fresh hook
 * count, so up to LUAWS_HOOK_STEP of its instructions would go uncounted. The originals
 * are upvalue 1. */
static int luaws_charged_coroutine(lua_State *L) {
    luaws_charge(L, LUAWS_HOOK_STEP);
    lua_pushvalue(L, lua_upvalueindex(1));
    lua_insert(L, 1);
    lua_call(L, lua_gettop(L) - 1, LUA_MULTRET);
    return lua_gettop(L);
}

static void luaws_charge_coroutines(lua_State *L) {
    static const char *const names[] = {"create", "wrap"};
    lua_getglobal(L, "coroutine");
    for (size_t i = 0; i < 2; i++) {
        lua_getfield(L, -1, names[i]);
        lua_pushcclosure(L, luaws_charged_coroutine, 1);
        lua_setfield(L, -2, names[i]);
    }
    lua_pop(L, 1);
}

/* One budget unit buys this many bytes copied or scanned (a VM instruction costs about as much
 * as a memcpy of 32 bytes). */
#define LUAWS_BYTES_PER_UNIT 32

/* ceil(log2(n)), at least 1: for charging n log n sorts. */
static lua_Integer luaws_log2_ceil(lua_Integer n) {
    lua_Integer bits = 1;
    while (bits < 62 && ((lua_Integer)1 << bits) < n) bits++;
    return bits;
}

#include "luaws_json.h"
#include "luaws_strlib.h"

/* ---------- UTF-8 ---------- */

/* Whether s[0..len) is well-formed UTF-8 (RFC 3629: no overlong forms, no surrogates,
 * nothing past U+10FFFF): what a text frame may carry. ASCII runs are checked 8 bytes
 * at a time, since most text is ASCII. */
static int luaws_utf8_valid(const unsigned char *s, size_t len) {
    size_t i = 0;
    while (i < len) {
        if (i + 8 <= len) {
            uint64_t word;
            memcpy(&word, s + i, 8);
            if ((word & 0x8080808080808080ULL) == 0) { i += 8; continue; }
        }
        unsigned char c = s[i];
        if (c < 0x80) { i++; continue; }
        size_t n;
        uint32_t cp;
        if (c >= 0xC2 && c <= 0xDF) { n = 1; cp = c & 0x1F; }
        else if (c >= 0xE0 && c <= 0xEF) { n = 2; cp = c & 0x0F; }
        else if (c >= 0xF0 && c <= 0xF4) { n = 3; cp = c & 0x07; }
        else return 0;
        if (len - i - 1 < n) return 0;
        for (size_t k = 1; k <= n; k++) {
            unsigned char d = s[i + k];
            if ((d & 0xC0) != 0x80) return 0;
            cp = (cp << 6) | (d & 0x3F);
        }
        if ((n == 2 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (n == 3 && (cp < 0x10000 || cp > 0x10FFFF)))
            return 0;
        i += n + 1;
    }
    return 1;
}

/* core.utf8_valid(s) -> boolean */
static int luaws_core_utf8_valid(lua_State *L) {
    size_t len = 0;
    const char *s = luaL_checklstring(L, 1, &len);
    lua_pushboolean(L, luaws_utf8_valid((const unsigned char *)s, len));
    return 1;
}

/* ---------- the core functions scripts reach through the prelude ---------- */

/* ---------- connections ----------
 *
 * A `conn` is a full userdata holding its id, so no script can change which connection
 * it talks to (a table's `id` could be overwritten, even with rawset). Its one user value
 * is a table of its other fields (path, protocol, data, the script's own fields ...),
 * reached through the metatable registered as LUAWS_CONN_MT. */

#define LUAWS_CONN_MT "luaws.conn"

typedef struct luaws_conn { lua_Integer id; } luaws_conn;

/* The id of the conn at `idx`; a Lua error if it is not a conn. The metatable is compared
 * by address (luaL_checkudata would look its name up in the registry on every call). */
static lua_Integer luaws_conn_id(lua_State *L, int idx) {
    if (lua_type(L, idx) == LUA_TUSERDATA && lua_getmetatable(L, idx)) {
        const void *mt = lua_topointer(L, -1);
        lua_pop(L, 1);
        if (mt == luaws_host_of(L)->conn_mt) return ((luaws_conn *)lua_touserdata(L, idx))->id;
    }
    luaL_typeerror(L, idx, LUAWS_CONN_MT);
    return 0;
}

/* conn:send(text, ...) and conn:send_binary(bytes, ...). Written in C because it is the hot
 * path. Several arguments make one message, their bytes one after the other, joined in a C
 * buffer (on the C stack up to LUAL_BUFFERSIZE): `conn:send("Message received: ", msg)`
 * leaves no string behind for the collector, where `..` makes (and hashes) one per message.
 * Text must be valid UTF-8 as a whole (a text frame with anything else makes clients fail the
 * connection): anything else is the script's error, at its line. */
static int luaws_conn_send_kind(lua_State *L, int binary) {
    luaws_host *h = luaws_host_of(L);
    lua_Integer id = luaws_conn_id(L, 1);
    int top = lua_gettop(L);
    size_t len = 0;
    const char *data;
    luaL_Buffer b;
    if (top <= 2) {
        if (binary || lua_type(L, 2) == LUA_TSTRING) data = luaL_checklstring(L, 2, &len);
        else data = luaL_tolstring(L, 2, &len);   /* any other value, as tostring() would show it */
    } else {
        luaL_buffinit(L, &b);
        for (int i = 2; i <= top; i++) {
            if (binary || lua_type(L, i) == LUA_TSTRING) {
                size_t part = 0;
                const char *s = luaL_checklstring(L, i, &part);
                luaL_addlstring(&b, s, part);
            } else {
                luaL_tolstring(L, i, NULL);
                luaL_addvalue(&b);
            }
        }
        data = luaL_buffaddr(&b);
        len = luaL_bufflen(&b);
        luaws_charge(L, 1 + (lua_Integer)(len / LUAWS_BYTES_PER_UNIT));  /* as table.concat */
    }
    if (!binary && !luaws_utf8_valid((const unsigned char *)data, len))
        return luaL_argerror(L, 2, "text is not valid UTF-8 (use conn:send_binary for bytes)");
    lua_pushboolean(L, h->send(h->swift, id, data, len, binary) == 0);
    return 1;
}
static int luaws_conn_send(lua_State *L) { return luaws_conn_send_kind(L, 0); }
static int luaws_conn_send_binary(lua_State *L) { return luaws_conn_send_kind(L, 1); }

/* Conn.__index(conn, key): a method from upvalue 1 (a table), else the conn's own field,
 * else upvalue 2 (a Lua function(conn, key, fields) that makes lazy fields). In C because
 * every conn:send goes through it. */
static int luaws_conn_index(lua_State *L) {
    lua_settop(L, 2);
    lua_pushvalue(L, 2);
    if (lua_rawget(L, lua_upvalueindex(1)) != LUA_TNIL) return 1;
    lua_pop(L, 1);
    lua_getiuservalue(L, 1, 1);           /* 3: fields */
    lua_pushvalue(L, 2);
    if (lua_rawget(L, 3) != LUA_TNIL) return 1;
    lua_pop(L, 1);
    lua_pushvalue(L, lua_upvalueindex(2));
    lua_insert(L, 1);                     /* lazy, conn, key, fields */
    lua_call(L, 3, 1);
    return 1;
}

/* core.conn_class(methods, lazy, newindex, tostring): registers the conn metatable. */
static int luaws_core_conn_class(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    luaL_checktype(L, 3, LUA_TFUNCTION);
    luaL_checktype(L, 4, LUA_TFUNCTION);
    luaL_newmetatable(L, LUAWS_CONN_MT);  /* 5 */
    luaws_host_of(L)->conn_mt = lua_topointer(L, 5);
    lua_pushvalue(L, 1);
    lua_pushvalue(L, 2);
    lua_pushcclosure(L, luaws_conn_index, 2);
    lua_setfield(L, 5, "__index");
    lua_pushvalue(L, 3);
    lua_setfield(L, 5, "__newindex");
    lua_pushvalue(L, 4);
    lua_setfield(L, 5, "__tostring");
    lua_pushliteral(L, "luaws.conn");
    lua_setfield(L, 5, "__metatable");
    lua_settop(L, 0);
    return 0;
}

/* core.new_conn(id, fields) -> conn */
static int luaws_core_new_conn(lua_State *L) {
    lua_Integer id = luaL_checkinteger(L, 1);
    luaL_checktype(L, 2, LUA_TTABLE);
    luaws_conn *c = (luaws_conn *)lua_newuserdatauv(L, sizeof(luaws_conn), 1);
    c->id = id;
    lua_pushvalue(L, 2);
    lua_setiuservalue(L, -2, 1);
    luaL_setmetatable(L, LUAWS_CONN_MT);
    return 1;
}

/* core.conn_id(conn) -> id; core.conn_fields(conn) -> its field table (prelude only). */
static int luaws_core_conn_id(lua_State *L) {
    lua_pushinteger(L, luaws_conn_id(L, 1));
    return 1;
}
static int luaws_core_conn_fields(lua_State *L) {
    luaws_conn_id(L, 1);
    lua_getiuservalue(L, 1, 1);
    return 1;
}

/* conn:close([code [, reason]]): a method in C so that a bad argument is reported at the
 * script's line. */
static int luaws_conn_close(lua_State *L) {
    luaws_host *h = luaws_host_of(L);
    lua_Integer id = luaws_conn_id(L, 1);
    lua_Integer code = luaL_optinteger(L, 2, 1000);
    size_t len = 0;
    const char *reason = luaL_optlstring(L, 3, "", &len);
    if (!(code == 1000 || (code >= 3000 && code <= 4999) || (code >= 1001 && code <= 1014 && code != 1004 && code != 1005 && code != 1006)))
        return luaL_argerror(L, 2, "not a close code a server may send (1000-1014 but 1004-1006, or 3000-4999)");
    if (len > 123)
        return luaL_argerror(L, 3, "close reason longer than 123 bytes");
    if (!luaws_utf8_valid((const unsigned char *)reason, len))
        return luaL_argerror(L, 3, "close reason is not valid UTF-8");
    lua_pushboolean(L, h->close(h->swift, id, code, reason, len) == 0);
    return 1;
}

static int luaws_core_log(lua_State *L) {
    luaws_host *h = luaws_host_of(L);
    int level = (int)luaL_checkinteger(L, 1);
    size_t len = 0;
    const char *msg = luaL_checklstring(L, 2, &len);
    h->log(h->swift, level, msg, len);
    return 0;
}

/* The time scripts see: the host's clock if it has one, else the system's. */
static void luaws_now(lua_State *L, struct timespec *ts) {
    luaws_host *h = luaws_host_of(L);
    if (h->clock_ns == NULL) {
        clock_gettime(CLOCK_REALTIME, ts);
        return;
    }
    int64_t ns = h->clock_ns(h->swift);
    int64_t sec = ns / 1000000000;
    int64_t rem = ns % 1000000000;
    if (rem < 0) { rem += 1000000000; sec -= 1; }
    ts->tv_sec = (time_t)sec;
    ts->tv_nsec = (long)rem;
}

/* Python's datetime.utcnow().isoformat(): microseconds only when non-zero. */
static int luaws_core_utcnow_iso(lua_State *L) {
    struct timespec ts;
    luaws_now(L, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    char buf[64];
    size_t n = strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm);
    long micros = ts.tv_nsec / 1000;
    if (micros != 0) n += (size_t)snprintf(buf + n, sizeof buf - n, ".%06ld", micros);
    lua_pushlstring(L, buf, n);
    return 1;
}

static int luaws_core_now(lua_State *L) {
    struct timespec ts;
    luaws_now(L, &ts);
    lua_pushnumber(L, (lua_Number)ts.tv_sec + (lua_Number)ts.tv_nsec / 1e9);
    return 1;
}

/* Pushes "file:line: " of the innermost running function that is not the prelude's (the
 * script line that asked for something), or "" if there is none. */
static void luaws_where_script(lua_State *L) {
    lua_Debug ar;
    for (int level = 1; lua_getstack(L, level, &ar); level++) {
        if (!lua_getinfo(L, "Sl", &ar)) break;
        if (ar.currentline > 0 && strcmp(ar.source, "=luaws-prelude") != 0) {
            lua_pushfstring(L, "%s:%d: ", ar.short_src, ar.currentline);
            return;
        }
    }
    lua_pushliteral(L, "");
}

/* Pushes a reply; frees its string. Raises for LUAWS_REPLY_ERROR. */
static int luaws_push_reply(lua_State *L, luaws_reply *r) {
    switch (r->type) {
    case LUAWS_REPLY_BOOL: lua_pushboolean(L, r->boolean); break;
    case LUAWS_REPLY_NUM: lua_pushnumber(L, r->number); break;
    case LUAWS_REPLY_INT: lua_pushinteger(L, r->integer); break;
    case LUAWS_REPLY_STR:
    case LUAWS_REPLY_ERROR: {
        /* Copy into Lua before raising or returning; the pushes may fail with a memory
         * error, so the malloc'ed string is parked in a to-be-closed slot first. */
        char *str = r->str;
        size_t len = r->len;
        r->str = NULL;
        void **box = (void **)lua_newuserdatauv(L, sizeof(void *), 0);
        *box = str;
        luaL_setmetatable(L, "luaws.malloc");
        lua_toclose(L, -1);
        if (r->type == LUAWS_REPLY_ERROR) {
            luaws_where_script(L);   /* the script's file:line, past prelude frames */
            lua_pushlstring(L, str ? str : "", len);
            lua_concat(L, 2);
            return lua_error(L);
        }
        lua_pushlstring(L, str ? str : "", len);
        break;
    }
    default: lua_pushnil(L); break;
    }
    return 1;
}

static int luaws_free_box(lua_State *L) {
    void **box = (void **)luaL_checkudata(L, 1, "luaws.malloc");
    free(*box);
    *box = NULL;
    return 0;
}

#define LUAWS_MAX_COMMAND_ARGS 8

/* core.command(op, ...): numbers, strings, booleans and nils go to Swift's command callback. */
static int luaws_core_command(lua_State *L) {
    luaws_host *h = luaws_host_of(L);
    int op = (int)luaL_checkinteger(L, 1);
    int nargs = lua_gettop(L) - 1;
    if (nargs > LUAWS_MAX_COMMAND_ARGS) return luaL_error(L, "too many arguments");
    luaws_arg args[LUAWS_MAX_COMMAND_ARGS];
    for (int k = 0; k < nargs; k++) {
        int idx = k + 2;
        luaws_arg *a = &args[k];
        memset(a, 0, sizeof *a);
        switch (lua_type(L, idx)) {
        case LUA_TNIL: a->type = LUAWS_ARG_NIL; break;
        case LUA_TBOOLEAN: a->type = LUAWS_ARG_BOOL; a->i = lua_toboolean(L, idx); break;
        case LUA_TNUMBER:
            if (lua_isinteger(L, idx)) { a->type = LUAWS_ARG_INT; a->i = lua_tointeger(L, idx); }
            else { a->type = LUAWS_ARG_NUM; a->n = lua_tonumber(L, idx); }
            break;
        case LUA_TSTRING: a->type = LUAWS_ARG_STR; a->s = lua_tolstring(L, idx, &a->len); break;
        default: return luaL_argerror(L, idx, "expected a string, number, boolean or nil");
        }
    }
    luaws_reply reply;
    memset(&reply, 0, sizeof reply);
    h->command(h->swift, op, args, nargs, &reply);
    return luaws_push_reply(L, &reply);
}

/* core.wait(op, ...): suspends the running hook until Swift has done `op` (a sleep, an HTTP
 * request ...); the values Swift resumes it with are core.wait's results. Only the hook's own
 * coroutine may wait: not a plugin's top level (it runs while the plugin set loads, outside
 * any hook) and not a coroutine the script made (its yield would go to the script). */
static int luaws_core_wait(lua_State *L) {
    luaws_host *h = luaws_host_of(L);
    luaL_checkinteger(L, 1);
    if (lua_gettop(L) > LUAWS_MAX_COMMAND_ARGS + 1) return luaL_error(L, "too many arguments");
    const char *refusal = NULL;
    if (h->hook_thread == NULL)
        refusal = "waiting calls (luaws.sleep, luaws.http, luaws.redis) are only available in hooks, routes and timer callbacks, not at a plugin's top level";
    else if (L != h->hook_thread || !lua_isyieldable(L))
        refusal = "waiting calls cannot be made inside a coroutine the script created, nor inside a C function such as table.sort's comparator or string.gsub's replacement";
    if (refusal) {
        luaws_where_script(L);   /* at the script's line, not the prelude wrapper's */
        lua_pushstring(L, refusal);
        lua_concat(L, 2);
        return lua_error(L);
    }
    h->wait_pending = 1;
    return lua_yield(L, lua_gettop(L));
}

/* An error raised inside the prelude (a bad argument to a luaws function, say) is the
 * script's doing: rewrites "luaws-prelude:N: text" to the script's file:line that called into
 * the prelude, looking at `co`'s stack. Pushes the message to use onto L. */
static const char *luaws_script_message(lua_State *L, lua_State *co, const char *msg) {
    static const char prelude[] = "luaws-prelude:";
    if (strncmp(msg, prelude, sizeof prelude - 1) == 0) {
        const char *rest = strstr(msg + sizeof prelude - 1, ": ");
        lua_Debug ar;
        for (int level = 0; rest && lua_getstack(co, level, &ar); level++) {
            if (!lua_getinfo(co, "Sl", &ar)) break;
            if (ar.currentline > 0 && strcmp(ar.source, "=luaws-prelude") != 0)
                return lua_pushfstring(L, "%s:%d: %s", ar.short_src, ar.currentline, rest + 2);
        }
    }
    return lua_pushstring(L, msg);
}

/* Message handler: the error with a traceback. Written in C so that it runs
 * even when the budget hook makes every Lua instruction fail. */
static int luaws_msgh(lua_State *L) {
    const char *msg = lua_tostring(L, 1);
    if (msg == NULL) {
        if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) return 1;
        msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    }
    msg = luaws_script_message(L, L, msg);
    luaL_traceback(L, L, msg, 1);
    return 1;
}

static void luaws_push_core(lua_State *L) {
    static const luaL_Reg core[] = {
        {"conn_send", luaws_conn_send},
        {"conn_send_binary", luaws_conn_send_binary},
        {"conn_close", luaws_conn_close},
        {"conn_class", luaws_core_conn_class},
        {"new_conn", luaws_core_new_conn},
        {"conn_id", luaws_core_conn_id},
        {"conn_fields", luaws_core_conn_fields},
        {"utf8_valid", luaws_core_utf8_valid},
        {"log", luaws_core_log},
        {"utcnow_iso", luaws_core_utcnow_iso},
        {"now", luaws_core_now},
        {"command", luaws_core_command},
        {"wait", luaws_core_wait},
        {NULL, NULL},
    };
    /* Metatables that free C memory when a call ends, normally or by error. */
    static const struct { const char *name; lua_CFunction fn; } closers[] = {
        {"luaws.malloc", luaws_free_box},
    };
    for (size_t i = 0; i < sizeof closers / sizeof closers[0]; i++) {
        luaL_newmetatable(L, closers[i].name);
        lua_pushcfunction(L, closers[i].fn);
        lua_setfield(L, -2, "__close");
        lua_pushcfunction(L, closers[i].fn);
        lua_setfield(L, -2, "__gc");
        lua_pop(L, 1);
    }
    luaL_newlib(L, core);
    lua_pushlightuserdata(L, NULL);
    lua_setfield(L, -2, "null");
    luaws_json_register(L, lua_gettop(L));
}

/* ---------- protected calls from Swift ---------- */


typedef struct luaws_result {
    int type;            /* the Lua type of the first result (LUA_TNIL if none) */
    int boolean;         /* its truth value */
    lua_Number number;   /* its value if a number */
    int ref;             /* a registry reference to it, if asked and not nil; else LUA_NOREF */
    const char *str;     /* its bytes if a string: valid only until the next call into Lua */
    size_t len;
} luaws_result;

typedef struct luaws_call_frame {
    int fn;                    /* registry reference of the function */
    const luaws_arg *args;
    int nargs;
    int want_ref;
    luaws_result *result;
} luaws_call_frame;

/* Describes the value on top of the stack in *r; with want_ref, pops it into the registry. */
static void luaws_fill_result(lua_State *L, luaws_result *r, int want_ref) {
    r->type = lua_type(L, -1);
    r->boolean = lua_toboolean(L, -1);
    r->number = r->type == LUA_TNUMBER ? lua_tonumber(L, -1) : 0;
    r->str = r->type == LUA_TSTRING ? lua_tolstring(L, -1, &r->len) : NULL;
    r->ref = LUA_NOREF;
    if (want_ref && r->type != LUA_TNIL) r->ref = luaL_ref(L, LUA_REGISTRYINDEX);
}

/* Pushes one argument from Swift (a registry reference pushes what it refers to). */
static void luaws_push_arg(lua_State *L, const luaws_arg *a) {
    switch (a->type) {
    case LUAWS_ARG_INT: lua_pushinteger(L, a->i); break;
    case LUAWS_ARG_NUM: lua_pushnumber(L, a->n); break;
    case LUAWS_ARG_STR: lua_pushlstring(L, a->s, a->len); break;
    case LUAWS_ARG_REF: lua_rawgeti(L, LUA_REGISTRYINDEX, a->i); break;
    case LUAWS_ARG_BOOL: lua_pushboolean(L, (int)a->i); break;
    default: lua_pushnil(L); break;
    }
}

static int luaws_call_trampoline(lua_State *L) {
    luaws_call_frame *f = (luaws_call_frame *)lua_touserdata(L, 1);
    luaL_checkstack(L, f->nargs + 2, "too many arguments");
    lua_rawgeti(L, LUA_REGISTRYINDEX, f->fn);
    for (int k = 0; k < f->nargs; k++) luaws_push_arg(L, &f->args[k]);
    lua_call(L, f->nargs, 1);
    luaws_fill_result(L, f->result, f->want_ref);
    return 0;
}

static void luaws_copy_error(lua_State *L, luaws_host *h, int status) {
    const char *msg = NULL;
    size_t len = 0;
    if (lua_type(L, -1) == LUA_TSTRING) msg = lua_tolstring(L, -1, &len);
    if (status == LUA_ERRMEM) {
        snprintf(h->error, LUAWS_ERR_MAX, "memory limit exceeded (%zu bytes): not enough memory", h->mem_limit);
    } else if (msg) {
        if (len >= LUAWS_ERR_MAX) len = LUAWS_ERR_MAX - 1;
        memcpy(h->error, msg, len);
        h->error[len] = 0;
    } else {
        snprintf(h->error, LUAWS_ERR_MAX, "(error object is a %s value)", luaL_typename(L, -1));
    }
}

/* Runs fn(frame) under lua_pcall with luaws_msgh as message handler and, with
 * `budgeted`, the instruction budget armed. Returns a LUA_OK/LUA_ERR* status;
 * on error the message (with traceback) is in h->error. The stack is left as
 * it was found. */
/* A new call from Swift: no error yet, and a whole budget (or none). The count hook stays
 * armed on every thread; it charges what the call runs against h->remaining. */
static inline void luaws_begin_call(luaws_host *h, int budgeted) {
    h->error[0] = 0;
    h->budget_hit = 0;
    h->remaining = budgeted && h->budget > 0 ? (lua_Integer)h->budget : LUAWS_UNLIMITED;
}

static int luaws_protected(lua_State *L, lua_CFunction fn, void *frame, int budgeted) {
    luaws_host *h = luaws_host_of(L);
    int top = lua_gettop(L);
    luaws_begin_call(h, budgeted);
    if (!lua_checkstack(L, 3)) {
        snprintf(h->error, LUAWS_ERR_MAX, "Lua stack overflow");
        return LUA_ERRMEM;
    }
    lua_pushcfunction(L, luaws_msgh);
    lua_pushcfunction(L, fn);
    lua_pushlightuserdata(L, frame);
    int status = lua_pcall(L, 1, 0, top + 1);
    if (status != LUA_OK) luaws_copy_error(L, h, status);
    lua_settop(L, top);
    return status;
}

static inline void luaws_clear_result(luaws_result *r) {
    r->type = LUA_TNIL; r->boolean = 0; r->number = 0; r->ref = LUA_NOREF; r->str = NULL; r->len = 0;
}

/* Calls the function behind registry reference `fn` with `args`, protected,
 * under the instruction budget. */
static inline int luaws_call(lua_State *L, int fn, const luaws_arg *args, int nargs, int want_ref, luaws_result *result) {
    luaws_call_frame frame = {fn, args, nargs, want_ref, result};
    luaws_clear_result(result);
    return luaws_protected(L, luaws_call_trampoline, &frame, 1);
}

typedef struct luaws_index_frame {
    int table;
    const char *key;
    int want_ref;
    luaws_result *result;
} luaws_index_frame;

static int luaws_index_trampoline(lua_State *L) {
    luaws_index_frame *f = (luaws_index_frame *)lua_touserdata(L, 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, f->table);
    lua_getfield(L, -1, f->key);
    luaws_fill_result(L, f->result, f->want_ref);
    return 0;
}

/* Reads field `key` of the table behind registry reference `table`, protected. */
static inline int luaws_index(lua_State *L, int table, const char *key, int want_ref, luaws_result *result) {
    luaws_index_frame frame = {table, key, want_ref, result};
    luaws_clear_result(result);
    return luaws_protected(L, luaws_index_trampoline, &frame, 0);
}

/* ---------- hooks in coroutines ----------
 *
 * Every hook runs in a coroutine of its own (pooled by Swift), so that it can wait: a call
 * such as luaws.sleep yields (core.wait) with an operation for Swift, which resumes the
 * coroutine with the answer. Each start and each resume is one protected call from Swift
 * with a whole instruction budget. A coroutine that finished is reusable at once; one that
 * failed or was abandoned is reset (lua_resetthread) first. */

enum { LUAWS_RUN_DONE, LUAWS_RUN_SUSPENDED, LUAWS_RUN_FAILED };

typedef struct luaws_run {
    int state;                                  /* LUAWS_RUN_* */
    int truthy;                                 /* DONE: the hook's first result was true */
    lua_Integer op;                             /* SUSPENDED: what to do (core.wait's op) */
    luaws_arg args[LUAWS_MAX_COMMAND_ARGS];     /* SUSPENDED: its arguments; strings stay on the coroutine's stack until it is resumed */
    int nargs;
} luaws_run;

typedef struct luaws_run_frame {
    lua_State *co;
    int fn;                      /* LUA_NOREF: resume, else start this function */
    const luaws_arg *args;
    int nargs;
    luaws_run *run;
    int status;                  /* what lua_resume returned */
    int nres;                    /* and how many values it left */
    int waited;                  /* the coroutine yielded through core.wait */
} luaws_run_frame;

/* Describes the yielded values (op, args...) on the coroutine's stack in *run. */
static int luaws_read_yield(lua_State *co, int n, luaws_run *run) {
    if (n < 1 || !lua_isinteger(co, -n)) return 0;
    run->op = lua_tointeger(co, -n);
    run->nargs = n - 1;
    for (int k = 0; k < run->nargs; k++) {
        int idx = -n + 1 + k;
        luaws_arg *a = &run->args[k];
        memset(a, 0, sizeof *a);
        switch (lua_type(co, idx)) {
        case LUA_TBOOLEAN: a->type = LUAWS_ARG_BOOL; a->i = lua_toboolean(co, idx); break;
        case LUA_TNUMBER:
            if (lua_isinteger(co, idx)) { a->type = LUAWS_ARG_INT; a->i = lua_tointeger(co, idx); }
            else { a->type = LUAWS_ARG_NUM; a->n = lua_tonumber(co, idx); }
            break;
        case LUA_TSTRING: a->type = LUAWS_ARG_STR; a->s = lua_tolstring(co, idx, &a->len); break;
        default: a->type = LUAWS_ARG_NIL; break;
        }
    }
    return 1;
}

/* Resumes f->co with the `nargs` values on its stack top, as the running hook's coroutine
 * (the one core.wait may yield): what lua_resume returned, and whether the coroutine yielded
 * through core.wait, are left in the frame for luaws_run_finish. */
static inline void luaws_resume_hook(lua_State *L, luaws_run_frame *f, int nargs) {
    luaws_host *h = luaws_host_of(L);
    h->hook_thread = f->co;
    h->wait_pending = 0;
    f->status = lua_resume(f->co, L, nargs, &f->nres);
    h->hook_thread = NULL;
    f->waited = h->wait_pending;
    h->wait_pending = 0;
}

/* The resume path: the answer is pushed on the main thread (where a memory error is caught:
 * this runs under luaws_protected) and moved onto the coroutine in place of what it yielded. */
static int luaws_run_trampoline(lua_State *L) {
    luaws_run_frame *f = (luaws_run_frame *)lua_touserdata(L, 1);
    lua_State *co = f->co;
    lua_settop(co, 0);
    luaL_checkstack(L, f->nargs + 2, "too many arguments");
    if (!lua_checkstack(co, f->nargs + 2)) return luaL_error(L, "coroutine stack overflow");
    for (int k = 0; k < f->nargs; k++) luaws_push_arg(L, &f->args[k]);
    lua_xmove(L, co, f->nargs);
    luaws_resume_hook(L, f, f->nargs);
    return 0;
}

/* The start path's coroutine body: pushes the hook and its arguments on the coroutine itself
 * (a memory error here is the coroutine's error, which lua_resume catches, so starting a
 * hook needs no protected call around it), then calls the hook so that it may yield. */
static int luaws_hook_body_k(lua_State *co, int status, lua_KContext ctx) {
    (void)status; (void)ctx;
    return 1;   /* the hook's first result (after it waited) */
}
static int luaws_hook_body(lua_State *co) {
    const luaws_run_frame *f = (const luaws_run_frame *)lua_touserdata(co, 1);
    int nargs = f->nargs;
    lua_settop(co, 0);
    luaL_checkstack(co, nargs + 1, "too many arguments");
    lua_rawgeti(co, LUA_REGISTRYINDEX, f->fn);
    for (int k = 0; k < nargs; k++) luaws_push_arg(co, &f->args[k]);
    lua_callk(co, nargs, 1, 0, luaws_hook_body_k);
    return 1;       /* the hook's first result */
}

/* The error of a failed hook and where it happened, from the dead coroutine's stack, into
 * h->error; then the coroutine is reset. Formats on the main thread: run under luaws_protected. */
static int luaws_run_failed_trampoline(lua_State *L) {
    luaws_run_frame *f = (luaws_run_frame *)lua_touserdata(L, 1);
    luaws_host *h = luaws_host_of(L);
    lua_State *co = f->co;
    const char *msg = lua_tostring(co, -1);
    if (f->status == LUA_ERRMEM)
        msg = lua_pushfstring(L, "memory limit exceeded (%d bytes): not enough memory", (int)h->mem_limit);
    else if (msg == NULL)
        msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(co, -1));
    msg = luaws_script_message(L, co, msg);
    luaL_traceback(L, co, msg, 0);
    size_t len = 0;
    const char *text = lua_tolstring(L, -1, &len);
    if (len >= LUAWS_ERR_MAX) len = LUAWS_ERR_MAX - 1;
    memcpy(h->error, text, len);
    h->error[len] = 0;
    lua_settop(co, 0);
    lua_resetthread(co);
    return 0;
}

/* What lua_resume returned becomes *run (DONE or SUSPENDED, LUA_OK), or an error status with
 * the message in h->error. The DONE and SUSPENDED paths allocate nothing (they run outside
 * any protected call). */
static int luaws_run_finish(lua_State *L, luaws_run_frame *f) {
    luaws_host *h = luaws_host_of(L);
    lua_State *co = f->co;
    luaws_run *run = f->run;
    if (f->status == LUA_OK) {
        run->state = LUAWS_RUN_DONE;
        run->truthy = f->nres > 0 && lua_toboolean(co, -f->nres);
        lua_settop(co, 0);
        return LUA_OK;
    }
    if (f->status == LUA_YIELD) {
        run->state = LUAWS_RUN_SUSPENDED;
        if (f->waited && luaws_read_yield(co, f->nres, run)) return LUA_OK;
        /* Not a yield of core.wait: the script's own coroutine.yield in the hook itself
         * (which must not pass for a request to the server, whatever it yields). */
        lua_settop(co, 0);
        lua_resetthread(co);
        run->state = LUAWS_RUN_FAILED;
        snprintf(h->error, LUAWS_ERR_MAX, "a hook yielded with coroutine.yield outside a coroutine of its own");
        return LUA_ERRRUN;
    }
    run->state = LUAWS_RUN_FAILED;
    int status = f->status;
    if (luaws_protected(L, luaws_run_failed_trampoline, f, 0) != LUA_OK) {
        lua_settop(co, 0);   /* h->error has what went wrong while formatting */
        lua_resetthread(co);
    }
    return status;
}

/* Starts `fn` (a registry reference) with `args` in coroutine `co`, or with fn == LUA_NOREF
 * resumes `co` with `args` as the results of its core.wait, under a whole instruction
 * budget. Returns LUA_OK with *run describing the outcome (DONE or SUSPENDED), or an error
 * status with the message and traceback in h->error (the coroutine has been reset). The
 * budget error and a memory error inside the hook arrive here as the coroutine's error.
 *
 * Starting a hook is the hot path (every message): it pushes only a C function and a light
 * userdata on the coroutine (neither allocates, so no protected call is needed) and resumes
 * it; luaws_hook_body does the rest inside the coroutine. */
static inline int luaws_run_hook(lua_State *L, lua_State *co, int fn, const luaws_arg *args, int nargs, luaws_run *run) {
    luaws_run_frame frame = {co, fn, args, nargs, run, LUA_OK, 0, 0};
    luaws_host *h = luaws_host_of(L);
    run->state = LUAWS_RUN_FAILED;
    run->truthy = 0;
    run->nargs = 0;
    if (fn == LUA_NOREF) {
        /* Failing before the resume (no memory for the answer) leaves the coroutine
         * suspended: the caller discards it, as it does every coroutine whose hook failed. */
        int status = luaws_protected(L, luaws_run_trampoline, &frame, 1);
        return status != LUA_OK ? status : luaws_run_finish(L, &frame);
    }
    luaws_begin_call(h, 1);
    if (!lua_checkstack(co, 2)) {
        snprintf(h->error, LUAWS_ERR_MAX, "coroutine stack overflow");
        return LUA_ERRMEM;
    }
    lua_pushcfunction(co, luaws_hook_body);
    lua_pushlightuserdata(co, &frame);
    luaws_resume_hook(L, &frame, 1);
    return luaws_run_finish(L, &frame);
}

static int luaws_newthread_trampoline(lua_State *L) {
    void **out = (void **)lua_touserdata(L, 1);
    lua_State *co = lua_newthread(L);
    *(int *)out[1] = luaL_ref(L, LUA_REGISTRYINDEX);
    out[0] = co;
    return 0;
}

/* A new coroutine for the pool, kept alive by a registry reference (*ref); NULL on failure. */
static inline lua_State *luaws_new_coroutine(lua_State *L, int *ref) {
    void *out[2] = {NULL, ref};
    *ref = LUA_NOREF;
    if (luaws_protected(L, luaws_newthread_trampoline, out, 0) != LUA_OK) return NULL;
    return (lua_State *)out[0];
}

static int luaws_reset_trampoline(lua_State *L) {
    lua_State *co = (lua_State *)lua_touserdata(L, 1);
    lua_settop(co, 0);
    lua_resetthread(co);
    return 0;
}

/* Abandons what coroutine `co` was doing (a hook that waited too long): its pending
 * to-be-closed variables are closed, under the budget, and it is ready for reuse. */
static inline void luaws_reset_coroutine(lua_State *L, lua_State *co) {
    (void)luaws_protected(L, luaws_reset_trampoline, co, 1);
}

static int luaws_unref_trampoline(lua_State *L) {
    luaL_unref(L, LUA_REGISTRYINDEX, *(int *)lua_touserdata(L, 1));
    return 0;
}

static inline void luaws_unref(lua_State *L, int ref) {
    if (ref == LUA_NOREF || ref == LUA_REFNIL) return;
    (void)luaws_protected(L, luaws_unref_trampoline, &ref, 0);
}

/* Compiles and runs `src` (the prelude) with the core table as its argument;
 * its one result is returned as a registry reference in *ref. */
static int luaws_load_trampoline(lua_State *L) {
    const char *src = (const char *)lua_touserdata(L, 1);
    size_t len = (size_t)lua_tointeger(L, 2);
    const char *name = (const char *)lua_touserdata(L, 3);
    int *ref = (int *)lua_touserdata(L, 4);
    luaL_openlibs(L);
    luaws_charge_coroutines(L);
    luaws_open_charged_libs(L);   /* before the prelude copies `string` and `table` into sandboxes */
    luaws_host *h = luaws_host_of(L);
    lua_pushliteral(L, "text");
    h->kind_text_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pushliteral(L, "binary");
    h->kind_binary_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    if (luaL_loadbufferx(L, src, len, name, "t") != LUA_OK) return lua_error(L);
    luaws_push_core(L);
    lua_call(L, 1, 1);
    *ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 0;
}

static int luaws_panic(lua_State *L) {
    const char *msg = lua_tostring(L, -1);
    fprintf(stderr, "luaws: unprotected Lua error (a bug in luaws): %s\n", msg ? msg : "?");
    return 0; /* Lua aborts after this */
}

/* Creates a state with the capped allocator, opens the standard libraries
 * and runs the prelude. Returns NULL (message in h->error) on failure. */
static inline lua_State *luaws_open(luaws_host *h, const char *prelude, size_t len, const char *name, int *prelude_ref) {
    h->mem_used = 0;
    h->error[0] = 0;
    lua_State *L = lua_newstate(luaws_alloc, h);
    if (L == NULL) {
        snprintf(h->error, LUAWS_ERR_MAX, "cannot create a Lua state (memory limit too small?)");
        return NULL;
    }
    lua_atpanic(L, luaws_panic);
    /* Before anything runs, so that every coroutine inherits it. */
    h->remaining = LUAWS_UNLIMITED;
    h->budget_hit = 0;
    lua_sethook(L, luaws_budget_hook, LUA_MASKCOUNT, LUAWS_HOOK_STEP);
    lua_pushcfunction(L, luaws_msgh);
    lua_pushcfunction(L, luaws_load_trampoline);
    lua_pushlightuserdata(L, (void *)prelude);
    lua_pushinteger(L, (lua_Integer)len);
    lua_pushlightuserdata(L, (void *)name);
    lua_pushlightuserdata(L, prelude_ref);
    int status = lua_pcall(L, 4, 0, 1);
    if (status != LUA_OK) {
        luaws_copy_error(L, h, status);
        lua_close(L);
        return NULL;
    }
    lua_settop(L, 0);
    return L;
}

#endif
