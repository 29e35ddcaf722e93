//! The sandbox's `string.find`, `string.match`, `string.gmatch` and `string.gsub`: Lua 5.4's
//! semantics on top of the metered matcher in `pattern.rs`, so that no single call of these
//! can run past the plugin call's step budget or deadline (Lua's own versions are C functions
//! that no instruction hook can interrupt).
//!
//! They are C functions written in Rust against Lua's C API, as `lstrlib.c`'s are: arguments
//! are checked with `luaL_check*` (same coercions and messages), errors are raised with the
//! caller's position, `gsub`'s output is built in a Lua userdata (counted by the memory limit)
//! and its replacement functions are called with `lua_call`, so their errors pass through
//! unchanged. A call costs about what Lua's own does (no mlua callback, no argument conversion).
//!
//! Safety: Lua raises errors with `longjmp`, which skips Rust destructors. While a Lua API call
//! that can raise is running, the Rust frames of this module hold only plain data (slices into
//! Lua strings anchored on the stack, integers, the matcher), and the pure matching code runs
//! under `catch_unwind` so that a panic never unwinds into Lua's C frames.

use std::ffi::{c_char, c_int, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use mlua::{ffi, Function, Lua, Table};

use super::pattern::{self, Capture, Fail, Matcher, Meter, PatError};

/// Raised (and the call tripped) when the plugin call's step budget is spent.
pub(crate) const BUDGET_MESSAGE: &str =
    "pattern too complex: step budget exceeded (the plugin's CPU limit)";
/// Raised (and the call tripped) when the plugin call's deadline passes during matching.
pub(crate) const DEADLINE_MESSAGE: &str = "CPU time limit exceeded";

/// What the pattern functions need from the plugin call they run in.
pub(crate) trait Limits: Send + Sync + 'static {
    /// Matching steps left in the current plugin call.
    fn steps_left(&self) -> u64;
    /// Record `steps` as spent.
    fn spend(&self, steps: u64);
    /// Whether the call's deadline has passed.
    fn expired(&self) -> bool;
    /// Mark the call as stopped by its CPU limit (scripts cannot swallow it with pcall).
    fn trip(&self);
}

/// Keeps the limits the C functions point at alive as long as the Lua state. Boxed: the
/// closures hold the address of each `Arc`, which must not move when the vector grows.
#[allow(clippy::vec_box)]
struct KeepAlive(Vec<Box<Arc<dyn Limits>>>);

/// Replace `target`'s find/match/gmatch/gsub with the bounded versions.
pub(crate) fn install(lua: &Lua, target: &Table, limits: Arc<dyn Limits>) -> mlua::Result<()> {
    let boxed = Box::new(limits);
    let ptr = &*boxed as *const Arc<dyn Limits> as *mut c_void;
    let mut boxed = Some(boxed);
    if let Some(mut keep) = lua.app_data_mut::<KeepAlive>() {
        keep.0.extend(boxed.take());
    }
    if let Some(b) = boxed {
        lua.set_app_data(KeepAlive(vec![b]));
    }
    let functions: [(&str, ffi::lua_CFunction); 4] = [
        ("find", l_find),
        ("match", l_match),
        ("gmatch", l_gmatch),
        ("gsub", l_gsub),
    ];
    for (name, f) in functions {
        // SAFETY: pushes one C closure whose upvalue points into `KeepAlive`, which lives as
        // long as the state.
        let func: Function = unsafe {
            lua.exec_raw((), |l| {
                ffi::lua_pushlightuserdata(l, ptr);
                ffi::lua_pushcclosure(l, f, 1);
            })
        }?;
        target.raw_set(name, func)?;
    }
    Ok(())
}

extern "C-unwind" {
    fn luaL_typeerror(l: *mut ffi::lua_State, arg: c_int, tname: *const c_char) -> c_int;
}

type L = *mut ffi::lua_State;

