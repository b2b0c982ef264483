/*
 * luaws.json: JSON text <-> Lua values, straight on the Lua state (included by luaws_bridge.h).
 *
 * Why in C and on the state: a script controls the size of what it encodes and decodes, so
 * the work must count against the state's limits. Every byte lives in memory of the state's
 * capped allocator (the output buffer is a userdata, decoded values are pushed as they are
 * read, with no intermediate tree), so a too-big result is a Lua memory error; and the work
 * is charged to the instruction budget (luaws_charge): one unit per value, one per
 * LUAWS_BYTES_PER_UNIT bytes copied or scanned, n log n for sorting an object's keys.
 *
 * Behaviour (the README's table says the same):
 *  - encode: nil and luaws.json.null (a NULL light userdata) -> null; booleans; integers as
 *    integers; floats with %.14g, or %.17g when %.14g does not read back equal, so a float
 *    with an integral value is written without a fraction (2.0 -> 2, which decodes as the
 *    integer 2); NaN and infinities are refused. Strings must be valid UTF-8 and are escaped
 *    per RFC 8259 ('"', '\', control characters; '/' and non-ASCII are written as they are).
 *  - tables: a table marked by json.array (decoded arrays are) or with only positive integer
 *    keys 1..n is an array; only string keys: an object, keys sorted bytewise (equal tables
 *    give equal text); no keys: {} unless marked ([]). Holes, mixed integer and string keys,
 *    and keys of any other kind are errors. json.empty_array encodes as []. Nesting deeper
 *    than 64 is an error (that is how cycles end).
 *  - decode: RFC 8259 text, UTF-8, nesting up to 200; objects -> tables, arrays -> tables
 *    marked as arrays, null -> luaws.json.null; numbers without fraction or exponent that fit
 *    an integer -> integers, others -> floats; a number too large for a float is an error.
 *    Errors give the line and column (in characters) where the text went wrong.
 *
 * Invariants as in luaws_bridge.h: errors are Lua errors (luaL_error, so the message starts
 * with the caller's file:line), every path leaves the stack balanced, recursion is bounded
 * by the depth limits and every level checks its stack space.
 */
#ifndef LUAWS_JSON_H
#define LUAWS_JSON_H

#include <locale.h>

#define LUAWS_JSON_ENCODE_DEPTH 64
#define LUAWS_JSON_DECODE_DEPTH 200
/* Units are added up locally and handed to luaws_charge in batches of at least this many. */
#define LUAWS_JSON_CHARGE_BATCH 1024

/* Upvalues of the json closures (see luaws_json_register). */
#define LUAWS_JSON_ARRAY_MT lua_upvalueindex(1)     /* the metatable that marks arrays */
#define LUAWS_JSON_EMPTY_ARRAY lua_upvalueindex(2)  /* the json.empty_array sentinel */

/* Length of the UTF-8 sequence at s (1-4), or 0 if it is not valid UTF-8 (RFC 3629: no
 * overlong forms, no surrogates, nothing above U+10FFFF). */
