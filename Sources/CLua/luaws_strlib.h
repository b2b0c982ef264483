/*
 * Lua's string and table functions that can do unbounded work inside one C call, charged to
 * the instruction budget (included by luaws_bridge.h).
 *
 * Why: Lua's count hook only fires between VM instructions, never inside a C function, so a
 * backtracking pattern, string.rep("x", 1e8) or a sort of a million elements would run
 * unbudgeted. The functions below replace the standard ones in the real `string` and `table`
 * tables (luaws_open_charged_libs) and call luaws_charge as they work:
 *  - pattern matching (find, match, gmatch, gsub): one unit per step of the matcher (an entry
 *    into `match` or a character a repetition or %b scans), one per LUAWS_BYTES_PER_UNIT bytes
 *    compared, searched or copied; gsub also pays for the bytes it writes;
 *  - string.rep: its whole size, checked for overflow and charged before anything is
 *    allocated; string.format and table.concat: per item and per byte written, as they go;
 *  - string.sub, reverse, lower and upper: the bytes they copy, before allocating;
 *  - table.insert/remove (the elements shifted), table.move (per element, before moving) and
 *    table.sort (n log n, before sorting).
 * string.dump is removed (bytecode is refused anyway, and it would expose function internals).
 *
 * The code is Lua 5.4.4's own (lstrlib.c and ltablib.c), renamed with a luaws_ prefix so that
 * nothing clashes with Swift or the C library, with the charging added and marked "luaws:".
 * Lua's copyright and licence:
 *
 * Copyright (C) 1994-2022 Lua.org, PUC-Rio.
 *
 * Permission is hereby granted, free of charge, to any person obtaining
 * a copy of this software and associated documentation files (the
 * "Software"), to deal in the Software without restriction, including
 * without limitation the rights to use, copy, modify, merge, publish,
 * distribute, sublicense, and/or sell copies of the Software, and to
 * permit persons to whom the Software is furnished to do so, subject to
 * the following conditions:
 *
 * The above copyright notice and this permission notice shall be
 * included in all copies or substantial portions of the Software.
 *
 * THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND,
 * EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF
 * MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT.
 * IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY
 * CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT,
 * TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE
 * SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
 */
#ifndef LUAWS_STRLIB_H
#define LUAWS_STRLIB_H

#include <ctype.h>
#include <float.h>
#include <limits.h>
#include <stddef.h>
#include <time.h>

#define LUAWS_PM_UCHAR(c)	((unsigned char)(c))
#define LUAWS_PM_MAXCAPTURES	32
/* luaws: the matcher hands its steps to luaws_charge in batches of this many. */
#define LUAWS_PM_CHARGE_BATCH	1024

/* Largest string size Lua's string functions produce (lstrlib.c's MAXSIZE). */
#define LUAWS_STR_MAXSIZE \
	(sizeof(size_t) < sizeof(int) ? ((size_t)(~(size_t)0)) : (size_t)(INT_MAX))


/*
** {======================================================
** PATTERN MATCHING (lstrlib.c)
** =======================================================
*/

static size_t luaws_pm_posrelatI (lua_Integer pos, size_t len) {
  if (pos > 0)
    return (size_t)pos;
  else if (pos == 0)
    return 1;
  else if (pos < -(lua_Integer)len)  /* inverted comparison */
    return 1;  /* clip to 1 */
  else return len + (size_t)pos + 1;
}

#define LUAWS_PM_CAP_UNFINISHED	(-1)
#define LUAWS_PM_CAP_POSITION	(-2)


typedef struct luaws_MatchState {
  const char *src_init;  /* init of source string */
  const char *src_end;  /* end ('\0') of source string */
  const char *p_end;  /* end ('\0') of pattern */
  lua_State *L;
  int matchdepth;  /* control for recursive depth (to avoid C stack overflow) */
  unsigned char level;  /* total number of captures (finished or unfinished) */
  lua_Integer steps;  /* luaws: work done and not yet charged */
  struct {
    const char *init;
    ptrdiff_t len;
  } capture[LUAWS_PM_MAXCAPTURES];
} luaws_MatchState;


/* recursive function */
static const char *luaws_pm_match (luaws_MatchState *ms, const char *s, const char *p);


/* luaws: hands the steps counted so far to the budget (which may raise its error). */
static void luaws_pm_flush (luaws_MatchState *ms) {
  lua_Integer steps = ms->steps;
  ms->steps = 0;
  if (steps > 0) luaws_charge(ms->L, steps);
}

/* luaws: counts `units` of work; charges them once a batch is full. */
static void luaws_pm_count (luaws_MatchState *ms, lua_Integer units) {
  ms->steps += units;
  if (ms->steps >= LUAWS_PM_CHARGE_BATCH) luaws_pm_flush(ms);
}


/* maximum recursion depth for 'match' */
#if !defined(LUAWS_PM_MAXCCALLS)
#define LUAWS_PM_MAXCCALLS	200
#endif


#define LUAWS_PM_L_ESC		'%'
#define LUAWS_PM_SPECIALS	"^$*+?.([%-"


static int luaws_pm_check_capture (luaws_MatchState *ms, int l) {
  l -= '1';
  if (luai_unlikely(l < 0 || l >= ms->level ||
                 ms->capture[l].len == LUAWS_PM_CAP_UNFINISHED))
    return luaL_error(ms->L, "invalid capture index %%%d", l + 1);
  return l;
}


static int luaws_pm_capture_to_close (luaws_MatchState *ms) {
  int level = ms->level;
  for (level--; level>=0; level--)
    if (ms->capture[level].len == LUAWS_PM_CAP_UNFINISHED) return level;
  return luaL_error(ms->L, "invalid pattern capture");
}


static const char *luaws_pm_classend (luaws_MatchState *ms, const char *p) {
  switch (*p++) {
    case LUAWS_PM_L_ESC: {
      if (luai_unlikely(p == ms->p_end))
        luaL_error(ms->L, "malformed pattern (ends with '%%')");
      return p+1;
    }
    case '[': {
      if (*p == '^') p++;
      do {  /* look for a ']' */
        if (luai_unlikely(p == ms->p_end))
          luaL_error(ms->L, "malformed pattern (missing ']')");
        if (*(p++) == LUAWS_PM_L_ESC && p < ms->p_end)
          p++;  /* skip escapes (e.g. '%]') */
      } while (*p != ']');
      return p+1;
    }
    default: {
      return p;
    }
  }
}


static int luaws_pm_match_class (int c, int cl) {
  int res;
  switch (tolower(cl)) {
    case 'a' : res = isalpha(c); break;
    case 'c' : res = iscntrl(c); break;
    case 'd' : res = isdigit(c); break;
    case 'g' : res = isgraph(c); break;
    case 'l' : res = islower(c); break;
    case 'p' : res = ispunct(c); break;
    case 's' : res = isspace(c); break;
    case 'u' : res = isupper(c); break;
    case 'w' : res = isalnum(c); break;
    case 'x' : res = isxdigit(c); break;
    case 'z' : res = (c == 0); break;  /* deprecated option */
    default: return (cl == c);
  }
  return (islower(cl) ? res : !res);
}


static int luaws_pm_matchbracketclass (int c, const char *p, const char *ec) {
  int sig = 1;
  if (*(p+1) == '^') {
    sig = 0;
    p++;  /* skip the '^' */
  }
  while (++p < ec) {
    if (*p == LUAWS_PM_L_ESC) {
      p++;
      if (luaws_pm_match_class(c, LUAWS_PM_UCHAR(*p)))
        return sig;
    }
    else if ((*(p+1) == '-') && (p+2 < ec)) {
      p+=2;
      if (LUAWS_PM_UCHAR(*(p-2)) <= c && c <= LUAWS_PM_UCHAR(*p))
        return sig;
    }
    else if (LUAWS_PM_UCHAR(*p) == c) return sig;
  }
  return !sig;
}