/// The limits behind upvalue 1 of the running C closure.
unsafe fn limits<'a>(l: L) -> &'a dyn Limits {
    let p = ffi::lua_touserdata(l, ffi::lua_upvalueindex(1)) as *const Arc<dyn Limits>;
    &**p
}

/// The bytes of the string at `idx` (a number there is converted in place, as Lua does).
/// Valid while that stack slot (or upvalue) holds the string.
unsafe fn check_bytes<'a>(l: L, idx: c_int) -> &'a [u8] {
    let mut len = 0usize;
    let p = ffi::luaL_checklstring(l, idx, &mut len);
    std::slice::from_raw_parts(p.cast(), len)
}

unsafe fn push_bytes(l: L, b: &[u8]) {
    ffi::lua_pushlstring(l, b.as_ptr().cast(), b.len());
}

/// A message assembled without allocating (it must not need a destructor when Lua raises).
struct Msg {
    buf: [u8; 128],
    len: usize,
}

impl Msg {
    fn new() -> Self {
        Msg {
            buf: [0; 128],
            len: 0,
        }
    }

    fn push(&mut self, s: &[u8]) -> &mut Self {
        let n = s.len().min(self.buf.len() - 1 - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
        self
    }

    fn push_int(&mut self, v: i64) -> &mut Self {
        let mut digits = [0u8; 24];
        let mut i = digits.len();
        let mut u = v.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (u % 10) as u8;
            u /= 10;
            if u == 0 {
                break;
            }
        }
        if v < 0 {
            i -= 1;
            digits[i] = b'-';
        }
        self.push(&digits[i..])
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Raise `msg` with the caller's position, as `luaL_error` does.
unsafe fn raise(l: L, msg: &[u8]) -> ! {
    ffi::luaL_where(l, 1);
    push_bytes(l, msg);
    ffi::lua_concat(l, 2);
    ffi::lua_error(l)
}

unsafe fn raise_pattern(l: L, e: PatError) -> ! {
    let mut m = Msg::new();
    e.write(&mut |s| {
        m.push(s);
    });
    raise(l, m.bytes())
}

/// Raise the error for a failed match; the budget and the deadline trip the call.
unsafe fn raise_fail(l: L, limits: &dyn Limits, f: Fail) -> ! {
    match f {
        Fail::Error(e) => raise_pattern(l, e),
        Fail::Budget => {
            limits.trip();
            raise(l, BUDGET_MESSAGE.as_bytes())
        }
        Fail::Deadline => {
            limits.trip();
            raise(l, DEADLINE_MESSAGE.as_bytes())
        }
    }
}

/// Run pure matching code; a panic (a bug) becomes a Lua error instead of unwinding into C.
unsafe fn guarded<T>(l: L, f: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(v) => v,
        Err(payload) => {
            drop(payload);
            raise(l, b"internal error in pattern matching")
        }
    }
}

/// Push capture `i` of the last match `s..e` of `m` (Lua's `push_onecapture`).
unsafe fn push_capture(l: L, m: &Matcher<'_, '_, '_>, src: &[u8], i: usize, s: usize, e: usize) {
    match m.capture(i, s, e) {
        Ok(Capture::Str(a, b)) => push_bytes(l, &src[a..b]),
        Ok(Capture::Position(p)) => ffi::lua_pushinteger(l, p as ffi::lua_Integer + 1),
        Ok(Capture::Unfinished) => raise_pattern(l, PatError::UnfinishedCapture),
        Err(Fail::Error(pe)) => raise_pattern(l, pe),
        Err(_) => raise(l, b"invalid capture"),
    }
}

/// Push every capture, or the whole match when there are none and `whole` is set (Lua's
/// `push_captures`). Returns how many values were pushed.
unsafe fn push_captures(
    l: L,
    m: &Matcher<'_, '_, '_>,
    src: &[u8],
    s: usize,
    e: usize,
    whole: bool,
) -> c_int {
    let n = if m.level() == 0 && whole {
        1
    } else {
        m.level()
    };
    ffi::luaL_checkstack(l, n as c_int, c"too many captures".as_ptr());
    for i in 0..n {
        push_capture(l, m, src, i, s, e);
    }
    n as c_int
}

unsafe extern "C-unwind" fn l_find(l: L) -> c_int {
    find_aux(l, true)
}

unsafe extern "C-unwind" fn l_match(l: L) -> c_int {
    find_aux(l, false)
}

/// `string.find` (`find`) and `string.match` (`!find`).
unsafe fn find_aux(l: L, find: bool) -> c_int {
    let src = check_bytes(l, 1);
    let pat = check_bytes(l, 2);
    let init = pattern::start_position(ffi::luaL_optinteger(l, 3, 1), src.len()) - 1;
    if init > src.len() {
        ffi::lua_pushnil(l);
        return 1;
    }
    let limits = limits(l);
    let expired = || limits.expired();
    let mut meter = Meter::new(limits.steps_left(), &expired);
    if find && (ffi::lua_toboolean(l, 4) != 0 || !pattern::has_specials(pat)) {
        let found = guarded(l, || pattern::find_plain(src, pat, init, &mut meter));
        limits.spend(meter.used());
        return match found {
            Ok(Some(i)) => {
                ffi::lua_pushinteger(l, i as ffi::lua_Integer + 1);
                ffi::lua_pushinteger(l, (i + pat.len()) as ffi::lua_Integer);
                2
            }
            Ok(None) => {
                ffi::lua_pushnil(l);
                1
            }
            Err(f) => raise_fail(l, limits, f),
        };
    }
    let mut m = Matcher::new(src, pat, &mut meter);
    let found = guarded(l, || pattern::search(&mut m, init));
    limits.spend(m.meter().used());
    match found {
        Ok(Some((s, e))) if find => {
            ffi::lua_pushinteger(l, s as ffi::lua_Integer + 1);
            ffi::lua_pushinteger(l, e as ffi::lua_Integer);
            2 + push_captures(l, &m, src, s, e, false)
        }
        Ok(Some((s, e))) => push_captures(l, &m, src, s, e, true),
        Ok(None) => {
            ffi::lua_pushnil(l);
            1
        }
        Err(f) => raise_fail(l, limits, f),
    }
}

// gmatch iterator upvalues: 1 limits, 2 subject, 3 pattern, 4 next position, 5 end of the
// last match (-1: none).
const GM_SRC: c_int = 2;
const GM_PAT: c_int = 3;
const GM_POS: c_int = 4;
const GM_LAST: c_int = 5;

/// `string.gmatch(s, pattern [, init])`: returns the iterator.
unsafe extern "C-unwind" fn l_gmatch(l: L) -> c_int {
    let len = check_bytes(l, 1).len();
    check_bytes(l, 2);
    let init = pattern::start_position(ffi::luaL_optinteger(l, 3, 1), len) - 1;
    let init = init.min(len + 1);
    ffi::lua_settop(l, 2);
    ffi::lua_pushvalue(l, ffi::lua_upvalueindex(1));
    ffi::lua_pushvalue(l, 1);
    ffi::lua_pushvalue(l, 2);
    ffi::lua_pushinteger(l, init as ffi::lua_Integer);
    ffi::lua_pushinteger(l, -1);
    ffi::lua_pushcclosure(l, gmatch_next, 5);
    1
}

unsafe extern "C-unwind" fn gmatch_next(l: L) -> c_int {
    let src = check_bytes(l, ffi::lua_upvalueindex(GM_SRC));
    let pat = check_bytes(l, ffi::lua_upvalueindex(GM_PAT));
    let pos = ffi::lua_tointegerx(l, ffi::lua_upvalueindex(GM_POS), std::ptr::null_mut());
    let last = ffi::lua_tointegerx(l, ffi::lua_upvalueindex(GM_LAST), std::ptr::null_mut());
    let last = usize::try_from(last).ok();
    let limits = limits(l);
    let expired = || limits.expired();
    let mut meter = Meter::new(limits.steps_left(), &expired);
    let mut m = Matcher::new(src, pat, &mut meter);
    let mut at = usize::try_from(pos).unwrap_or(0);
    let found = guarded(l, || -> Result<Option<(usize, usize)>, Fail> {
        while at <= src.len() {
            if let Some(e) = m.match_at(at)?.filter(|&e| Some(e) != last) {
                return Ok(Some((at, e)));
            }
            at += 1;
        }
        Ok(None)
    });
    limits.spend(m.meter().used());
    match found {
        Ok(Some((s, e))) => {
            ffi::lua_pushinteger(l, e as ffi::lua_Integer);
            ffi::lua_replace(l, ffi::lua_upvalueindex(GM_POS));
            ffi::lua_pushinteger(l, e as ffi::lua_Integer);
            ffi::lua_replace(l, ffi::lua_upvalueindex(GM_LAST));
            push_captures(l, &m, src, s, e, true)
        }
        Ok(None) => {
            ffi::lua_pushinteger(l, at as ffi::lua_Integer);
            ffi::lua_replace(l, ffi::lua_upvalueindex(GM_POS));
            0
        }
        Err(f) => raise_fail(l, limits, f),
    }
}

/// gsub's output: a byte buffer in a Lua userdata at a fixed stack slot, doubled when full
/// (the memory limit applies to it, and it needs no destructor).
struct Buf {
    slot: c_int,
    ptr: *mut u8,
    len: usize,
    cap: usize,
}

impl Buf {
    unsafe fn new(l: L, slot: c_int) -> Buf {
        ffi::lua_settop(l, slot - 1);
        let cap = 256;
        let ptr = ffi::lua_newuserdatauv(l, cap, 0).cast::<u8>();
        Buf {
            slot,
            ptr,
            len: 0,
            cap,
        }
    }

