/*
 * CLua: Lua 5.4 (Debian's liblua5.4-dev) for Swift.
 *
 * Swift cannot import function-like macros, and must never be unwound by a
 * Lua error (Lua raises errors with longjmp, which would skip Swift's
 * releases and exclusivity bookkeeping). So this header holds:
 *   1. static-inline shims for the Lua macros ScriptHost needs;
 *   2. the protected bridge (luaws_bridge.h): every call from Swift into Lua
 *      goes through lua_pcall, and every C function Lua calls is written in C
 *      and reaches Swift only through plain callbacks that never touch Lua.
 */
#ifndef LUAWS_CLUA_SHIMS_H
#define LUAWS_CLUA_SHIMS_H

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

static inline int luaws_registryindex(void) { return LUA_REGISTRYINDEX; }
static inline int luaws_upvalueindex(int i) { return lua_upvalueindex(i); }
static inline void luaws_pop(lua_State *L, int n) { lua_pop(L, n); }
static inline void luaws_newtable(lua_State *L) { lua_newtable(L); }
static inline int luaws_isnil(lua_State *L, int i) { return lua_isnil(L, i); }
static inline int luaws_isfunction(lua_State *L, int i) { return lua_isfunction(L, i); }
static inline int luaws_istable(lua_State *L, int i) { return lua_istable(L, i); }
static inline const char *luaws_tolstring(lua_State *L, int i, size_t *len) { return lua_tolstring(L, i, len); }
static inline lua_Number luaws_tonumber(lua_State *L, int i) { return lua_tonumberx(L, i, NULL); }
static inline int luaws_pcall(lua_State *L, int nargs, int nresults, int msgh) { return lua_pcall(L, nargs, nresults, msgh); }
static inline void luaws_pushcfunction(lua_State *L, lua_CFunction f) { lua_pushcfunction(L, f); }

#include "luaws_bridge.h"

#endif
