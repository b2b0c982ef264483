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
 *  - CPU: luaws_call arms a count hook; past `budget` VM instructions the
 *    running code gets an error, and from then on every instruction of every
 *    coroutine of the state errors too, so a script cannot catch the error
 *    with pcall and carry on. The hook is disarmed when the call returns.
 *    The hook never fires inside a C function, so C functions whose work
 *    grows with their input or output (JSON, and the string and table
 *    functions replaced by luaws_strlib.h) pay for it with luaws_charge.
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
    int budget_hit;              /* set by the hook during a call */
    int budget_armed;            /* the running call is under the budget */
    lua_Integer charged;         /* units C functions charged in the running call (luaws_charge) */
    char error[LUAWS_ERR_MAX];   /* the last error of luaws_call, NUL-terminated */

    /* Callbacks into Swift. They get plain values and must not call Lua. */
    int (*send)(void *swift, lua_Integer conn, const char *data, size_t len, int binary);
    int (*close)(void *swift, lua_Integer conn, lua_Integer code, const char *reason, size_t len);
    void (*log)(void *swift, int level, const char *msg, size_t len);
    /* Everything else scripts ask of Swift: see luaws_core_command. */
    void (*command)(void *swift, int op, const struct luaws_arg *args, int nargs, struct luaws_reply *reply);
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

static void luaws_budget_hook(lua_State *L, lua_Debug *ar) {
    (void)ar;
    luaws_host *h = luaws_host_of(L);
    h->budget_hit = 1;
    /* From now on every instruction errors, in this thread and the main one. */
    lua_sethook(L, luaws_budget_hook, LUA_MASKCOUNT, 1);
    lua_rawgeti(L, LUA_REGISTRYINDEX, LUA_RIDX_MAINTHREAD);
    lua_State *main = lua_tothread(L, -1);
    lua_pop(L, 1);
    if (main && main != L) lua_sethook(main, luaws_budget_hook, LUA_MASKCOUNT, 1);
    lua_Debug where;
    if (lua_getstack(L, 0, &where) && lua_getinfo(L, "Sl", &where) && where.currentline > 0)
        luaL_error(L, "%s:%d: instruction budget exceeded (%d instructions)",
                   where.short_src, where.currentline, h->budget);
    luaL_error(L, "instruction budget exceeded (%d instructions)", h->budget);
}

/* Stand-in for the budget interface shared with the budget rewrite: C functions that do work
 * proportional to their input or output (JSON, pattern matching, string.rep ...) call this,
 * because Lua's count hook never fires inside a C function. Charges `units` VM-instruction
 * equivalents to the running call; once the charges pass the budget it stops the call exactly
 * as the hook does (the hook is armed on every instruction, so pcall cannot swallow it).
 * Outside a budgeted call (loading the prelude, reading a field) nothing is enforced. */