static size_t luaws_utf8_seq(const unsigned char *s, size_t avail) {
    unsigned c = s[0];
    if (c < 0x80) return 1;
    if (c < 0xC2) return 0;
    if (c < 0xE0) return (avail >= 2 && (s[1] & 0xC0) == 0x80) ? 2 : 0;
    if (c < 0xF0) {
        if (avail < 3 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80) return 0;
        if (c == 0xE0 && s[1] < 0xA0) return 0;   /* overlong */
        if (c == 0xED && s[1] >= 0xA0) return 0;  /* UTF-16 surrogate */
        return 3;
    }
    if (c < 0xF5) {
        if (avail < 4 || (s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80 || (s[3] & 0xC0) != 0x80) return 0;
        if (c == 0xF0 && s[1] < 0x90) return 0;   /* overlong */
        if (c == 0xF4 && s[1] >= 0x90) return 0;  /* above U+10FFFF */
        return 4;
    }
    return 0;
}

/* ================================================================ encode */

/* The output is a userdata at stack slot `slot`, replaced by a bigger one to grow: a
 * luaL_Buffer cannot be used because its box must stay on top of the stack, and the walk
 * pushes the values it visits. Old buffers are garbage the collector takes (an allocation
 * that would pass the cap runs a full collection first). */
typedef struct luaws_jenc {
    lua_State *L;
    int slot;
    char *data;
    size_t len, cap;
    lua_Integer pending;   /* units not yet handed to luaws_charge */
} luaws_jenc;

static void luaws_jenc_charge(luaws_jenc *e, lua_Integer units) {
    e->pending += units;
    if (e->pending >= LUAWS_JSON_CHARGE_BATCH) {
        lua_Integer units_now = e->pending;
        e->pending = 0;
        luaws_charge(e->L, units_now);
    }
}

static void luaws_jenc_reserve(luaws_jenc *e, size_t need) {
    if (e->cap - e->len >= need) return;
    if (need > ((size_t)-1) / 4 - e->len) luaL_error(e->L, "json.encode: result too large");
    size_t cap = e->cap ? e->cap : 256;
    while (cap - e->len < need) cap *= 2;
    char *grown = (char *)lua_newuserdatauv(e->L, cap, 0);   /* a memory error past the cap */
    if (e->len) memcpy(grown, e->data, e->len);
    lua_replace(e->L, e->slot);
    e->data = grown;
    e->cap = cap;
}

static void luaws_jenc_put(luaws_jenc *e, const char *s, size_t n) {
    luaws_jenc_reserve(e, n);
    memcpy(e->data + e->len, s, n);
    e->len += n;
}

static void luaws_jenc_string(luaws_jenc *e, const char *str, size_t len) {
    static const char hex[] = "0123456789abcdef";
    const unsigned char *s = (const unsigned char *)str;
    luaws_jenc_charge(e, (lua_Integer)(len / LUAWS_BYTES_PER_UNIT));
    luaws_jenc_put(e, "\"", 1);
    size_t i = 0, run = 0;   /* s[run..i) is copied as it is */
    while (i < len) {
        unsigned c = s[i];
        if (c >= 0x80) {
            size_t n = luaws_utf8_seq(s + i, len - i);
            if (n == 0) luaL_error(e->L, "json.encode: string is not valid UTF-8 (byte %d)", (int)(i + 1));
            i += n;
            continue;
        }
        if (c >= 0x20 && c != '"' && c != '\\') { i++; continue; }
        luaws_jenc_put(e, str + run, i - run);
        char esc[6] = {'\\', 0, 0, 0, 0, 0};
        size_t n = 2;
        switch (c) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\b': esc[1] = 'b'; break;
        case '\f': esc[1] = 'f'; break;
        case '\n': esc[1] = 'n'; break;
        case '\r': esc[1] = 'r'; break;
        case '\t': esc[1] = 't'; break;
        default:
            esc[1] = 'u'; esc[2] = '0'; esc[3] = '0'; esc[4] = hex[c >> 4]; esc[5] = hex[c & 15];
            n = 6;
        }
        luaws_jenc_put(e, esc, n);
        run = ++i;
    }
    luaws_jenc_put(e, str + run, len - run);
    luaws_jenc_put(e, "\"", 1);
}

static void luaws_jenc_number(luaws_jenc *e, int idx) {
    lua_State *L = e->L;
    char buf[64];
    int n;
    if (lua_isinteger(L, idx)) {
        n = snprintf(buf, sizeof buf, LUA_INTEGER_FMT, (LUAI_UACINT)lua_tointeger(L, idx));
    } else {
        double v = (double)lua_tonumber(L, idx);
        if (!isfinite(v)) luaL_error(L, "json.encode: cannot encode NaN or infinity");
        /* The shortest of the two that reads back as the same double. snprintf and strtod use
         * the same (C library) locale, so the check holds whatever its decimal point is. */
        n = snprintf(buf, sizeof buf, "%.14g", v);
        if (strtod(buf, NULL) != v) n = snprintf(buf, sizeof buf, "%.17g", v);
        char point = lua_getlocaledecpoint();
        if (point != '.')
            for (int i = 0; i < n; i++) if (buf[i] == point) buf[i] = '.';
    }
    luaws_jenc_put(e, buf, (size_t)n);
}

