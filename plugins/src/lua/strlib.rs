//! The sandbox's `string.find`, `string.match`, `string.gmatch` and `string.gsub`: Lua 5.4's
//! semantics on top of the metered matcher in `pattern.rs`, so that no single call of these
//! can run past the plugin call's step budget or deadline (Lua's own versions are C functions
//! that no instruction hook can interrupt).
//!
//! Arguments are checked and coerced as `lstrlib.c` does (numbers become strings, `init` may be
//! negative, `"2"` is an integer), errors carry Lua's messages, and `gsub` accepts a string
//! (with `%0`-`%9` and `%%`), a table or a function. `gsub`'s output is built in a Rust buffer
//! that may not outgrow the Lua state's remaining memory allowance.

use std::ffi::c_void;
use std::sync::Arc;

use mlua::{ChunkMode, Function, LightUserData, Lua, MultiValue, Table, Value};

use super::pattern::{self, Capture, Fail, Matcher, Meter};

const STRLIB: &str = include_str!("strlib.lua");
/// Raised (and the call tripped) when the plugin call's step budget is spent.
pub(crate) const BUDGET_MESSAGE: &str =
    "pattern too complex: step budget exceeded (the plugin's CPU limit)";
/// Raised (and the call tripped) when the plugin call's deadline passes during matching.
pub(crate) const DEADLINE_MESSAGE: &str = "CPU time limit exceeded";
/// Lua's message for an allocation failure.
const NO_MEMORY: &str = "not enough memory";

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
    /// The Lua state's memory limit in bytes.
    fn memory_limit(&self) -> usize;
}

/// The value the Rust functions return first to ask the Lua wrapper to raise an error.
fn err_marker() -> Value {
    Value::LightUserData(LightUserData(0x5157_4552usize as *mut c_void))
}

/// Replace `target`'s find/match/gmatch/gsub with the bounded versions.
pub(crate) fn install(lua: &Lua, target: &Table, limits: Arc<dyn Limits>) -> mlua::Result<()> {
    let pcall: Function = lua.globals().get("pcall")?;
    let index: Function = lua
        .load("local t, k = ... return t[k]")
        .set_name("=quiver-strlib-index")
        .set_mode(ChunkMode::Text)
        .into_function()?;
    let shared = Arc::new(Shared {
        limits,
        pcall,
        index,
    });
    let make = |name: &'static str, f: fn(&Cx<'_>, &MultiValue) -> Res<MultiValue>| {
        let shared = shared.clone();
        lua.create_function(move |lua, args: MultiValue| {
            let cx = Cx {
                lua,
                shared: &shared,
                name,
            };
            finish(f(&cx, &args))
        })
    };
    let find = make("find", |cx, a| str_find(cx, a, true))?;
    let match_ = make("match", |cx, a| str_find(cx, a, false))?;
    let gsub = make("gsub", str_gsub)?;
    let gmatch = {
        let shared = shared.clone();
        lua.create_function(move |lua, args: MultiValue| {
            let cx = Cx {
                lua,
                shared: &shared,
                name: "gmatch",
            };
            match str_gmatch(&cx, &args, shared.clone()) {
                Ok(f) => Ok(MultiValue::from_vec(vec![Value::Function(f)])),
                Err(e) => finish(Err(e)),
            }
        })?
    };
    lua.load(STRLIB)
        .set_name("=quiver-strlib")
        .set_mode(ChunkMode::Text)
        .call::<()>((err_marker(), find, match_, gmatch, gsub, target.clone()))
}

struct Shared {
    limits: Arc<dyn Limits>,
    /// Lua's `pcall` as it was at install time: calls back into Lua keep error values intact.
    pcall: Function,
    /// `function(t, k) return t[k] end` (honours `__index`, as `lua_gettable` does).
    index: Function,
}

struct Cx<'a> {
    lua: &'a Lua,
    shared: &'a Shared,
    name: &'static str,
}

/// How a call ends when it does not return values.
enum Stop {
    /// Raised by the Lua wrapper as `error(value, level)`.
    Soft(i64, Value),
    /// Raised through mlua (memory errors keep their kind this way).
    Hard(mlua::Error),
}

impl From<mlua::Error> for Stop {
    fn from(e: mlua::Error) -> Self {
        Stop::Hard(e)
    }
}

type Res<T> = Result<T, Stop>;

fn finish(r: Res<MultiValue>) -> mlua::Result<MultiValue> {
    match r {
        Ok(v) => Ok(v),
        Err(Stop::Soft(level, value)) => Ok(MultiValue::from_vec(vec![
            err_marker(),
            Value::Integer(level),
            value,
        ])),
        Err(Stop::Hard(e)) => Err(e),
    }
}