static int luaws_pm_singlematch (luaws_MatchState *ms, const char *s, const char *p,
                        const char *ep) {
  if (s >= ms->src_end)
    return 0;
  else {
    int c = LUAWS_PM_UCHAR(*s);
    switch (*p) {
      case '.': return 1;  /* matches any char */
      case LUAWS_PM_L_ESC: return luaws_pm_match_class(c, LUAWS_PM_UCHAR(*(p+1)));
      case '[': return luaws_pm_matchbracketclass(c, p, ep-1);
      default:  return (LUAWS_PM_UCHAR(*p) == c);
    }
  }
}


static const char *luaws_pm_matchbalance (luaws_MatchState *ms, const char *s,
                                   const char *p) {
  if (luai_unlikely(p >= ms->p_end - 1))
    luaL_error(ms->L, "malformed pattern (missing arguments to '%%b')");
  if (*s != *p) return NULL;
  else {
    int b = *p;
    int e = *(p+1);
    int cont = 1;
    const char *from = s;
    while (++s < ms->src_end) {
      if (*s == e) {
        if (--cont == 0) {
          luaws_pm_count(ms, s - from);  /* luaws: the characters scanned */
          return s+1;
        }
      }
      else if (*s == b) cont++;
    }
    luaws_pm_count(ms, s - from);  /* luaws */
  }
  return NULL;  /* string ends out of balance */
}


static const char *luaws_pm_max_expand (luaws_MatchState *ms, const char *s,
                                 const char *p, const char *ep) {
  ptrdiff_t i = 0;  /* counts maximum expand for item */
  while (luaws_pm_singlematch(ms, s + i, p, ep))
    i++;
  luaws_pm_count(ms, i);  /* luaws: the characters scanned */
  /* keeps trying to match with the maximum repetitions */
  while (i>=0) {
    const char *res = luaws_pm_match(ms, (s+i), ep+1);
    if (res) return res;
    i--;  /* else didn't match; reduce 1 repetition to try again */
  }
  return NULL;
}


static const char *luaws_pm_min_expand (luaws_MatchState *ms, const char *s,
                                 const char *p, const char *ep) {
  for (;;) {
    const char *res = luaws_pm_match(ms, s, ep+1);
    if (res != NULL)
      return res;
    else if (luaws_pm_singlematch(ms, s, p, ep))
      s++;  /* try with one more repetition */
    else return NULL;
  }
}


static const char *luaws_pm_start_capture (luaws_MatchState *ms, const char *s,
                                    const char *p, int what) {
  const char *res;
  int level = ms->level;
  if (level >= LUAWS_PM_MAXCAPTURES) luaL_error(ms->L, "too many captures");
  ms->capture[level].init = s;
  ms->capture[level].len = what;
  ms->level = level+1;
  if ((res=luaws_pm_match(ms, s, p)) == NULL)  /* match failed? */
    ms->level--;  /* undo capture */
  return res;
}


static const char *luaws_pm_end_capture (luaws_MatchState *ms, const char *s,
                                  const char *p) {
  int l = luaws_pm_capture_to_close(ms);
  const char *res;
  ms->capture[l].len = s - ms->capture[l].init;  /* close capture */
  if ((res = luaws_pm_match(ms, s, p)) == NULL)  /* match failed? */
    ms->capture[l].len = LUAWS_PM_CAP_UNFINISHED;  /* undo capture */
  return res;
}


static const char *luaws_pm_match_capture (luaws_MatchState *ms, const char *s, int l) {
  size_t len;
  l = luaws_pm_check_capture(ms, l);
  len = ms->capture[l].len;
  luaws_pm_count(ms, (lua_Integer)(len / LUAWS_BYTES_PER_UNIT));  /* luaws */
  if ((size_t)(ms->src_end-s) >= len &&
      memcmp(ms->capture[l].init, s, len) == 0)
    return s+len;
  else return NULL;
}


static const char *luaws_pm_match (luaws_MatchState *ms, const char *s, const char *p) {
  if (luai_unlikely(ms->matchdepth-- == 0))
    luaL_error(ms->L, "pattern too complex");
  init: /* using goto's to optimize tail recursion */
  luaws_pm_count(ms, 1);  /* luaws: one step per pattern item tried */
  if (p != ms->p_end) {  /* end of pattern? */
    switch (*p) {
      case '(': {  /* start capture */
        if (*(p + 1) == ')')  /* position capture? */
          s = luaws_pm_start_capture(ms, s, p + 2, LUAWS_PM_CAP_POSITION);
        else
          s = luaws_pm_start_capture(ms, s, p + 1, LUAWS_PM_CAP_UNFINISHED);
        break;
      }
      case ')': {  /* end capture */
        s = luaws_pm_end_capture(ms, s, p + 1);
        break;
      }
      case '$': {
        if ((p + 1) != ms->p_end)  /* is the '$' the last char in pattern? */
          goto dflt;  /* no; go to default */
        s = (s == ms->src_end) ? s : NULL;  /* check end of string */
        break;
      }
      case LUAWS_PM_L_ESC: {  /* escaped sequences not in the format class[*+?-]? */
        switch (*(p + 1)) {
          case 'b': {  /* balanced string? */
            s = luaws_pm_matchbalance(ms, s, p + 2);
            if (s != NULL) {
              p += 4; goto init;  /* return luaws_pm_match(ms, s, p + 4); */
            }  /* else fail (s == NULL) */
            break;
          }
          case 'f': {  /* frontier? */
            const char *ep; char previous;
            p += 2;
            if (luai_unlikely(*p != '['))
              luaL_error(ms->L, "missing '[' after '%%f' in pattern");
            ep = luaws_pm_classend(ms, p);  /* points to what is next */
            previous = (s == ms->src_init) ? '\0' : *(s - 1);
            if (!luaws_pm_matchbracketclass(LUAWS_PM_UCHAR(previous), p, ep - 1) &&
               luaws_pm_matchbracketclass(LUAWS_PM_UCHAR(*s), p, ep - 1)) {
              p = ep; goto init;  /* return luaws_pm_match(ms, s, ep); */
            }
            s = NULL;  /* match failed */
            break;
          }
          case '0': case '1': case '2': case '3':
          case '4': case '5': case '6': case '7':
          case '8': case '9': {  /* capture results (%0-%9)? */
            s = luaws_pm_match_capture(ms, s, LUAWS_PM_UCHAR(*(p + 1)));
            if (s != NULL) {
              p += 2; goto init;  /* return luaws_pm_match(ms, s, p + 2) */
            }
            break;
          }
          default: goto dflt;
        }
        break;
      }
      default: dflt: {  /* pattern class plus optional suffix */
        const char *ep = luaws_pm_classend(ms, p);  /* points to optional suffix */
        /* does not match at least once? */
        if (!luaws_pm_singlematch(ms, s, p, ep)) {
          if (*ep == '*' || *ep == '?' || *ep == '-') {  /* accept empty? */
            p = ep + 1; goto init;  /* return luaws_pm_match(ms, s, ep + 1); */
          }
          else  /* '+' or no suffix */
            s = NULL;  /* fail */
        }
        else {  /* matched once */
          switch (*ep) {  /* handle optional suffix */
            case '?': {  /* optional */
              const char *res;
              if ((res = luaws_pm_match(ms, s + 1, ep + 1)) != NULL)
                s = res;
              else {
                p = ep + 1; goto init;  /* else return luaws_pm_match(ms, s, ep + 1); */
              }
              break;
            }
            case '+':  /* 1 or more repetitions */
              s++;  /* 1 match already done */
              /* FALLTHROUGH */
            case '*':  /* 0 or more repetitions */
              s = luaws_pm_max_expand(ms, s, p, ep);
              break;
            case '-':  /* 0 or more repetitions (minimum) */
              s = luaws_pm_min_expand(ms, s, p, ep);
              break;
            default:  /* no suffix */
              s++; p = ep; goto init;  /* return luaws_pm_match(ms, s + 1, ep); */
          }
        }
        break;
      }
    }
  }
  ms->matchdepth++;
  return s;
}