/* An object's keys, to sort: pointers into strings that a scratch table keeps alive (a
 * finalizer run by the collector while the output grows could otherwise drop them). */
typedef struct luaws_jkey {
    const char *s;
    size_t len;
    lua_Integer slot;   /* where the scratch table holds the string */
} luaws_jkey;

static int luaws_jkey_less(const luaws_jkey *a, const luaws_jkey *b) {
    size_t n = a->len < b->len ? a->len : b->len;
    int c = memcmp(a->s, b->s, n);
    return c < 0 || (c == 0 && a->len < b->len);
}

/* Heapsort: in place, not recursive, no allocation (qsort may malloc). */
static void luaws_jkey_sort(luaws_jkey *k, size_t n) {
    if (n < 2) return;
    for (size_t start = n / 2; start-- > 0;) {
        for (size_t root = start;;) {
            size_t child = 2 * root + 1;
            if (child >= n) break;
            if (child + 1 < n && luaws_jkey_less(&k[child], &k[child + 1])) child++;
            if (!luaws_jkey_less(&k[root], &k[child])) break;
            luaws_jkey t = k[root]; k[root] = k[child]; k[child] = t;
            root = child;
        }
    }
    for (size_t end = n - 1; end > 0; end--) {
        luaws_jkey t = k[0]; k[0] = k[end]; k[end] = t;
        for (size_t root = 0;;) {
            size_t child = 2 * root + 1;
            if (child >= end) break;
            if (child + 1 < end && luaws_jkey_less(&k[child], &k[child + 1])) child++;
            if (!luaws_jkey_less(&k[root], &k[child])) break;
            t = k[root]; k[root] = k[child]; k[child] = t;
            root = child;
        }
    }
}

static void luaws_jenc_value(luaws_jenc *e, int idx, int depth);

