/*
 * CLua: Lua 5.4 (Debian's liblua5.4-dev) for Swift.
 *
 * Swift cannot import function-like macros, and must never be unwound by a
 * Lua error (Lua raises errors with longjmp, which would skip Swift's
 * releases and exclusivity bookkeeping). So Swift never calls the Lua API
 * directly: it goes through the protected bridge (luaws_bridge.h), where
 * every call from Swift into Lua runs under lua_pcall, and every C function
 * Lua calls is written in C and reaches Swift only through plain callbacks
 * that never touch Lua.
 */
#ifndef LUAWS_CLUA_SHIMS_H
#define LUAWS_CLUA_SHIMS_H

#include <lua.h>
#include <lauxlib.h>
#include <lualib.h>

#include "luaws_bridge.h"

#endif