static const char *luaws_pm_lmemfind (luaws_MatchState *ms, const char *s1, size_t l1,
                               const char *s2, size_t l2) {
  if (l2 == 0) return s1;  /* empty strings are everywhere */
  else if (l2 > l1) return NULL;  /* avoids a negative 'l1' */
  else {
    const char *init;  /* to search for a '*s2' inside 's1' */
    l2--;  /* 1st char will be checked by 'memchr' */
    l1 = l1-l2;  /* 's2' cannot be found after that */
    while (l1 > 0 && (init = (const char *)memchr(s1, *s2, l1)) != NULL) {
      /* luaws: the bytes memchr skipped, and the comparison */
      luaws_pm_count(ms, 1 + (lua_Integer)(((size_t)(init - s1) + l2) / LUAWS_BYTES_PER_UNIT));
      init++;   /* 1st char is already checked */
      if (memcmp(init, s2+1, l2) == 0)
        return init-1;
      else {  /* correct 'l1' and 's1' to try again */
        l1 -= init-s1;
        s1 = init;
      }
    }
    return NULL;  /* not found */
  }
}


/*
** get information about the i-th capture. If there are no captures
** and 'i==0', return information about the whole match, which
** is the range 's'..'e'. If the capture is a string, return
** its length and put its address in '*cap'. If it is an integer
** (a position), push it on the stack and return LUAWS_PM_CAP_POSITION.
*/
static size_t luaws_pm_get_onecapture (luaws_MatchState *ms, int i, const char *s,
                              const char *e, const char **cap) {
  if (i >= ms->level) {
    if (luai_unlikely(i != 0))
      luaL_error(ms->L, "invalid capture index %%%d", i + 1);
    *cap = s;
    return e - s;
  }
  else {
    ptrdiff_t capl = ms->capture[i].len;
    *cap = ms->capture[i].init;
    if (luai_unlikely(capl == LUAWS_PM_CAP_UNFINISHED))
      luaL_error(ms->L, "unfinished capture");
    else if (capl == LUAWS_PM_CAP_POSITION)
      lua_pushinteger(ms->L, (ms->capture[i].init - ms->src_init) + 1);
    return capl;
  }
}


/*
** Push the i-th capture on the stack.
*/
static void luaws_pm_push_onecapture (luaws_MatchState *ms, int i, const char *s,
                                                    const char *e) {
  const char *cap;
  ptrdiff_t l = luaws_pm_get_onecapture(ms, i, s, e, &cap);
  if (l != LUAWS_PM_CAP_POSITION) {
    luaws_pm_count(ms, (lua_Integer)(l / LUAWS_BYTES_PER_UNIT));  /* luaws: the copy */
    lua_pushlstring(ms->L, cap, l);
  }
  /* else position was already pushed */
}


static int luaws_pm_push_captures (luaws_MatchState *ms, const char *s, const char *e) {
  int i;
  int nlevels = (ms->level == 0 && s) ? 1 : ms->level;
  luaL_checkstack(ms->L, nlevels, "too many captures");
  for (i = 0; i < nlevels; i++)
    luaws_pm_push_onecapture(ms, i, s, e);
  return nlevels;  /* number of strings pushed */
}


/* check whether pattern has no special characters */
static int luaws_pm_nospecials (const char *p, size_t l) {
  size_t upto = 0;
  do {
    if (strpbrk(p + upto, LUAWS_PM_SPECIALS))
      return 0;  /* pattern has a special character */
    upto += strlen(p + upto) + 1;  /* may have more after \0 */
  } while (upto <= l);
  return 1;  /* no special chars found */
}


static void luaws_pm_prepstate (luaws_MatchState *ms, lua_State *L,
                       const char *s, size_t ls, const char *p, size_t lp) {
  ms->L = L;
  ms->steps = 0;
  ms->matchdepth = LUAWS_PM_MAXCCALLS;
  ms->src_init = s;
  ms->src_end = s + ls;
  ms->p_end = p + lp;
}


static void luaws_pm_reprepstate (luaws_MatchState *ms) {
  ms->level = 0;
}


static int luaws_pm_str_find_aux (lua_State *L, int find) {
  size_t ls, lp;
  const char *s = luaL_checklstring(L, 1, &ls);
  const char *p = luaL_checklstring(L, 2, &lp);
  size_t init = luaws_pm_posrelatI(luaL_optinteger(L, 3, 1), ls) - 1;
  if (init > ls) {  /* start after string's end? */
    luaL_pushfail(L);  /* cannot find anything */
    return 1;
  }
  /* explicit request or no special characters? */
  if (find && (lua_toboolean(L, 4) || luaws_pm_nospecials(p, lp))) {
    /* do a plain search */
    luaws_MatchState ms;  /* luaws: only to count the work */
    luaws_pm_prepstate(&ms, L, s, ls, p, lp);
    luaws_pm_count(&ms, 1 + (lua_Integer)(lp / LUAWS_BYTES_PER_UNIT));
    const char *s2 = luaws_pm_lmemfind(&ms, s + init, ls - init, p, lp);
    luaws_pm_flush(&ms);
    if (s2) {
      lua_pushinteger(L, (s2 - s) + 1);
      lua_pushinteger(L, (s2 - s) + lp);
      return 2;
    }
  }
  else {
    luaws_MatchState ms;
    const char *s1 = s + init;
    int anchor = (*p == '^');
    if (anchor) {
      p++; lp--;  /* skip anchor character */
    }
    luaws_pm_prepstate(&ms, L, s, ls, p, lp);
    do {
      const char *res;
      luaws_pm_reprepstate(&ms);
      if ((res=luaws_pm_match(&ms, s1, p)) != NULL) {
        int n;
        if (find) {
          lua_pushinteger(L, (s1 - s) + 1);  /* start */
          lua_pushinteger(L, res - s);   /* end */
          n = luaws_pm_push_captures(&ms, NULL, 0) + 2;
        }
        else
          n = luaws_pm_push_captures(&ms, s1, res);
        luaws_pm_flush(&ms);  /* luaws */
        return n;
      }
    } while (s1++ < ms.src_end && !anchor);
    luaws_pm_flush(&ms);  /* luaws */
  }
  luaL_pushfail(L);  /* not found */
  return 1;
}


static int luaws_pm_str_find (lua_State *L) {
  return luaws_pm_str_find_aux(L, 1);
}


static int luaws_pm_str_match (lua_State *L) {
  return luaws_pm_str_find_aux(L, 0);
}


/* state for 'gmatch' */
typedef struct luaws_GMatchState {
  const char *src;  /* current position */
  const char *p;  /* pattern */
  const char *lastmatch;  /* end of last match */
  luaws_MatchState ms;  /* match state */
} luaws_GMatchState;


static int luaws_pm_gmatch_aux (lua_State *L) {
  luaws_GMatchState *gm = (luaws_GMatchState *)lua_touserdata(L, lua_upvalueindex(3));
  const char *src;
  gm->ms.L = L;
  for (src = gm->src; src <= gm->ms.src_end; src++) {
    const char *e;
    luaws_pm_reprepstate(&gm->ms);
    if ((e = luaws_pm_match(&gm->ms, src, gm->p)) != NULL && e != gm->lastmatch) {
      int n;
      gm->src = gm->lastmatch = e;
      n = luaws_pm_push_captures(&gm->ms, src, e);
      luaws_pm_flush(&gm->ms);  /* luaws */
      return n;
    }
  }
  gm->src = src;  /* luaws: a later call does not scan again what this one did */
  luaws_pm_flush(&gm->ms);  /* luaws */
  return 0;  /* not found */
}


static int luaws_pm_gmatch (lua_State *L) {
  size_t ls, lp;
  const char *s = luaL_checklstring(L, 1, &ls);
  const char *p = luaL_checklstring(L, 2, &lp);
  size_t init = luaws_pm_posrelatI(luaL_optinteger(L, 3, 1), ls) - 1;
  luaws_GMatchState *gm;
  lua_settop(L, 2);  /* keep strings on closure to avoid being collected */
  gm = (luaws_GMatchState *)lua_newuserdatauv(L, sizeof(luaws_GMatchState), 0);
  if (init > ls)  /* start after string's end? */
    init = ls + 1;  /* avoid overflows in 's + init' */
  luaws_pm_prepstate(&gm->ms, L, s, ls, p, lp);
  gm->src = s + init; gm->p = p; gm->lastmatch = NULL;
  lua_pushcclosure(L, luaws_pm_gmatch_aux, 3);
  return 1;
}