static void luaws_jenc_table(luaws_jenc *e, int idx, int depth) {
    lua_State *L = e->L;
    if (depth >= LUAWS_JSON_ENCODE_DEPTH)
        luaL_error(L, "json.encode: nesting deeper than %d (a cycle?)", LUAWS_JSON_ENCODE_DEPTH);
    luaL_checkstack(L, 6, "json.encode: nesting too deep");
    int marked = 0;
    if (lua_getmetatable(L, idx)) {
        marked = lua_rawequal(L, -1, LUAWS_JSON_ARRAY_MT);
        lua_pop(L, 1);
    }
    /* Classify the keys without converting any (lua_tolstring on a key would break lua_next). */
    lua_Integer count = 0, maxkey = 0, strings = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        count++;
        luaws_jenc_charge(e, 1);
        if (lua_type(L, -1) == LUA_TSTRING) {
            strings++;
        } else if (lua_isinteger(L, -1)) {
            lua_Integer k = lua_tointeger(L, -1);
            if (k < 1) luaL_error(L, "json.encode: table key %I is not a positive integer", (LUAI_UACINT)k);
            if (k > maxkey) maxkey = k;
        } else if (lua_type(L, -1) == LUA_TNUMBER) {
            luaL_error(L, "json.encode: table key %f is not an integer", (double)lua_tonumber(L, -1));
        } else {
            luaL_error(L, "json.encode: table key of type %s (keys must be strings or integers)", luaL_typename(L, -1));
        }
        if (strings && strings != count)
            luaL_error(L, "json.encode: table mixes integer and string keys");
    }
    if (count == 0) {
        luaws_jenc_put(e, marked ? "[]" : "{}", 2);
        return;
    }
    if (strings == 0) {   /* integer keys: an array, 1..n with no holes */
        if (maxkey != count)
            luaL_error(L, "json.encode: array has holes (%I entries, largest index %I)",
                       (LUAI_UACINT)count, (LUAI_UACINT)maxkey);
        luaws_jenc_put(e, "[", 1);
        for (lua_Integer i = 1; i <= count; i++) {
            if (i > 1) luaws_jenc_put(e, ",", 1);
            lua_rawgeti(L, idx, i);
            luaws_jenc_value(e, lua_gettop(L), depth + 1);
            lua_pop(L, 1);
        }
        luaws_jenc_put(e, "]", 1);
        return;
    }
    if (marked) luaL_error(L, "json.encode: table marked as an array has string keys");
    if (count > INT_MAX || (size_t)count > ((size_t)-1) / sizeof(luaws_jkey))
        luaL_error(L, "json.encode: object too large");
    luaws_jenc_charge(e, count * luaws_log2_ceil(count));
    lua_createtable(L, (int)count, 0);   /* scratch: keeps the keys alive */
    int scratch = lua_gettop(L);
    luaws_jkey *keys = (luaws_jkey *)lua_newuserdatauv(L, (size_t)count * sizeof(luaws_jkey), 0);
    lua_Integer n = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        if (n == count) { lua_pop(L, 1); break; }   /* (cannot happen: nothing runs during this loop) */
        lua_pushvalue(L, -1);
        lua_rawseti(L, scratch, ++n);
        keys[n - 1].s = lua_tolstring(L, -1, &keys[n - 1].len);   /* a string: no conversion */
        keys[n - 1].slot = n;
    }
    luaws_jkey_sort(keys, (size_t)n);
    luaws_jenc_put(e, "{", 1);
    for (lua_Integer i = 0; i < n; i++) {
        if (i > 0) luaws_jenc_put(e, ",", 1);
        luaws_jenc_string(e, keys[i].s, keys[i].len);
        luaws_jenc_put(e, ":", 1);
        lua_rawgeti(L, scratch, keys[i].slot);
        lua_rawget(L, idx);
        luaws_jenc_value(e, lua_gettop(L), depth + 1);
        lua_pop(L, 1);
    }
    luaws_jenc_put(e, "}", 1);
    lua_pop(L, 2);   /* keys, scratch */
}

static void luaws_jenc_value(luaws_jenc *e, int idx, int depth) {
    lua_State *L = e->L;
    luaws_jenc_charge(e, 1);
    switch (lua_type(L, idx)) {
    case LUA_TNIL: luaws_jenc_put(e, "null", 4); return;
    case LUA_TBOOLEAN:
        if (lua_toboolean(L, idx)) luaws_jenc_put(e, "true", 4);
        else luaws_jenc_put(e, "false", 5);
        return;
    case LUA_TNUMBER: luaws_jenc_number(e, idx); return;
    case LUA_TSTRING: {
        size_t len;
        const char *s = lua_tolstring(L, idx, &len);
        luaws_jenc_string(e, s, len);
        return;
    }
    case LUA_TLIGHTUSERDATA:
        if (lua_touserdata(L, idx) == NULL) { luaws_jenc_put(e, "null", 4); return; }
        break;
    case LUA_TUSERDATA:
        if (lua_rawequal(L, idx, LUAWS_JSON_EMPTY_ARRAY)) { luaws_jenc_put(e, "[]", 2); return; }
        break;
    case LUA_TTABLE: luaws_jenc_table(e, idx, depth); return;
    default: break;
    }
    luaL_error(L, "json.encode: cannot encode a %s", luaL_typename(L, idx));
}

/* json.encode(value) -> text */
static int luaws_json_encode(lua_State *L) {
    luaL_checkany(L, 1);
    lua_settop(L, 1);
    lua_pushnil(L);   /* 2: the output buffer, once there is one */
    luaws_jenc e = {L, 2, NULL, 0, 0, 0};
    luaws_jenc_value(&e, 1, 0);
    luaws_charge(L, e.pending + (lua_Integer)(e.len / LUAWS_BYTES_PER_UNIT));   /* + the copy below */
    lua_pushlstring(L, e.data ? e.data : "", e.len);
    return 1;
}