impl Cx<'_> {
    fn limits(&self) -> &dyn Limits {
        &*self.shared.limits
    }

    /// An error raised at the caller's position, as `luaL_error` does.
    fn error(&self, message: &str) -> Stop {
        match self.lua.create_string(message) {
            Ok(s) => Stop::Soft(2, Value::String(s)),
            Err(e) => Stop::Hard(e),
        }
    }

    fn bad_arg(&self, i: usize, extra: &str) -> Stop {
        self.error(&format!(
            "bad argument #{} to '{}' ({extra})",
            i + 1,
            self.name
        ))
    }

    fn fail(&self, f: Fail) -> Stop {
        match f {
            Fail::Error(m) => self.error(&m),
            Fail::Budget => {
                self.limits().trip();
                self.error(BUDGET_MESSAGE)
            }
            Fail::Deadline => {
                self.limits().trip();
                self.error(DEADLINE_MESSAGE)
            }
        }
    }

    fn arg_string(&self, args: &MultiValue, i: usize) -> Res<mlua::String> {
        match args.get(i) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(v @ (Value::Integer(_) | Value::Number(_))) => self
                .lua
                .coerce_string(v.clone())?
                .ok_or_else(|| self.bad_arg(i, "string expected, got number")),
            other => Err(self.bad_arg(i, &format!("string expected, got {}", arg_type(other)))),
        }
    }

    fn opt_integer(&self, args: &MultiValue, i: usize, default: i64) -> Res<i64> {
        match args.get(i) {
            None | Some(Value::Nil) => Ok(default),
            Some(Value::Integer(n)) => Ok(*n),
            Some(v @ (Value::Number(_) | Value::String(_))) => {
                if let Some(n) = self.lua.coerce_integer(v.clone())? {
                    return Ok(n);
                }
                if self.lua.coerce_number(v.clone())?.is_some() {
                    return Err(self.bad_arg(i, "number has no integer representation"));
                }
                Err(self.bad_arg(i, &format!("number expected, got {}", arg_type(Some(v)))))
            }
            other => Err(self.bad_arg(i, &format!("number expected, got {}", arg_type(other)))),
        }
    }

    /// Run `f` with a meter holding the call's remaining steps; spend what it used.
    fn metered<T>(&self, f: impl FnOnce(&mut Meter<'_>) -> Res<T>) -> Res<T> {
        let limits = self.limits();
        let expired = || limits.expired();
        let mut meter = Meter::new(limits.steps_left(), &expired);
        let r = f(&mut meter);
        limits.spend(meter.used());
        r
    }

    fn capture_value(&self, c: Result<Capture, Fail>, src: &[u8]) -> Res<Value> {
        match c.map_err(|f| self.fail(f))? {
            Capture::Str(a, b) => Ok(Value::String(self.lua.create_string(&src[a..b])?)),
            Capture::Position(p) => Ok(Value::Integer(p as i64 + 1)),
            Capture::Unfinished => Err(self.error("unfinished capture")),
        }
    }

    /// Lua's `push_captures`: every capture, or the whole match `whole` when there are none.
    fn captures(
        &self,
        m: &Matcher<'_, '_, '_>,
        src: &[u8],
        whole: Option<(usize, usize)>,
        out: &mut Vec<Value>,
    ) -> Res<()> {
        let (s, e) = whole.unwrap_or((0, 0));
        let n = if m.level() == 0 && whole.is_some() {
            1
        } else {
            m.level()
        };
        for i in 0..n {
            out.push(self.capture_value(m.capture(i, s, e), src)?);
        }
        Ok(())
    }

    /// Append to gsub's buffer, refusing to grow it past the state's memory allowance.
    fn append(&self, out: &mut Vec<u8>, bytes: &[u8]) -> Res<()> {
        let need = out.len().saturating_add(bytes.len());
        if need > out.capacity() {
            let new_cap = need.max(out.capacity().saturating_mul(2)).max(64);
            let room = self
                .limits()
                .memory_limit()
                .saturating_sub(self.lua.used_memory());
            if new_cap > room {
                return Err(Stop::Hard(mlua::Error::MemoryError(NO_MEMORY.into())));
            }
            out.reserve_exact(new_cap - out.len());
        }
        out.extend_from_slice(bytes);
        Ok(())
    }
}

fn arg_type(v: Option<&Value>) -> &'static str {
    match v {
        None => "no value",
        Some(v) => type_name(v),
    }
}

/// `luaL_typename`.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Boolean(_) => "boolean",
        Value::Integer(_) | Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Table(_) => "table",
        Value::Function(_) => "function",
        Value::Thread(_) => "thread",
        _ => "userdata",
    }
}

fn truthy(v: Option<&Value>) -> bool {
    !matches!(v, None | Some(Value::Nil) | Some(Value::Boolean(false)))
}