static void luaws_pm_add_s (luaws_MatchState *ms, luaL_Buffer *b, const char *s,
                                                   const char *e) {
  size_t l;
  lua_State *L = ms->L;
  const char *news = lua_tolstring(L, 3, &l);
  const char *p;
  while ((p = (char *)memchr(news, LUAWS_PM_L_ESC, l)) != NULL) {
    luaL_addlstring(b, news, p - news);
    p++;  /* skip ESC */
    if (*p == LUAWS_PM_L_ESC)  /* '%%' */
      luaL_addchar(b, *p);
    else if (*p == '0')  /* '%0' */
        luaL_addlstring(b, s, e - s);
    else if (isdigit(LUAWS_PM_UCHAR(*p))) {  /* '%n' */
      const char *cap;
      ptrdiff_t resl = luaws_pm_get_onecapture(ms, *p - '1', s, e, &cap);
      if (resl == LUAWS_PM_CAP_POSITION)
        luaL_addvalue(b);  /* add position to accumulated result */
      else
        luaL_addlstring(b, cap, resl);
    }
    else
      luaL_error(L, "invalid use of '%c' in replacement string", LUAWS_PM_L_ESC);
    l -= p + 1 - news;
    news = p + 1;
  }
  luaL_addlstring(b, news, l);
}


/*
** Add the replacement value to the string buffer 'b'.
** Return true if the original string was changed. (Function calls and
** table indexing resulting in nil or false do not change the subject.)
*/
static int luaws_pm_add_value (luaws_MatchState *ms, luaL_Buffer *b, const char *s,
                                      const char *e, int tr) {
  lua_State *L = ms->L;
  switch (tr) {
    case LUA_TFUNCTION: {  /* call the function */
      int n;
      lua_pushvalue(L, 3);  /* push the function */
      n = luaws_pm_push_captures(ms, s, e);  /* all captures as arguments */
      lua_call(L, n, 1);  /* call it */
      break;
    }
    case LUA_TTABLE: {  /* index the table */
      luaws_pm_push_onecapture(ms, 0, s, e);  /* first capture is the index */
      lua_gettable(L, 3);
      break;
    }
    default: {  /* LUA_TNUMBER or LUA_TSTRING */
      luaws_pm_add_s(ms, b, s, e);  /* add value to the buffer */
      return 1;  /* something changed */
    }
  }
  if (!lua_toboolean(L, -1)) {  /* nil or false? */
    lua_pop(L, 1);  /* remove value */
    luaL_addlstring(b, s, e - s);  /* keep original text */
    return 0;  /* no changes */
  }
  else if (luai_unlikely(!lua_isstring(L, -1)))
    return luaL_error(L, "invalid replacement value (a %s)",
                         luaL_typename(L, -1));
  else {
    luaL_addvalue(b);  /* add result to accumulator */
    return 1;  /* something changed */
  }
}


static int luaws_pm_str_gsub (lua_State *L) {
  size_t srcl, lp;
  const char *src = luaL_checklstring(L, 1, &srcl);  /* subject */
  const char *p = luaL_checklstring(L, 2, &lp);  /* pattern */
  const char *lastmatch = NULL;  /* end of last match */
  int tr = lua_type(L, 3);  /* replacement type */
  lua_Integer max_s = luaL_optinteger(L, 4, srcl + 1);  /* max replacements */
  int anchor = (*p == '^');
  lua_Integer n = 0;  /* replacement count */
  int changed = 0;  /* change flag */
  luaws_MatchState ms;
  luaL_Buffer b;
  luaL_argexpected(L, tr == LUA_TNUMBER || tr == LUA_TSTRING ||
                   tr == LUA_TFUNCTION || tr == LUA_TTABLE, 3,
                      "string/function/table");
  luaL_buffinit(L, &b);
  if (anchor) {
    p++; lp--;  /* skip anchor character */
  }
  luaws_pm_prepstate(&ms, L, src, srcl, p, lp);
  while (n < max_s) {
    const char *e;
    luaws_pm_reprepstate(&ms);  /* (re)prepare state for new match */
    if ((e = luaws_pm_match(&ms, src, p)) != NULL && e != lastmatch) {  /* match? */
      size_t before = luaL_bufflen(&b);  /* luaws: charge the replacement's bytes */
      n++;
      changed = luaws_pm_add_value(&ms, &b, src, e, tr) | changed;
      luaws_pm_count(&ms, (lua_Integer)((luaL_bufflen(&b) - before) / LUAWS_BYTES_PER_UNIT));
      src = lastmatch = e;
    }
    else if (src < ms.src_end)  /* otherwise, skip one character */
      luaL_addchar(&b, *src++);
    else break;  /* end of subject */
    if (anchor) break;
  }
  if (!changed)  /* no changes? */
    lua_pushvalue(L, 1);  /* return original string */
  else {  /* something changed */
    luaws_pm_count(&ms, (lua_Integer)((size_t)(ms.src_end - src) / LUAWS_BYTES_PER_UNIT));  /* luaws */
    luaL_addlstring(&b, src, ms.src_end-src);
    luaL_pushresult(&b);  /* create and return new string */
  }
  luaws_pm_flush(&ms);  /* luaws */
  lua_pushinteger(L, n);  /* number of substitutions */
  return 2;
}

/* }====================================================== */


/*
** {======================================================
** STRING FORMAT (lstrlib.c)
** =======================================================
*/

/*
** Maximum size for items formatted with '%f'. This size is produced
** by format('%.99f', -maxfloat), and is equal to 99 + 3 ('-', '.',
** and '\0') + number of decimal digits to represent maxfloat (which
** is maximum exponent + 1). (99+3+1, adding some extra, 110)
*/
#define LUAWS_MAX_ITEMF	(110 + l_floatatt(MAX_10_EXP))


/*
** All formats except '%f' do not need that large limit.  The other
** float formats use exponents, so that they fit in the 99 limit for
** significant digits; 's' for large strings and 'q' add items directly
** to the buffer; all integer formats also fit in the 99 limit.  The
** worst case are floats: they may need 99 significant digits, plus
** '0x', '-', '.', 'e+XXXX', and '\0'. Adding some extra, 120.
*/
#define LUAWS_MAX_ITEM	120


/* valid flags in a format specification */
/* valid flags for a, A, e, E, f, F, g, and G conversions */
#define LUAWS_L_FMTFLAGSF	"-+#0 "

/* valid flags for o, x, and X conversions */
#define LUAWS_L_FMTFLAGSX	"-#0"

/* valid flags for d and i conversions */
#define LUAWS_L_FMTFLAGSI	"-+0 "

/* valid flags for u conversions */
#define LUAWS_L_FMTFLAGSU	"-0"

/* valid flags for c, p, and s conversions */
#define LUAWS_L_FMTFLAGSC	"-"


/*
** Maximum size of each format specification (such as "%-099.99d"):
** Initial '%', flags (up to 5), width (2), period, precision (2),
** length modifier (8), conversion specifier, and final '\0', plus some
** extra.
*/
#define LUAWS_MAX_FORMAT	32


static void luaws_addquoted (luaL_Buffer *b, const char *s, size_t len) {
  luaL_addchar(b, '"');
  while (len--) {
    if (*s == '"' || *s == '\\' || *s == '\n') {
      luaL_addchar(b, '\\');
      luaL_addchar(b, *s);
    }
    else if (iscntrl(LUAWS_PM_UCHAR(*s))) {
      char buff[10];
      if (!isdigit(LUAWS_PM_UCHAR(*(s+1))))
        l_sprintf(buff, sizeof(buff), "\\%d", (int)LUAWS_PM_UCHAR(*s));
      else
        l_sprintf(buff, sizeof(buff), "\\%03d", (int)LUAWS_PM_UCHAR(*s));
      luaL_addstring(b, buff);
    }
    else
      luaL_addchar(b, *s);
    s++;
  }
  luaL_addchar(b, '"');
}