/* ================================================================ decode */

typedef struct luaws_jdec {
    lua_State *L;
    const unsigned char *start, *p, *end;
    const unsigned char *charged_to;   /* the bytes before this were charged */
    lua_Integer pending;
} luaws_jdec;

/* Raises "json.decode: not valid JSON: <what> at line L, column C" for the byte at `at`.
 * The column counts characters (UTF-8 sequences), from 1. */
static int luaws_jdec_fail(luaws_jdec *d, const unsigned char *at, const char *what) {
    int line = 1, column = 1;
    for (const unsigned char *q = d->start; q < at; q++) {
        if (*q == '\n') { line++; column = 1; }
        else if ((*q & 0xC0) != 0x80) column++;
    }
    return luaL_error(d->L, "json.decode: not valid JSON: %s at line %d, column %d", what, line, column);
}

/* "unexpected character 'x'" (or byte, or end of input), plus what was expected if given. */
static int luaws_jdec_unexpected(luaws_jdec *d, const unsigned char *at, const char *expected) {
    char what[96];
    int n;
    if (at >= d->end) n = snprintf(what, sizeof what, "unexpected end of input");
    else if (*at > 0x20 && *at < 0x7F) n = snprintf(what, sizeof what, "unexpected character '%c'", *at);
    else n = snprintf(what, sizeof what, "unexpected byte 0x%02X", *at);
    if (expected && n > 0 && (size_t)n < sizeof what) snprintf(what + n, sizeof what - (size_t)n, " (expected %s)", expected);
    return luaws_jdec_fail(d, at, what);
}

static void luaws_jdec_charge(luaws_jdec *d, lua_Integer units) {
    size_t scanned = (size_t)(d->p - d->charged_to);
    if (scanned >= LUAWS_BYTES_PER_UNIT) {
        units += (lua_Integer)(scanned / LUAWS_BYTES_PER_UNIT);
        d->charged_to += scanned - scanned % LUAWS_BYTES_PER_UNIT;
    }
    d->pending += units;
    if (d->pending >= LUAWS_JSON_CHARGE_BATCH) {
        lua_Integer now = d->pending;
        d->pending = 0;
        luaws_charge(d->L, now);
    }
}

static void luaws_jdec_skip_ws(luaws_jdec *d) {
    while (d->p < d->end && (*d->p == ' ' || *d->p == '\n' || *d->p == '\r' || *d->p == '\t')) d->p++;
}

static int luaws_jdec_hex4(luaws_jdec *d, const unsigned char *q) {
    int v = 0;
    for (int i = 0; i < 4; i++) {
        if (q + i >= d->end) luaws_jdec_unexpected(d, q + i, "four hex digits after \\u");
        unsigned c = q[i];
        int digit;
        if (c >= '0' && c <= '9') digit = (int)(c - '0');
        else if (c >= 'a' && c <= 'f') digit = (int)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') digit = (int)(c - 'A' + 10);
        else return luaws_jdec_unexpected(d, q + i, "four hex digits after \\u");
        v = v * 16 + digit;
    }
    return v;
}

/* Pushes the string whose opening quote is at d->p. Without escapes it is pushed straight
 * from the input; with escapes it is built in a luaL_Buffer (nothing else is pushed meanwhile). */