/// `string.find` (`find`) and `string.match` (`!find`).
fn str_find(cx: &Cx<'_>, args: &MultiValue, find: bool) -> Res<MultiValue> {
    let s = cx.arg_string(args, 0)?;
    let p = cx.arg_string(args, 1)?;
    let (src, pat) = (s.as_bytes(), p.as_bytes());
    let init = pattern::start_position(cx.opt_integer(args, 2, 1)?, src.len()) - 1;
    if init > src.len() {
        return Ok(MultiValue::from_vec(vec![Value::Nil]));
    }
    let mut out = Vec::new();
    if find && (truthy(args.get(3)) || !pattern::has_specials(&pat)) {
        let found = cx.metered(|meter| {
            pattern::find_plain(&src, &pat, init, meter).map_err(|f| cx.fail(f))
        })?;
        match found {
            Some(i) => {
                out.push(Value::Integer(i as i64 + 1));
                out.push(Value::Integer((i + pat.len()) as i64));
            }
            None => out.push(Value::Nil),
        }
        return Ok(MultiValue::from_vec(out));
    }
    cx.metered(|meter| {
        let mut m = Matcher::new(&src, &pat, meter);
        match pattern::search(&mut m, init).map_err(|f| cx.fail(f))? {
            Some((s, e)) if find => {
                out.push(Value::Integer(s as i64 + 1));
                out.push(Value::Integer(e as i64));
                cx.captures(&m, &src, None, &mut out)
            }
            Some((s, e)) => cx.captures(&m, &src, Some((s, e)), &mut out),
            None => {
                out.push(Value::Nil);
                Ok(())
            }
        }
    })?;
    Ok(MultiValue::from_vec(out))
}

/// `string.gmatch`: returns the iterator (a Rust function holding the iteration state).
fn str_gmatch(cx: &Cx<'_>, args: &MultiValue, shared: Arc<Shared>) -> Res<Function> {
    let s = cx.arg_string(args, 0)?;
    let p = cx.arg_string(args, 1)?;
    let len = s.as_bytes().len();
    let init = pattern::start_position(cx.opt_integer(args, 2, 1)?, len) - 1;
    let mut pos = init.min(len + 1);
    let mut last: Option<usize> = None;
    let iter = cx.lua.create_function_mut(move |lua, ()| {
        let cx = Cx {
            lua,
            shared: &shared,
            name: "gmatch",
        };
        let (src, pat) = (s.as_bytes(), p.as_bytes());
        let r = cx.metered(|meter| {
            let mut m = Matcher::new(&src, &pat, meter);
            let mut at = pos;
            while at <= src.len() {
                let e = m.match_at(at).map_err(|f| cx.fail(f))?;
                if let Some(e) = e.filter(|&e| Some(e) != last) {
                    pos = e;
                    last = Some(e);
                    let mut out = Vec::new();
                    cx.captures(&m, &src, Some((at, e)), &mut out)?;
                    return Ok(MultiValue::from_vec(out));
                }
                at += 1;
            }
            pos = at;
            Ok(MultiValue::new())
        });
        finish(r)
    })?;
    Ok(iter)
}

enum Repl {
    Str(mlua::String),
    Table(Table),
    Func(Function),
}