/*
** Serialize a floating-point number in such a way that it can be
** scanned back by Lua. Use hexadecimal format for "common" numbers
** (to preserve precision); inf, -inf, and NaN are handled separately.
** (NaN cannot be expressed as a numeral, so we write '(0/0)' for it.)
*/
static int luaws_quotefloat (lua_State *L, char *buff, lua_Number n) {
  const char *s;  /* for the fixed representations */
  if (n == (lua_Number)HUGE_VAL)  /* inf? */
    s = "1e9999";
  else if (n == -(lua_Number)HUGE_VAL)  /* -inf? */
    s = "-1e9999";
  else if (n != n)  /* NaN? */
    s = "(0/0)";
  else {  /* format number as hexadecimal */
    int  nb = lua_number2strx(L, buff, LUAWS_MAX_ITEM,
                                 "%" LUA_NUMBER_FRMLEN "a", n);
    /* ensures that 'buff' string uses a dot as the radix character */
    if (memchr(buff, '.', nb) == NULL) {  /* no dot? */
      char point = lua_getlocaledecpoint();  /* try locale point */
      char *ppoint = (char *)memchr(buff, point, nb);
      if (ppoint) *ppoint = '.';  /* change it to a dot */
    }
    return nb;
  }
  /* for the fixed representations */
  return l_sprintf(buff, LUAWS_MAX_ITEM, "%s", s);
}


static void luaws_addliteral (lua_State *L, luaL_Buffer *b, int arg) {
  switch (lua_type(L, arg)) {
    case LUA_TSTRING: {
      size_t len;
      const char *s = lua_tolstring(L, arg, &len);
      luaws_addquoted(b, s, len);
      break;
    }
    case LUA_TNUMBER: {
      char *buff = luaL_prepbuffsize(b, LUAWS_MAX_ITEM);
      int nb;
      if (!lua_isinteger(L, arg))  /* float? */
        nb = luaws_quotefloat(L, buff, lua_tonumber(L, arg));
      else {  /* integers */
        lua_Integer n = lua_tointeger(L, arg);
        const char *format = (n == LUA_MININTEGER)  /* corner case? */
                           ? "0x%" LUA_INTEGER_FRMLEN "x"  /* use hex */
                           : LUA_INTEGER_FMT;  /* else use default format */
        nb = l_sprintf(buff, LUAWS_MAX_ITEM, format, (LUAI_UACINT)n);
      }
      luaL_addsize(b, nb);
      break;
    }
    case LUA_TNIL: case LUA_TBOOLEAN: {
      luaL_tolstring(L, arg, NULL);
      luaL_addvalue(b);
      break;
    }
    default: {
      luaL_argerror(L, arg, "value has no literal form");
    }
  }
}


static const char *luaws_get2digits (const char *s) {
  if (isdigit(LUAWS_PM_UCHAR(*s))) {
    s++;
    if (isdigit(LUAWS_PM_UCHAR(*s))) s++;  /* (2 digits at most) */
  }
  return s;
}


/*
** Check whether a conversion specification is valid. When called,
** first character in 'form' must be '%' and last character must
** be a valid conversion specifier. 'flags' are the accepted flags;
** 'precision' signals whether to accept a precision.
*/
static void luaws_checkformat (lua_State *L, const char *form, const char *flags,
                                       int precision) {
  const char *spec = form + 1;  /* skip '%' */
  spec += strspn(spec, flags);  /* skip flags */
  if (*spec != '0') {  /* a width cannot start with '0' */
    spec = luaws_get2digits(spec);  /* skip width */
    if (*spec == '.' && precision) {
      spec++;
      spec = luaws_get2digits(spec);  /* skip precision */
    }
  }
  if (!isalpha(LUAWS_PM_UCHAR(*spec)))  /* did not go to the end? */
    luaL_error(L, "invalid conversion specification: '%s'", form);
}


/*
** Get a conversion specification and copy it to 'form'.
** Return the address of its last character.
*/
static const char *luaws_getformat (lua_State *L, const char *strfrmt,
                                            char *form) {
  /* spans flags, width, and precision ('0' is included as a flag) */
  size_t len = strspn(strfrmt, LUAWS_L_FMTFLAGSF "123456789.");
  len++;  /* adds following character (should be the specifier) */
  /* still needs space for '%', '\0', plus a length modifier */
  if (len >= LUAWS_MAX_FORMAT - 10)
    luaL_error(L, "invalid format (too long)");
  *(form++) = '%';
  memcpy(form, strfrmt, len * sizeof(char));
  *(form + len) = '\0';
  return strfrmt + len - 1;
}


/*
** add length modifier into formats
*/
static void luaws_addlenmod (char *form, const char *lenmod) {
  size_t l = strlen(form);
  size_t lm = strlen(lenmod);
  char spec = form[l - 1];
  strcpy(form + l - 1, lenmod);
  form[l + lm - 1] = spec;
  form[l + lm] = '\0';
}


static int luaws_str_format (lua_State *L) {
  int top = lua_gettop(L);
  int arg = 1;
  size_t sfl;
  const char *strfrmt = luaL_checklstring(L, arg, &sfl);
  const char *strfrmt_end = strfrmt+sfl;
  const char *flags;
  luaL_Buffer b;
  luaws_charge(L, 1 + (lua_Integer)(sfl / LUAWS_BYTES_PER_UNIT));  /* luaws: the format's own bytes */
  luaL_buffinit(L, &b);
  while (strfrmt < strfrmt_end) {
    if (*strfrmt != LUAWS_PM_L_ESC)
      luaL_addchar(&b, *strfrmt++);
    else if (*++strfrmt == LUAWS_PM_L_ESC)
      luaL_addchar(&b, *strfrmt++);  /* %% */
    else { /* format item */
      char form[LUAWS_MAX_FORMAT];  /* to store the format ('%...') */
      int maxitem = LUAWS_MAX_ITEM;  /* maximum length for the result */
      char *buff = luaL_prepbuffsize(&b, maxitem);  /* to put result */
      int nb = 0;  /* number of bytes in result */
      size_t before = luaL_bufflen(&b);  /* luaws: to charge what the item writes */
      if (++arg > top)
        return luaL_argerror(L, arg, "no value");
      strfrmt = luaws_getformat(L, strfrmt, form);
      switch (*strfrmt++) {
        case 'c': {
          luaws_checkformat(L, form, LUAWS_L_FMTFLAGSC, 0);
          nb = l_sprintf(buff, maxitem, form, (int)luaL_checkinteger(L, arg));
          break;
        }
        case 'd': case 'i':
          flags = LUAWS_L_FMTFLAGSI;
          goto intcase;
        case 'u':
          flags = LUAWS_L_FMTFLAGSU;
          goto intcase;
        case 'o': case 'x': case 'X':
          flags = LUAWS_L_FMTFLAGSX;
         intcase: {
          lua_Integer n = luaL_checkinteger(L, arg);
          luaws_checkformat(L, form, flags, 1);
          luaws_addlenmod(form, LUA_INTEGER_FRMLEN);
          nb = l_sprintf(buff, maxitem, form, (LUAI_UACINT)n);
          break;
        }
        case 'a': case 'A':
          luaws_checkformat(L, form, LUAWS_L_FMTFLAGSF, 1);
          luaws_addlenmod(form, LUA_NUMBER_FRMLEN);
          nb = lua_number2strx(L, buff, maxitem, form,
                                  luaL_checknumber(L, arg));
          break;
        case 'f':
          maxitem = LUAWS_MAX_ITEMF;  /* extra space for '%f' */
          buff = luaL_prepbuffsize(&b, maxitem);
          /* FALLTHROUGH */
        case 'e': case 'E': case 'g': case 'G': {
          lua_Number n = luaL_checknumber(L, arg);
          luaws_checkformat(L, form, LUAWS_L_FMTFLAGSF, 1);
          luaws_addlenmod(form, LUA_NUMBER_FRMLEN);
          nb = l_sprintf(buff, maxitem, form, (LUAI_UACNUMBER)n);
          break;
        }
        case 'p': {
          const void *p = lua_topointer(L, arg);
          luaws_checkformat(L, form, LUAWS_L_FMTFLAGSC, 0);
          if (p == NULL) {  /* avoid calling 'printf' with argument NULL */
            p = "(null)";  /* result */
            form[strlen(form) - 1] = 's';  /* format it as a string */
          }
          nb = l_sprintf(buff, maxitem, form, p);
          break;
        }
        case 'q': {
          if (form[2] != '\0')  /* modifiers? */
            return luaL_error(L, "specifier '%%q' cannot have modifiers");
          luaws_addliteral(L, &b, arg);
          break;
        }
        case 's': {
          size_t l;
          const char *s = luaL_tolstring(L, arg, &l);
          if (form[2] == '\0')  /* no modifiers? */
            luaL_addvalue(&b);  /* keep entire string */
          else {
            luaL_argcheck(L, l == strlen(s), arg, "string contains zeros");
            luaws_checkformat(L, form, LUAWS_L_FMTFLAGSC, 1);
            if (strchr(form, '.') == NULL && l >= 100) {
              /* no precision and string is too long to be formatted */
              luaL_addvalue(&b);  /* keep entire string */
            }
            else {  /* format the string into 'buff' */
              nb = l_sprintf(buff, maxitem, form, s);
              lua_pop(L, 1);  /* remove result from 'luaL_tolstring' */
            }
          }
          break;
        }
        default: {  /* also treat cases 'pnLlh' */
          return luaL_error(L, "invalid conversion '%s' to 'format'", form);
        }
      }
      luaL_addsize(&b, nb);
      luaws_charge(L, 1 + (lua_Integer)((luaL_bufflen(&b) - before) / LUAWS_BYTES_PER_UNIT));  /* luaws */
    }
  }
  luaL_pushresult(&b);
  return 1;
}