static void luaws_jdec_string(luaws_jdec *d) {
    lua_State *L = d->L;
    const unsigned char *q = ++d->p, *run = q;
    luaL_Buffer b;
    int buffered = 0;
    for (;;) {
        if (q >= d->end) luaws_jdec_fail(d, q, "unterminated string");
        unsigned c = *q;
        if (c == '"') break;
        if (c >= 0x80) {
            size_t n = luaws_utf8_seq(q, (size_t)(d->end - q));
            if (n == 0) luaws_jdec_fail(d, q, "invalid UTF-8 in string");
            q += n;
            continue;
        }
        if (c < 0x20) luaws_jdec_fail(d, q, "control character in string (escape it)");
        if (c != '\\') { q++; continue; }
        if (!buffered) { luaL_buffinit(L, &b); buffered = 1; }
        luaL_addlstring(&b, (const char *)run, (size_t)(q - run));
        const unsigned char *esc = q;
        if (q + 1 >= d->end) luaws_jdec_fail(d, q, "unterminated string");
        switch (q[1]) {
        case '"': luaL_addchar(&b, '"'); q += 2; break;
        case '\\': luaL_addchar(&b, '\\'); q += 2; break;
        case '/': luaL_addchar(&b, '/'); q += 2; break;
        case 'b': luaL_addchar(&b, '\b'); q += 2; break;
        case 'f': luaL_addchar(&b, '\f'); q += 2; break;
        case 'n': luaL_addchar(&b, '\n'); q += 2; break;
        case 'r': luaL_addchar(&b, '\r'); q += 2; break;
        case 't': luaL_addchar(&b, '\t'); q += 2; break;
        case 'u': {
            unsigned long cp = (unsigned long)luaws_jdec_hex4(d, q + 2);
            q += 6;
            if (cp >= 0xDC00 && cp <= 0xDFFF) luaws_jdec_fail(d, esc, "lone low surrogate in \\u escape");
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                if (q + 1 >= d->end || q[0] != '\\' || q[1] != 'u')
                    luaws_jdec_fail(d, esc, "lone high surrogate in \\u escape");
                unsigned long low = (unsigned long)luaws_jdec_hex4(d, q + 2);
                if (low < 0xDC00 || low > 0xDFFF) luaws_jdec_fail(d, esc, "lone high surrogate in \\u escape");
                cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
                q += 6;
            }
            char utf8[4];
            size_t n;
            if (cp < 0x80) { utf8[0] = (char)cp; n = 1; }
            else if (cp < 0x800) { utf8[0] = (char)(0xC0 | (cp >> 6)); utf8[1] = (char)(0x80 | (cp & 0x3F)); n = 2; }
            else if (cp < 0x10000) {
                utf8[0] = (char)(0xE0 | (cp >> 12)); utf8[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
                utf8[2] = (char)(0x80 | (cp & 0x3F)); n = 3;
            } else {
                utf8[0] = (char)(0xF0 | (cp >> 18)); utf8[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
                utf8[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); utf8[3] = (char)(0x80 | (cp & 0x3F)); n = 4;
            }
            luaL_addlstring(&b, utf8, n);
            break;
        }
        default: luaws_jdec_unexpected(d, q + 1, "an escape: \\\" \\\\ \\/ \\b \\f \\n \\r \\t \\u");
        }
        run = q;
    }
    if (buffered) {
        luaL_addlstring(&b, (const char *)run, (size_t)(q - run));
        luaL_pushresult(&b);
    } else {
        lua_pushlstring(L, (const char *)run, (size_t)(q - run));
    }
    d->p = q + 1;
}

static int luaws_jdec_digit(luaws_jdec *d, const unsigned char *q) {
    return q < d->end && *q >= '0' && *q <= '9';
}

/* Pushes the number at d->p (RFC 8259 grammar). Lua's own conversion decides integer or
 * float: digits only that fit a lua_Integer give an integer, anything else a float. */
static void luaws_jdec_number(luaws_jdec *d) {
    lua_State *L = d->L;
    const unsigned char *s = d->p, *q = s;
    if (*q == '-') q++;
    if (q < d->end && *q == '0') q++;
    else if (luaws_jdec_digit(d, q)) while (luaws_jdec_digit(d, q)) q++;
    else luaws_jdec_unexpected(d, q, "a digit");
    if (q < d->end && *q == '.') {
        q++;
        if (!luaws_jdec_digit(d, q)) luaws_jdec_unexpected(d, q, "a digit after '.'");
        while (luaws_jdec_digit(d, q)) q++;
    }
    if (q < d->end && (*q == 'e' || *q == 'E')) {
        q++;
        if (q < d->end && (*q == '+' || *q == '-')) q++;
        if (!luaws_jdec_digit(d, q)) luaws_jdec_unexpected(d, q, "a digit in the exponent");
        while (luaws_jdec_digit(d, q)) q++;
    }
    size_t len = (size_t)(q - s);
    char buf[128];
    size_t converted;
    if (len < sizeof buf) {
        memcpy(buf, s, len);
        buf[len] = 0;
        converted = lua_stringtonumber(L, buf);
    } else {   /* a long numeral: a NUL-terminated copy in Lua memory */
        lua_pushlstring(L, (const char *)s, len);
        converted = lua_stringtonumber(L, lua_tostring(L, -1));
        if (converted) lua_remove(L, -2); else lua_pop(L, 1);
    }
    if (converted == 0) luaws_jdec_fail(d, s, "number not representable");
    if (!lua_isinteger(L, -1) && !isfinite((double)lua_tonumber(L, -1))) {
        lua_pop(L, 1);
        luaws_jdec_fail(d, s, "number out of range");
    }
    d->p = q;
}

static void luaws_jdec_literal(luaws_jdec *d, const char *word, size_t len) {
    for (size_t i = 0; i < len; i++)
        if (d->p + i >= d->end || d->p[i] != (unsigned char)word[i]) luaws_jdec_unexpected(d, d->p + i, NULL);
    d->p += len;
}

static void luaws_jdec_value(luaws_jdec *d, int depth) {
    lua_State *L = d->L;
    luaws_jdec_skip_ws(d);
    luaws_jdec_charge(d, 1);
    if (d->p >= d->end) luaws_jdec_unexpected(d, d->p, "a value");
    switch (*d->p) {
    case '"': luaws_jdec_string(d); return;
    case 't': luaws_jdec_literal(d, "true", 4); lua_pushboolean(L, 1); return;
    case 'f': luaws_jdec_literal(d, "false", 5); lua_pushboolean(L, 0); return;
    case 'n': luaws_jdec_literal(d, "null", 4); lua_pushlightuserdata(L, NULL); return;
    case '[': {
        if (depth >= LUAWS_JSON_DECODE_DEPTH) luaws_jdec_fail(d, d->p, "nesting deeper than 200");
        luaL_checkstack(L, 4, "json.decode: nesting too deep");
        d->p++;
        lua_newtable(L);
        lua_pushvalue(L, LUAWS_JSON_ARRAY_MT);   /* so that [] encodes back as [] */
        lua_setmetatable(L, -2);
        luaws_jdec_skip_ws(d);
        if (d->p < d->end && *d->p == ']') { d->p++; return; }
        for (lua_Integer i = 1;; i++) {
            luaws_jdec_value(d, depth + 1);
            lua_rawseti(L, -2, i);
            luaws_jdec_skip_ws(d);
            if (d->p < d->end && *d->p == ',') { d->p++; continue; }
            if (d->p < d->end && *d->p == ']') { d->p++; return; }
            luaws_jdec_unexpected(d, d->p, "',' or ']'");
        }
    }
    case '{': {
        if (depth >= LUAWS_JSON_DECODE_DEPTH) luaws_jdec_fail(d, d->p, "nesting deeper than 200");
        luaL_checkstack(L, 4, "json.decode: nesting too deep");
        d->p++;
        lua_newtable(L);
        luaws_jdec_skip_ws(d);
        if (d->p < d->end && *d->p == '}') { d->p++; return; }
        for (;;) {
            luaws_jdec_skip_ws(d);
            if (d->p >= d->end || *d->p != '"') luaws_jdec_unexpected(d, d->p, "a string key");
            luaws_jdec_string(d);
            luaws_jdec_skip_ws(d);
            if (d->p >= d->end || *d->p != ':') luaws_jdec_unexpected(d, d->p, "':'");
            d->p++;
            luaws_jdec_value(d, depth + 1);
            lua_rawset(L, -3);   /* a repeated key: the last one wins */
            luaws_jdec_skip_ws(d);
            if (d->p < d->end && *d->p == ',') { d->p++; continue; }
            if (d->p < d->end && *d->p == '}') { d->p++; return; }
            luaws_jdec_unexpected(d, d->p, "',' or '}'");
        }
    }
    default:
        if (*d->p == '-' || (*d->p >= '0' && *d->p <= '9')) { luaws_jdec_number(d); return; }
        luaws_jdec_unexpected(d, d->p, "a value");
    }
}

/* json.decode(text) -> value */
static int luaws_json_decode(lua_State *L) {
    size_t len = 0;
    const char *text = luaL_checklstring(L, 1, &len);
    lua_settop(L, 1);   /* the text stays referenced (at 1) while its bytes are read */
    const unsigned char *start = (const unsigned char *)text;
    luaws_jdec d = {L, start, start, start + len, start, 0};
    luaws_jdec_value(&d, 0);
    luaws_jdec_skip_ws(&d);
    if (d.p < d.end) luaws_jdec_unexpected(&d, d.p, "the end after the value");
    luaws_jdec_charge(&d, 0);
    luaws_charge(L, d.pending + (lua_Integer)((size_t)(d.p - d.charged_to) / LUAWS_BYTES_PER_UNIT));
    return 1;
}

/* json.array([t]) -> t, marked to encode as an array (so an empty one is []); a new table
 * without argument. A table with another metatable cannot be marked. */
static int luaws_json_array(lua_State *L) {
    if (lua_isnoneornil(L, 1)) {
        lua_settop(L, 0);
        lua_newtable(L);
    } else {
        luaL_checktype(L, 1, LUA_TTABLE);
        lua_settop(L, 1);
    }
    if (lua_getmetatable(L, 1)) {
        if (!lua_rawequal(L, -1, LUAWS_JSON_ARRAY_MT)) return luaL_argerror(L, 1, "table already has a metatable");
        lua_pop(L, 1);
        return 1;
    }
    lua_pushvalue(L, LUAWS_JSON_ARRAY_MT);
    lua_setmetatable(L, 1);
    return 1;
}

static int luaws_json_empty_array_tostring(lua_State *L) {
    lua_pushliteral(L, "luaws.json.empty_array");
    return 1;
}

/* Sets json_encode, json_decode, json_array and json_empty_array in the table at `core`.
 * The array metatable is protected (__metatable): every plugin of the state shares it, so
 * no plugin may change it under the others; the same goes for the sentinel's. */
static void luaws_json_register(lua_State *L, int core) {
    lua_createtable(L, 0, 1);   /* the array marker */
    lua_pushliteral(L, "luaws.json.array");
    lua_setfield(L, -2, "__metatable");
    lua_newuserdatauv(L, 1, 0);   /* the empty_array sentinel */
    lua_createtable(L, 0, 2);
    lua_pushcfunction(L, luaws_json_empty_array_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushliteral(L, "luaws.json.empty_array");
    lua_setfield(L, -2, "__metatable");
    lua_setmetatable(L, -2);
    static const luaL_Reg fns[] = {
        {"json_encode", luaws_json_encode},
        {"json_decode", luaws_json_decode},
        {"json_array", luaws_json_array},
        {NULL, NULL},
    };
    for (const luaL_Reg *f = fns; f->name; f++) {
        lua_pushvalue(L, -2);
        lua_pushvalue(L, -2);
        lua_pushcclosure(L, f->func, 2);
        lua_setfield(L, core, f->name);
    }
    lua_setfield(L, core, "json_empty_array");
    lua_pop(L, 1);
}

#endif