static void luaws_charge(lua_State *L, lua_Integer units) {
    luaws_host *h = luaws_host_of(L);
    h->charged += units;
    if (h->budget_armed && h->budget > 0 && h->charged > h->budget) luaws_budget_hook(L, NULL);
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

/* ---------- the core functions scripts reach through the prelude ---------- */

/* conn:send(text) and conn:send_binary(bytes), straight from the method call: the connection
 * id is the `id` field of the conn table. Written in C because it is the hot path. */
static int luaws_conn_send_kind(lua_State *L, int binary) {
    luaws_host *h = luaws_host_of(L);
    luaL_checktype(L, 1, LUA_TTABLE);
    lua_getfield(L, 1, "id");
    lua_Integer id = lua_tointeger(L, -1);
    size_t len = 0;
    const char *data;
    if (binary || lua_type(L, 2) == LUA_TSTRING) data = luaL_checklstring(L, 2, &len);
    else data = luaL_tolstring(L, 2, &len);   /* any other value, as tostring() would show it */
    lua_pushboolean(L, h->send(h->swift, id, data, len, binary) == 0);
    return 1;
}
static int luaws_conn_send(lua_State *L) { return luaws_conn_send_kind(L, 0); }

/* Conn.__index(conn, key): a method from upvalue 1 (a table), else upvalue 2 (a Lua function
 * that makes lazy fields). In C because every conn:send goes through it. */
static int luaws_conn_index(lua_State *L) {
    lua_settop(L, 2);
    lua_pushvalue(L, 2);
    if (lua_rawget(L, lua_upvalueindex(1)) != LUA_TNIL) return 1;
    lua_pop(L, 1);
    lua_pushvalue(L, lua_upvalueindex(2));
    lua_insert(L, 1);
    lua_call(L, 2, 1);
    return 1;
}

/* core.conn_index(methods, lazy) makes the __index closure above. */
static int luaws_core_conn_index(lua_State *L) {
    luaL_checktype(L, 1, LUA_TTABLE);
    luaL_checktype(L, 2, LUA_TFUNCTION);
    lua_settop(L, 2);
    lua_pushcclosure(L, luaws_conn_index, 2);
    return 1;
}
static int luaws_conn_send_binary(lua_State *L) { return luaws_conn_send_kind(L, 1); }

static int luaws_core_close(lua_State *L) {
    luaws_host *h = luaws_host_of(L);
    lua_Integer id = luaL_checkinteger(L, 1);
    lua_Integer code = luaL_optinteger(L, 2, 1000);
    size_t len = 0;
    const char *reason = luaL_optlstring(L, 3, "", &len);
    if (!(code == 1000 || (code >= 3000 && code <= 4999) || (code >= 1001 && code <= 1014 && code != 1004 && code != 1005 && code != 1006)))
        return luaL_argerror(L, 2, "not a close code a server may send (1000-1014 but 1004-1006, or 3000-4999)");
    if (len > 123)
        return luaL_argerror(L, 3, "close reason longer than 123 bytes");
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

/* Python's datetime.utcnow().isoformat(): microseconds only when non-zero. */
static int luaws_core_utcnow_iso(lua_State *L) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
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
    clock_gettime(CLOCK_REALTIME, &ts);
    lua_pushnumber(L, (lua_Number)ts.tv_sec + (lua_Number)ts.tv_nsec / 1e9);
    return 1;
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
            luaL_where(L, 1);   /* the caller's file:line, as luaL_error gives */
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

/* Message handler: the error with a traceback. Written in C so that it runs
 * even when the budget hook makes every Lua instruction fail. */
static int luaws_msgh(lua_State *L) {
    const char *msg = lua_tostring(L, 1);
    if (msg == NULL) {
        if (luaL_callmeta(L, 1, "__tostring") && lua_type(L, -1) == LUA_TSTRING) return 1;
        msg = lua_pushfstring(L, "(error object is a %s value)", luaL_typename(L, 1));
    }
    /* An error raised inside the prelude (a bad argument to conn:close, say) is the script's
     * doing: point at the script's line that called into the prelude. */
    static const char prelude[] = "luaws-prelude:";
    if (strncmp(msg, prelude, sizeof prelude - 1) == 0) {
        const char *rest = strstr(msg + sizeof prelude - 1, ": ");
        lua_Debug ar;
        for (int level = 1; rest && lua_getstack(L, level, &ar); level++) {
            if (!lua_getinfo(L, "Sl", &ar)) break;
            if (ar.currentline > 0 && strcmp(ar.source, "=luaws-prelude") != 0) {
                msg = lua_pushfstring(L, "%s:%d: %s", ar.short_src, ar.currentline, rest + 2);
                break;
            }
        }
    }
    luaL_traceback(L, L, msg, 1);
    return 1;
}

static void luaws_push_core(lua_State *L) {
    static const luaL_Reg core[] = {
        {"conn_send", luaws_conn_send},
        {"conn_send_binary", luaws_conn_send_binary},
        {"conn_index", luaws_core_conn_index},
        {"close", luaws_core_close},
        {"log", luaws_core_log},
        {"utcnow_iso", luaws_core_utcnow_iso},
        {"now", luaws_core_now},
        {"command", luaws_core_command},
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

static int luaws_call_trampoline(lua_State *L) {
    luaws_call_frame *f = (luaws_call_frame *)lua_touserdata(L, 1);
    luaL_checkstack(L, f->nargs + 2, "too many arguments");
    lua_rawgeti(L, LUA_REGISTRYINDEX, f->fn);
    for (int k = 0; k < f->nargs; k++) {
        const luaws_arg *a = &f->args[k];
        switch (a->type) {
        case LUAWS_ARG_INT: lua_pushinteger(L, a->i); break;
        case LUAWS_ARG_NUM: lua_pushnumber(L, a->n); break;
        case LUAWS_ARG_STR: lua_pushlstring(L, a->s, a->len); break;
        case LUAWS_ARG_REF: lua_rawgeti(L, LUA_REGISTRYINDEX, a->i); break;
        case LUAWS_ARG_BOOL: lua_pushboolean(L, (int)a->i); break;
        default: lua_pushnil(L); break;
        }
    }
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
static int luaws_protected(lua_State *L, lua_CFunction fn, void *frame, int budgeted) {
    luaws_host *h = luaws_host_of(L);
    int top = lua_gettop(L);
    h->error[0] = 0;
    h->budget_hit = 0;
    h->charged = 0;
    if (!lua_checkstack(L, 3)) {
        snprintf(h->error, LUAWS_ERR_MAX, "Lua stack overflow");
        return LUA_ERRMEM;
    }
    lua_pushcfunction(L, luaws_msgh);
    lua_pushcfunction(L, fn);
    lua_pushlightuserdata(L, frame);
    budgeted = budgeted && h->budget > 0;
    h->budget_armed = budgeted;
    if (budgeted) lua_sethook(L, luaws_budget_hook, LUA_MASKCOUNT, h->budget);
    int status = lua_pcall(L, 1, 0, top + 1);
    if (budgeted) lua_sethook(L, NULL, 0, 0);
    h->budget_armed = 0;
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
    luaws_open_charged_libs(L);   /* before the prelude copies `string` and `table` into sandboxes */
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