/* }====================================================== */




/*
** {======================================================
** TABLE FUNCTIONS (ltablib.c)
** =======================================================
*/


/*
** Operations that an object must define to mimic a table
** (some functions only need some of them)
*/
#define LUAWS_TAB_R	1			/* read */
#define LUAWS_TAB_W	2			/* write */
#define LUAWS_TAB_L	4			/* length */
#define LUAWS_TAB_RW	(LUAWS_TAB_R | LUAWS_TAB_W)		/* read/write */


#define luaws_aux_getn(L,n,w)	(luaws_checktab(L, n, (w) | LUAWS_TAB_L), luaL_len(L, n))


static int luaws_checkfield (lua_State *L, const char *key, int n) {
  lua_pushstring(L, key);
  return (lua_rawget(L, -n) != LUA_TNIL);
}


/*
** Check that 'arg' either is a table or can behave like one (that is,
** has a metatable with the required metamethods)
*/
static void luaws_checktab (lua_State *L, int arg, int what) {
  if (lua_type(L, arg) != LUA_TTABLE) {  /* is it not a table? */
    int n = 1;  /* number of elements to pop */
    if (lua_getmetatable(L, arg) &&  /* must have metatable */
        (!(what & LUAWS_TAB_R) || luaws_checkfield(L, "__index", ++n)) &&
        (!(what & LUAWS_TAB_W) || luaws_checkfield(L, "__newindex", ++n)) &&
        (!(what & LUAWS_TAB_L) || luaws_checkfield(L, "__len", ++n))) {
      lua_pop(L, n);  /* pop metatable and tested metamethods */
    }
    else
      luaL_checktype(L, arg, LUA_TTABLE);  /* force an error */
  }
}


static int luaws_tinsert (lua_State *L) {
  lua_Integer pos;  /* where to insert new element */
  lua_Integer e = luaws_aux_getn(L, 1, LUAWS_TAB_RW);
  e = luaL_intop(+, e, 1);  /* first empty element */
  switch (lua_gettop(L)) {
    case 2: {  /* called with only 2 arguments */
      pos = e;  /* insert new element at the end */
      break;
    }
    case 3: {
      lua_Integer i;
      pos = luaL_checkinteger(L, 2);  /* 2nd argument is the position */
      /* check whether 'pos' is in [1, e] */
      luaL_argcheck(L, (lua_Unsigned)pos - 1u < (lua_Unsigned)e, 2,
                       "position out of bounds");
      luaws_charge(L, e - pos);  /* luaws: the elements to shift */
      for (i = e; i > pos; i--) {  /* move up elements */
        lua_geti(L, 1, i - 1);
        lua_seti(L, 1, i);  /* t[i] = t[i - 1] */
      }
      break;
    }
    default: {
      return luaL_error(L, "wrong number of arguments to 'insert'");
    }
  }
  lua_seti(L, 1, pos);  /* t[pos] = v */
  return 0;
}


static int luaws_tremove (lua_State *L) {
  lua_Integer size = luaws_aux_getn(L, 1, LUAWS_TAB_RW);
  lua_Integer pos = luaL_optinteger(L, 2, size);
  if (pos != size)  /* validate 'pos' if given */
    /* check whether 'pos' is in [1, size + 1] */
    luaL_argcheck(L, (lua_Unsigned)pos - 1u <= (lua_Unsigned)size, 1,
                     "position out of bounds");
  if (pos < size) luaws_charge(L, size - pos);  /* luaws: the elements to shift */
  lua_geti(L, 1, pos);  /* result = t[pos] */
  for ( ; pos < size; pos++) {
    lua_geti(L, 1, pos + 1);
    lua_seti(L, 1, pos);  /* t[pos] = t[pos + 1] */
  }
  lua_pushnil(L);
  lua_seti(L, 1, pos);  /* remove entry t[pos] */
  return 1;
}


/*
** Copy elements (1[f], ..., 1[e]) into (tt[t], tt[t+1], ...). Whenever
** possible, copy in increasing order, which is better for rehashing.
** "possible" means destination after original range, or smaller
** than origin, or copying to another table.
*/
static int luaws_tmove (lua_State *L) {
  lua_Integer f = luaL_checkinteger(L, 2);
  lua_Integer e = luaL_checkinteger(L, 3);
  lua_Integer t = luaL_checkinteger(L, 4);
  int tt = !lua_isnoneornil(L, 5) ? 5 : 1;  /* destination table */
  luaws_checktab(L, 1, LUAWS_TAB_R);
  luaws_checktab(L, tt, LUAWS_TAB_W);
  if (e >= f) {  /* otherwise, nothing to move */
    lua_Integer n, i;
    luaL_argcheck(L, f > 0 || e < LUA_MAXINTEGER + f, 3,
                  "too many elements to move");
    n = e - f + 1;  /* number of elements to move */
    luaL_argcheck(L, t <= LUA_MAXINTEGER - n + 1, 4,
                  "destination wrap around");
    luaws_charge(L, n);  /* luaws: every element, before moving any */
    if (t > e || t <= f || (tt != 1 && !lua_compare(L, 1, tt, LUA_OPEQ))) {
      for (i = 0; i < n; i++) {
        lua_geti(L, 1, f + i);
        lua_seti(L, tt, t + i);
      }
    }
    else {
      for (i = n - 1; i >= 0; i--) {
        lua_geti(L, 1, f + i);
        lua_seti(L, tt, t + i);
      }
    }
  }
  lua_pushvalue(L, tt);  /* return destination table */
  return 1;
}


static void luaws_addfield (lua_State *L, luaL_Buffer *b, lua_Integer i) {
  lua_geti(L, 1, i);
  if (luai_unlikely(!lua_isstring(L, -1)))
    luaL_error(L, "invalid value (%s) at index %I in table for 'concat'",
                  luaL_typename(L, -1), (LUAI_UACINT)i);
  /* luaws: the element and its bytes (a number's few are in the 1) */
  luaws_charge(L, 1 + (lua_Integer)(lua_rawlen(L, -1) / LUAWS_BYTES_PER_UNIT));
  luaL_addvalue(b);
}