/// `string.gsub`.
fn str_gsub(cx: &Cx<'_>, args: &MultiValue) -> Res<MultiValue> {
    let s = cx.arg_string(args, 0)?;
    let p = cx.arg_string(args, 1)?;
    let (src, pat) = (s.as_bytes(), p.as_bytes());
    let max = cx.opt_integer(args, 3, src.len() as i64 + 1)?;
    let repl = match args.get(2) {
        Some(Value::String(r)) => Repl::Str(r.clone()),
        Some(v @ (Value::Integer(_) | Value::Number(_))) => {
            match cx.lua.coerce_string(v.clone())? {
                Some(r) => Repl::Str(r),
                None => return Err(cx.bad_arg(2, "string/function/table expected, got number")),
            }
        }
        Some(Value::Table(t)) => Repl::Table(t.clone()),
        Some(Value::Function(f)) => Repl::Func(f.clone()),
        other => {
            return Err(cx.bad_arg(
                2,
                &format!("string/function/table expected, got {}", arg_type(other)),
            ))
        }
    };
    let repl_bytes = match &repl {
        Repl::Str(r) => Some(r.as_bytes()),
        _ => None,
    };
    let limits = cx.limits();
    let expired = || limits.expired();
    let mut meter = Meter::new(limits.steps_left(), &expired);
    let mut m = Matcher::new(&src, &pat, &mut meter);
    let anchored = pattern::strip_anchor(&mut m);
    let mut out: Vec<u8> = Vec::new();
    let (mut at, mut last, mut n, mut changed) = (0usize, None::<usize>, 0i64, false);
    let r: Res<()> = (|| {
        while n < max {
            let e = m.match_at(at).map_err(|f| cx.fail(f))?;
            if let Some(e) = e.filter(|&e| Some(e) != last) {
                n += 1;
                changed |= match &repl_bytes {
                    Some(r) => {
                        add_string(cx, &m, &src, at, e, r, &mut out)?;
                        true
                    }
                    None => {
                        // Calling back into Lua: hand the steps used so far to the call, and
                        // take back what the callback left.
                        let mut caps = Vec::new();
                        match &repl {
                            Repl::Table(_) => {
                                caps.push(cx.capture_value(m.capture(0, at, e), &src)?)
                            }
                            _ => cx.captures(&m, &src, Some((at, e)), &mut caps)?,
                        }
                        limits.spend(m.meter().used());
                        let value = match &repl {
                            Repl::Table(t) => call(cx, &cx.shared.index, {
                                let mut a = vec![Value::Table(t.clone())];
                                a.extend(caps);
                                a
                            }),
                            Repl::Func(f) => call(cx, f, caps),
                            Repl::Str(_) => unreachable!("string replacements are handled above"),
                        };
                        *m.meter() = Meter::new(limits.steps_left(), &expired);
                        add_value(cx, value?, &src[at..e], &mut out)?
                    }
                };
                at = e;
                last = Some(e);
            } else if at < src.len() {
                cx.append(&mut out, &src[at..at + 1])?;
                at += 1;
            } else {
                break;
            }
            if anchored {
                break;
            }
        }
        Ok(())
    })();
    limits.spend(m.meter().used());
    r?;
    let result = if changed {
        cx.append(&mut out, &src[at..])?;
        Value::String(cx.lua.create_string(&out)?)
    } else {
        Value::String(s.clone())
    };
    Ok(MultiValue::from_vec(vec![result, Value::Integer(n)]))
}

/// Call a Lua function through `pcall` and return its first result; an error it raised is
/// re-raised unchanged (memory errors keep their kind).
fn call(cx: &Cx<'_>, f: &Function, args: Vec<Value>) -> Res<Value> {
    let mut a = Vec::with_capacity(args.len() + 1);
    a.push(Value::Function(f.clone()));
    a.extend(args);
    let mut r = cx
        .shared
        .pcall
        .call::<MultiValue>(MultiValue::from_vec(a))?
        .into_iter();
    let ok = matches!(r.next(), Some(Value::Boolean(true)));
    let first = r.next().unwrap_or(Value::Nil);
    if ok {
        return Ok(first);
    }
    if let Value::String(s) = &first {
        if s.as_bytes().as_ref() == NO_MEMORY.as_bytes() {
            return Err(Stop::Hard(mlua::Error::MemoryError(NO_MEMORY.into())));
        }
    }
    Err(Stop::Soft(0, first))
}

/// gsub with a table or function: false/nil keeps the match, a string or number replaces it.
fn add_value(cx: &Cx<'_>, v: Value, matched: &[u8], out: &mut Vec<u8>) -> Res<bool> {
    match v {
        Value::Nil | Value::Boolean(false) => {
            cx.append(out, matched)?;
            Ok(false)
        }
        Value::String(s) => {
            cx.append(out, &s.as_bytes())?;
            Ok(true)
        }
        v @ (Value::Integer(_) | Value::Number(_)) => {
            let s = cx
                .lua
                .coerce_string(v)?
                .ok_or_else(|| cx.error("invalid replacement value (a number)"))?;
            cx.append(out, &s.as_bytes())?;
            Ok(true)
        }
        other => Err(cx.error(&format!(
            "invalid replacement value (a {})",
            type_name(&other)
        ))),
    }
}

/// gsub with a replacement string: `%0`-`%9` and `%%`.
fn add_string(
    cx: &Cx<'_>,
    m: &Matcher<'_, '_, '_>,
    src: &[u8],
    s: usize,
    e: usize,
    repl: &[u8],
    out: &mut Vec<u8>,
) -> Res<()> {
    let mut rest = repl;
    while let Some(i) = rest.iter().position(|&c| c == b'%') {
        cx.append(out, &rest[..i])?;
        match rest.get(i + 1).copied() {
            Some(b'%') => cx.append(out, b"%")?,
            Some(b'0') => cx.append(out, &src[s..e])?,
            Some(d @ b'1'..=b'9') => {
                let c = m
                    .capture(usize::from(d - b'1'), s, e)
                    .map_err(|f| cx.fail(f))?;
                match c {
                    Capture::Str(a, b) => cx.append(out, &src[a..b])?,
                    Capture::Position(p) => cx.append(out, (p + 1).to_string().as_bytes())?,
                    Capture::Unfinished => return Err(cx.error("unfinished capture")),
                }
            }
            _ => return Err(cx.error("invalid use of '%' in replacement string")),
        }
        rest = &rest[i + 2..];
    }
    cx.append(out, rest)
}