    /// Append `b`, which must not point into this buffer. May raise a memory error.
    unsafe fn add(&mut self, l: L, b: &[u8]) {
        if b.len() > self.cap - self.len {
            let want = self.len.checked_add(b.len());
            let Some(cap) = want.map(|w| w.max(self.cap.saturating_mul(2))) else {
                raise(l, b"resulting string too large")
            };
            let ptr = ffi::lua_newuserdatauv(l, cap, 0).cast::<u8>();
            std::ptr::copy_nonoverlapping(self.ptr, ptr, self.len);
            ffi::lua_replace(l, self.slot);
            self.ptr = ptr;
            self.cap = cap;
        }
        std::ptr::copy_nonoverlapping(b.as_ptr(), self.ptr.add(self.len), b.len());
        self.len += b.len();
    }

    /// Append the string (or number, converted) at the top of the stack and pop it.
    unsafe fn add_top(&mut self, l: L) {
        let mut n = 0usize;
        let p = ffi::lua_tolstring(l, -1, &mut n);
        let bytes = std::slice::from_raw_parts(p.cast::<u8>(), n);
        self.add(l, bytes);
        ffi::lua_pop(l, 1);
    }

    unsafe fn push(&self, l: L) {
        ffi::lua_pushlstring(l, self.ptr.cast(), self.len);
    }
}

/// `string.gsub(s, pattern, repl [, n])`.
unsafe extern "C-unwind" fn l_gsub(l: L) -> c_int {
    let src = check_bytes(l, 1);
    let pat = check_bytes(l, 2);
    let tr = ffi::lua_type(l, 3);
    let max = ffi::luaL_optinteger(l, 4, src.len() as ffi::lua_Integer + 1);
    if !matches!(
        tr,
        ffi::LUA_TNUMBER | ffi::LUA_TSTRING | ffi::LUA_TFUNCTION | ffi::LUA_TTABLE
    ) {
        luaL_typeerror(l, 3, c"string/function/table".as_ptr());
    }
    // A number replacement is converted to a string in place, once.
    let repl: Option<&[u8]> = if matches!(tr, ffi::LUA_TNUMBER | ffi::LUA_TSTRING) {
        Some(check_bytes(l, 3))
    } else {
        None
    };
    let mut buf = Buf::new(l, 5);
    let limits = limits(l);
    let expired = || limits.expired();
    let mut meter = Meter::new(limits.steps_left(), &expired);
    let mut m = Matcher::new(src, pat, &mut meter);
    let anchored = pattern::strip_anchor(&mut m);
    let (mut at, mut last, mut n, mut changed) =
        (0usize, None::<usize>, 0 as ffi::lua_Integer, false);
    while n < max {
        let found = guarded(l, || m.match_at(at));
        let e = match found {
            Ok(e) => e,
            Err(f) => {
                limits.spend(m.meter().used());
                raise_fail(l, limits, f)
            }
        };
        if let Some(e) = e.filter(|&e| Some(e) != last) {
            n += 1;
            changed |= match repl {
                Some(r) => {
                    add_string(l, &m, src, at, e, r, &mut buf);
                    true
                }
                None => {
                    // Calling back into Lua: the callback spends from the same budget.
                    limits.spend(m.meter().used());
                    if tr == ffi::LUA_TFUNCTION {
                        ffi::lua_pushvalue(l, 3);
                        let k = push_captures(l, &m, src, at, e, true);
                        ffi::lua_call(l, k, 1);
                    } else {
                        push_capture(l, &m, src, 0, at, e);
                        ffi::lua_gettable(l, 3);
                    }
                    *m.meter() = Meter::new(limits.steps_left(), &expired);
                    add_value(l, &src[at..e], &mut buf)
                }
            };
            at = e;
            last = Some(e);
        } else if at < src.len() {
            buf.add(l, &src[at..at + 1]);
            at += 1;
        } else {
            break;
        }
        if anchored {
            break;
        }
    }
    limits.spend(m.meter().used());
    if changed {
        buf.add(l, &src[at..]);
        buf.push(l);
    } else {
        ffi::lua_pushvalue(l, 1);
    }
    ffi::lua_pushinteger(l, n);
    2
}

/// gsub with a table or function: the value at the top replaces the match (false or nil keep
/// it). Returns whether the match was replaced.
unsafe fn add_value(l: L, matched: &[u8], buf: &mut Buf) -> bool {
    if ffi::lua_toboolean(l, -1) == 0 {
        ffi::lua_pop(l, 1);
        buf.add(l, matched);
        return false;
    }
    if ffi::lua_isstring(l, -1) == 0 {
        let t = ffi::lua_type(l, -1);
        let name = std::ffi::CStr::from_ptr(ffi::lua_typename(l, t));
        let mut m = Msg::new();
        m.push(b"invalid replacement value (a ")
            .push(name.to_bytes())
            .push(b")");
        raise(l, m.bytes());
    }
    buf.add_top(l);
    true
}

/// gsub with a replacement string: `%0`-`%9` and `%%`.
unsafe fn add_string(
    l: L,
    m: &Matcher<'_, '_, '_>,
    src: &[u8],
    s: usize,
    e: usize,
    repl: &[u8],
    buf: &mut Buf,
) {
    let mut rest = repl;
    while let Some(i) = rest.iter().position(|&c| c == b'%') {
        buf.add(l, &rest[..i]);
        match rest.get(i + 1).copied() {
            Some(b'%') => buf.add(l, b"%"),
            Some(b'0') => buf.add(l, &src[s..e]),
            Some(d @ b'1'..=b'9') => match m.capture(usize::from(d - b'1'), s, e) {
                Ok(Capture::Str(a, b)) => buf.add(l, &src[a..b]),
                Ok(Capture::Position(p)) => {
                    let mut num = Msg::new();
                    num.push_int(p as i64 + 1);
                    buf.add(l, num.bytes());
                }
                Ok(Capture::Unfinished) => raise_pattern(l, PatError::UnfinishedCapture),
                Err(Fail::Error(pe)) => raise_pattern(l, pe),
                Err(_) => raise(l, b"invalid capture"),
            },
            _ => raise(l, b"invalid use of '%' in replacement string"),
        }
        rest = &rest[i + 2..];
    }
    buf.add(l, rest);
}