static int luaws_tconcat (lua_State *L) {
  luaL_Buffer b;
  lua_Integer last = luaws_aux_getn(L, 1, LUAWS_TAB_R);
  size_t lsep;
  const char *sep = luaL_optlstring(L, 2, "", &lsep);
  lua_Integer i = luaL_optinteger(L, 3, 1);
  last = luaL_optinteger(L, 4, last);
  luaL_buffinit(L, &b);
  for (; i < last; i++) {
    luaws_addfield(L, &b, i);
    if (lsep >= LUAWS_BYTES_PER_UNIT) luaws_charge(L, (lua_Integer)(lsep / LUAWS_BYTES_PER_UNIT));  /* luaws */
    luaL_addlstring(&b, sep, lsep);
  }
  if (i == last)  /* add last value (if interval was not empty) */
    luaws_addfield(L, &b, i);
  luaL_pushresult(&b);
  return 1;
}


/*
** {======================================================
** Quicksort
** (based on 'Algorithms in MODULA-3', Robert Sedgewick;
**  Addison-Wesley, 1993.)
** =======================================================
*/


/* type for array indices */
typedef unsigned int luaws_IdxT;


/*
** Produce a "random" 'unsigned int' to randomize pivot choice. This
** macro is used only when 'sort' detects a big imbalance in the result
** of a partition. (If you don't want/need this "randomness", ~0 is a
** good choice.)
*/
/* size of 'e' measured in number of 'unsigned int's */
#define LUAWS_sof(e)		(sizeof(e) / sizeof(unsigned int))

/*
** Use 'time' and 'clock' as sources of "randomness". Because we don't
** know the types 'clock_t' and 'time_t', we cannot cast them to
** anything without risking overflows. A safe way to use their values
** is to copy them to an array of a known type and use the array values.
*/
static unsigned int luaws_l_randomizePivot (void) {
  clock_t c = clock();
  time_t t = time(NULL);
  unsigned int buff[LUAWS_sof(c) + LUAWS_sof(t)];
  unsigned int i, rnd = 0;
  memcpy(buff, &c, LUAWS_sof(c) * sizeof(unsigned int));
  memcpy(buff + LUAWS_sof(c), &t, LUAWS_sof(t) * sizeof(unsigned int));
  for (i = 0; i < LUAWS_sof(buff); i++)
    rnd += buff[i];
  return rnd;
}



/* arrays larger than 'LUAWS_RANLIMIT' may use randomized pivots */
#define LUAWS_RANLIMIT	100u


static void luaws_set2 (lua_State *L, luaws_IdxT i, luaws_IdxT j) {
  lua_seti(L, 1, i);
  lua_seti(L, 1, j);
}


/*
** Return true iff value at stack index 'a' is less than the value at
** index 'b' (according to the order of the sort).
*/
static int luaws_sort_comp (lua_State *L, int a, int b) {
  if (lua_isnil(L, 2))  /* no function? */
    return lua_compare(L, a, b, LUA_OPLT);  /* a < b */
  else {  /* function */
    int res;
    lua_pushvalue(L, 2);    /* push function */
    lua_pushvalue(L, a-1);  /* -1 to compensate function */
    lua_pushvalue(L, b-2);  /* -2 to compensate function and 'a' */
    lua_call(L, 2, 1);      /* call function */
    res = lua_toboolean(L, -1);  /* get result */
    lua_pop(L, 1);          /* pop result */
    return res;
  }
}


/*
** Does the partition: Pivot P is at the top of the stack.
** precondition: a[lo] <= P == a[up-1] <= a[up],
** so it only needs to do the partition from lo + 1 to up - 2.
** Pos-condition: a[lo .. i - 1] <= a[i] == P <= a[i + 1 .. up]
** returns 'i'.
*/
static luaws_IdxT luaws_partition (lua_State *L, luaws_IdxT lo, luaws_IdxT up) {
  luaws_IdxT i = lo;  /* will be incremented before first use */
  luaws_IdxT j = up - 1;  /* will be decremented before first use */
  /* loop invariant: a[lo .. i] <= P <= a[j .. up] */
  for (;;) {
    /* next loop: repeat ++i while a[i] < P */
    while ((void)lua_geti(L, 1, ++i), luaws_sort_comp(L, -1, -2)) {
      if (luai_unlikely(i == up - 1))  /* a[i] < P  but a[up - 1] == P  ?? */
        luaL_error(L, "invalid order function for sorting");
      lua_pop(L, 1);  /* remove a[i] */
    }
    /* after the loop, a[i] >= P and a[lo .. i - 1] < P */
    /* next loop: repeat --j while P < a[j] */
    while ((void)lua_geti(L, 1, --j), luaws_sort_comp(L, -3, -1)) {
      if (luai_unlikely(j < i))  /* j < i  but  a[j] > P ?? */
        luaL_error(L, "invalid order function for sorting");
      lua_pop(L, 1);  /* remove a[j] */
    }
    /* after the loop, a[j] <= P and a[j + 1 .. up] >= P */
    if (j < i) {  /* no elements out of place? */
      /* a[lo .. i - 1] <= P <= a[j + 1 .. i .. up] */
      lua_pop(L, 1);  /* pop a[j] */
      /* swap pivot (a[up - 1]) with a[i] to satisfy pos-condition */
      luaws_set2(L, up - 1, i);
      return i;
    }
    /* otherwise, swap a[i] - a[j] to restore invariant and repeat */
    luaws_set2(L, i, j);
  }
}


/*
** Choose an element in the middle (2nd-3th quarters) of [lo,up]
** "randomized" by 'rnd'
*/
static luaws_IdxT luaws_choosePivot (luaws_IdxT lo, luaws_IdxT up, unsigned int rnd) {
  luaws_IdxT r4 = (up - lo) / 4;  /* range/4 */
  luaws_IdxT p = rnd % (r4 * 2) + (lo + r4);
  return p;
}


/*
** Quicksort algorithm (recursive function)
*/
static void luaws_auxsort (lua_State *L, luaws_IdxT lo, luaws_IdxT up,
                                   unsigned int rnd) {
  while (lo < up) {  /* loop for tail recursion */
    luaws_IdxT p;  /* Pivot index */
    luaws_IdxT n;  /* to be used later */
    /* sort elements 'lo', 'p', and 'up' */
    lua_geti(L, 1, lo);
    lua_geti(L, 1, up);
    if (luaws_sort_comp(L, -1, -2))  /* a[up] < a[lo]? */
      luaws_set2(L, lo, up);  /* swap a[lo] - a[up] */
    else
      lua_pop(L, 2);  /* remove both values */
    if (up - lo == 1)  /* only 2 elements? */
      return;  /* already sorted */
    if (up - lo < LUAWS_RANLIMIT || rnd == 0)  /* small interval or no randomize? */
      p = (lo + up)/2;  /* middle element is a good pivot */
    else  /* for larger intervals, it is worth a random pivot */
      p = luaws_choosePivot(lo, up, rnd);
    lua_geti(L, 1, p);
    lua_geti(L, 1, lo);
    if (luaws_sort_comp(L, -2, -1))  /* a[p] < a[lo]? */
      luaws_set2(L, p, lo);  /* swap a[p] - a[lo] */
    else {
      lua_pop(L, 1);  /* remove a[lo] */
      lua_geti(L, 1, up);
      if (luaws_sort_comp(L, -1, -2))  /* a[up] < a[p]? */
        luaws_set2(L, p, up);  /* swap a[up] - a[p] */
      else
        lua_pop(L, 2);
    }
    if (up - lo == 2)  /* only 3 elements? */
      return;  /* already sorted */
    lua_geti(L, 1, p);  /* get middle element (Pivot) */
    lua_pushvalue(L, -1);  /* push Pivot */
    lua_geti(L, 1, up - 1);  /* push a[up - 1] */
    luaws_set2(L, p, up - 1);  /* swap Pivot (a[p]) with a[up - 1] */
    p = luaws_partition(L, lo, up);
    /* a[lo .. p - 1] <= a[p] == P <= a[p + 1 .. up] */
    if (p - lo < up - p) {  /* lower interval is smaller? */
      luaws_auxsort(L, lo, p - 1, rnd);  /* call recursively for lower interval */
      n = p - lo;  /* size of smaller interval */
      lo = p + 1;  /* tail call for [p + 1 .. up] (upper interval) */
    }
    else {
      luaws_auxsort(L, p + 1, up, rnd);  /* call recursively for upper interval */
      n = up - p;  /* size of smaller interval */
      up = p - 1;  /* tail call for [lo .. p - 1]  (lower interval) */
    }
    if ((up - lo) / 128 > n) /* partition too imbalanced? */
      rnd = luaws_l_randomizePivot();  /* try a new randomization */
  }  /* tail call luaws_auxsort(L, lo, up, rnd) */
}


static int luaws_sort (lua_State *L) {
  lua_Integer n = luaws_aux_getn(L, 1, LUAWS_TAB_RW);
  if (n > 1) {  /* non-trivial interval? */
    luaL_argcheck(L, n < INT_MAX, 1, "array too big");
    if (!lua_isnoneornil(L, 2))  /* is there a 2nd argument? */
      luaL_checktype(L, 2, LUA_TFUNCTION);  /* must be a function */
    lua_settop(L, 2);  /* make sure there are two arguments */
    luaws_charge(L, n * luaws_log2_ceil(n));  /* luaws: n log n comparisons and moves, up front */
    luaws_auxsort(L, 1, (luaws_IdxT)n, 0);
  }
  return 0;
}

/* }====================================================== */


/*
** luaws: string.rep as Lua 5.4.4's, but charged for its whole result before allocating it,
** and filled by doubling (a few large copies instead of n small ones, so that the charge
** per byte covers the work even for a one-byte string).
*/
static int luaws_str_rep (lua_State *L) {
  size_t l, lsep;
  const char *s = luaL_checklstring(L, 1, &l);
  lua_Integer n = luaL_checkinteger(L, 2);
  const char *sep = luaL_optlstring(L, 3, "", &lsep);
  if (n <= 0 || l + lsep == 0)  /* (Lua loops n times for an empty result: not here) */
    lua_pushliteral(L, "");
  else if (luai_unlikely(l + lsep < l || l + lsep > LUAWS_STR_MAXSIZE / n))
    return luaL_error(L, "resulting string too large");
  else {
    size_t totallen = (size_t)n * l + (size_t)(n - 1) * lsep;
    size_t unit = l + lsep, body = (size_t)(n - 1) * unit, filled;
    luaL_Buffer b;
    char *p;
    luaws_charge(L, 1 + (lua_Integer)(totallen / LUAWS_BYTES_PER_UNIT));
    p = luaL_buffinitsize(L, &b, totallen);
    /* n-1 copies of s followed by sep, then s: the first unit, then the body doubles
       (copying from its own start keeps the period), then the last copy */
    if (body > 0) {
      memcpy(p, s, l);
      if (lsep > 0) memcpy(p + l, sep, lsep);
      for (filled = unit; filled < body; ) {
        size_t chunk = filled < body - filled ? filled : body - filled;
        memcpy(p + filled, p, chunk);
        filled += chunk;
      }
    }
    memcpy(p + body, s, l);
    luaL_pushresultsize(&b, totallen);
  }
  return 1;
}


/*
** Lua 5.4.4's string.sub, reverse, lower and upper, charged for the bytes they copy (sub:
** memcpy, one unit per LUAWS_BYTES_PER_UNIT) or walk one by one (one unit per
** LUAWS_BYTES_PER_LOOP_UNIT), before allocating.
*/
#define LUAWS_BYTES_PER_LOOP_UNIT 8

static size_t luaws_getendpos (lua_State *L, int arg, lua_Integer def,
                         size_t len) {
  lua_Integer pos = luaL_optinteger(L, arg, def);
  if (pos > (lua_Integer)len)
    return len;
  else if (pos >= 0)
    return (size_t)pos;
  else if (pos < -(lua_Integer)len)
    return 0;
  else return len + (size_t)pos + 1;
}

static int luaws_str_sub (lua_State *L) {
  size_t l;
  const char *s = luaL_checklstring(L, 1, &l);
  size_t start = luaws_pm_posrelatI(luaL_checkinteger(L, 2), l);
  size_t end = luaws_getendpos(L, 3, -1, l);
  if (start <= end) {
    luaws_charge(L, 1 + (lua_Integer)(((end - start) + 1) / LUAWS_BYTES_PER_UNIT));  /* luaws */
    lua_pushlstring(L, s + start - 1, (end - start) + 1);
  }
  else lua_pushliteral(L, "");
  return 1;
}


static int luaws_str_reverse (lua_State *L) {
  size_t l, i;
  luaL_Buffer b;
  const char *s = luaL_checklstring(L, 1, &l);
  luaws_charge(L, 1 + (lua_Integer)(l / LUAWS_BYTES_PER_LOOP_UNIT));  /* luaws */
  char *p = luaL_buffinitsize(L, &b, l);
  for (i = 0; i < l; i++)
    p[i] = s[l - i - 1];
  luaL_pushresultsize(&b, l);
  return 1;
}


static int luaws_str_lower (lua_State *L) {
  size_t l;
  size_t i;
  luaL_Buffer b;
  const char *s = luaL_checklstring(L, 1, &l);
  luaws_charge(L, 1 + (lua_Integer)(l / LUAWS_BYTES_PER_LOOP_UNIT));  /* luaws */
  char *p = luaL_buffinitsize(L, &b, l);
  for (i=0; i<l; i++)
    p[i] = tolower(LUAWS_PM_UCHAR(s[i]));
  luaL_pushresultsize(&b, l);
  return 1;
}


static int luaws_str_upper (lua_State *L) {
  size_t l;
  size_t i;
  luaL_Buffer b;
  const char *s = luaL_checklstring(L, 1, &l);
  luaws_charge(L, 1 + (lua_Integer)(l / LUAWS_BYTES_PER_LOOP_UNIT));  /* luaws */
  char *p = luaL_buffinitsize(L, &b, l);
  for (i=0; i<l; i++)
    p[i] = toupper(LUAWS_PM_UCHAR(s[i]));
  luaL_pushresultsize(&b, l);
  return 1;
}


/*
** luaws: puts the charged functions in the real `string` and `table` tables (the string
** metatable's __index is that `string` table, so ("x"):rep reaches them too), and removes
** string.dump. Run right after luaL_openlibs, before the prelude copies the tables.
*/
static void luaws_open_charged_libs (lua_State *L) {
  static const luaL_Reg strfuncs[] = {
    {"find", luaws_pm_str_find},
    {"match", luaws_pm_str_match},
    {"gmatch", luaws_pm_gmatch},
    {"gsub", luaws_pm_str_gsub},
    {"rep", luaws_str_rep},
    {"format", luaws_str_format},
    {"sub", luaws_str_sub},
    {"reverse", luaws_str_reverse},
    {"lower", luaws_str_lower},
    {"upper", luaws_str_upper},
    {NULL, NULL}
  };
  static const luaL_Reg tabfuncs[] = {
    {"concat", luaws_tconcat},
    {"insert", luaws_tinsert},
    {"remove", luaws_tremove},
    {"move", luaws_tmove},
    {"sort", luaws_sort},
    {NULL, NULL}
  };
  luaL_checkstack(L, 2, NULL);
  lua_getglobal(L, "string");
  luaL_setfuncs(L, strfuncs, 0);
  lua_pushnil(L);
  lua_setfield(L, -2, "dump");
  lua_pop(L, 1);
  lua_getglobal(L, "table");
  luaL_setfuncs(L, tabfuncs, 0);
  lua_pop(L, 1);
}

#endif
