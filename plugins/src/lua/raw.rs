//! Batch marshalling between [`Record`]s and Lua tables through the raw C API, in one
//! protected call per batch: build the input tables, call the driver (which calls the
//! plugin), read the outputs back.
//!
//! An output record's key or value that is byte-equal to the key or value of the input it came
//! from reuses the input's `Bytes` (no copy, no allocation): the common "return the record,
//! maybe with a changed field" case copies only what changed.
//!
//! Safety rules for the closure passed to `exec_raw`: Lua may raise (longjmp) only while the
//! inputs are built and while the plugin runs; the closure keeps no value with a destructor on
//! its own frame (outputs go to vectors owned by the caller). The read-back phase only calls
//! functions that never raise (`lua_rawget*`, `lua_next` with keys taken from the table, and
//! `lua_tolstring` on values already checked to be strings, which does not convert).

use std::ffi::c_int;

use bytes::Bytes;
use mlua::ffi;
use mlua::{Function, Lua};

use crate::limits::Effective;
use crate::{PluginError, Record};

const FIELDS: [&str; 6] = [
    "key",
    "value",
    "headers",
    "timestamp",
    "offset",
    "partition",
];
// Stack slots inside the protected closure.
const DRIVER: c_int = 1;
const FUNC: c_int = 2;
const K_KEY: c_int = 3;
const K_VALUE: c_int = 4;
const K_HEADERS: c_int = 5;
const K_TS: c_int = 6;
const K_OFFSET: c_int = 7;
const K_PARTITION: c_int = 8;
const INPUTS: c_int = 9;
const OUT: c_int = 10;
const SRC: c_int = 11;
const COUNT: c_int = 12;
const ITEM: c_int = 13;
/// Holds a fan-out array while its elements are read (the inputs are no longer needed then:
/// read-back compares against the Rust records).
const SRC_ARRAY: c_int = INPUTS;

/// Run one batch through `driver(func, inputs, n)` and read the result back.
pub(super) fn run_batch(
    lua: &Lua,
    driver: &Function,
    func: &Function,
    records: &[Record],
    eff: &Effective,
) -> Result<mlua::Result<Vec<Record>>, PluginError> {
    let mut out: Vec<Record> = Vec::with_capacity(records.len());
    let mut bad: Option<String> = None;
    let mut out_bytes = 0usize;
    let limit = eff.max_output_bytes;
    // SAFETY: see the module docs; every stack index used is checked by `lua_checkstack`
    // and the fixed layout above.
    let r = unsafe {
        lua.exec_raw::<()>((driver, func), |l| {
            if ffi::lua_checkstack(l, 40) == 0 {
                bad = Some("Lua stack exhausted".into());
                return;
            }
            for f in FIELDS {
                ffi::lua_pushlstring(l, f.as_ptr().cast(), f.len());
            }
            build(l, records);
            let n = records.len().min(i32::MAX as usize) as c_int;
            ffi::lua_pushvalue(l, DRIVER);
            ffi::lua_pushvalue(l, FUNC);
            ffi::lua_pushvalue(l, INPUTS);
            ffi::lua_pushinteger(l, records.len() as ffi::lua_Integer);
            // The output array, pre-sized: one entry per input.
            ffi::lua_createtable(l, n, 0);
            ffi::lua_call(l, 4, 3);
            read(l, records, &mut out, &mut bad, &mut out_bytes, limit);
            ffi::lua_settop(l, 0);
        })
    };
    if let Err(e) = r {
        return Ok(Err(e));
    }
    if let Some(m) = bad {
        return Err(eff.bad_return(m));
    }
    if out_bytes > limit {
        return Err(eff.output_limit(out_bytes));
    }
    Ok(Ok(out))
}

unsafe fn push_bytes(l: *mut ffi::lua_State, b: &[u8]) {
    ffi::lua_pushlstring(l, b.as_ptr().cast(), b.len());
}

/// Build the inputs array at slot INPUTS. May raise (memory, finalizers).
unsafe fn build(l: *mut ffi::lua_State, records: &[Record]) {
    ffi::lua_createtable(l, records.len().min(i32::MAX as usize) as c_int, 0);
    for (i, r) in records.iter().enumerate() {
        ffi::lua_createtable(l, 0, 6);
        if let Some(k) = &r.key {
            ffi::lua_pushvalue(l, K_KEY);
            push_bytes(l, k);
            ffi::lua_rawset(l, -3);
        }
        ffi::lua_pushvalue(l, K_VALUE);
        push_bytes(l, &r.value);
        ffi::lua_rawset(l, -3);
        ffi::lua_pushvalue(l, K_HEADERS);
        ffi::lua_createtable(l, 0, r.headers.len().min(i32::MAX as usize) as c_int);
        for (n, v) in &r.headers {
            push_bytes(l, n.as_bytes());
            push_bytes(l, v);
            ffi::lua_rawset(l, -3);
        }
        ffi::lua_rawset(l, -3);
        for (k, v) in [
            (K_TS, r.timestamp),
            (K_OFFSET, r.offset),
            (K_PARTITION, i64::from(r.partition)),
        ] {
            ffi::lua_pushvalue(l, k);
            ffi::lua_pushinteger(l, v);
            ffi::lua_rawset(l, -3);
        }
        ffi::lua_rawseti(l, INPUTS, i as ffi::lua_Integer + 1);
    }
}

fn type_name(t: c_int) -> &'static str {
    match t {
        ffi::LUA_TNIL => "nil",
        ffi::LUA_TBOOLEAN => "boolean",
        ffi::LUA_TNUMBER => "number",
        ffi::LUA_TSTRING => "string",
        ffi::LUA_TTABLE => "table",
        ffi::LUA_TFUNCTION => "function",
        _ => "userdata or thread",
    }
}

/// Read the driver's results (OUT, SRC, COUNT) into `out`. Never raises.
///
/// SRC is `true` when OUT holds one entry per input (`process` mode): nil (dropped), a record
/// table, or an array of record tables (fan-out); `false` when OUT is `process_batch`'s array.
unsafe fn read(
    l: *mut ffi::lua_State,
    records: &[Record],
    out: &mut Vec<Record>,
    bad: &mut Option<String>,
    out_bytes: &mut usize,
    limit: usize,
) {
    let count = ffi::lua_tointegerx(l, COUNT, std::ptr::null_mut());
    let per_input = ffi::lua_toboolean(l, SRC) != 0;
    let mut push = |r: Record| -> bool {
        *out_bytes = out_bytes.saturating_add(r.encoded_len());
        if *out_bytes > limit {
            return false;
        }
        out.push(r);
        true
    };
    for j in 1..=count {
        ffi::lua_settop(l, COUNT);
        let t = ffi::lua_rawgeti(l, OUT, j);
        let src = if per_input {
            usize::try_from(j - 1).ok().and_then(|i| records.get(i))
        } else {
            None
        };
        let what = if per_input {
            "process"
        } else {
            "process_batch"
        };
        match t {
            ffi::LUA_TNIL if per_input => continue,
            ffi::LUA_TTABLE => {}
            t => {
                *bad = Some(format!(
                    "{what} returned a {} for record {j} (want a record table{})",
                    type_name(t),
                    if per_input {
                        ", an array of records or nil"
                    } else {
                        ""
                    }
                ));
                return;
            }
        }
        let is_record = {
            ffi::lua_pushvalue(l, K_VALUE);
            let t = ffi::lua_rawget(l, ITEM);
            ffi::lua_settop(l, ITEM);
            t != ffi::LUA_TNIL
        };
        if is_record || !per_input {
            match read_record(l, src) {
                Ok(r) => {
                    if !push(r) {
                        return;
                    }
                }
                Err(m) => {
                    *bad = Some(format!("{what}: record {j}: {m}"));
                    return;
                }
            }
            continue;
        }
        // Fan-out: an array of record tables. Park it in SRC_ARRAY so each element can be read
        // at ITEM.
        let len = ffi::lua_rawlen(l, ITEM) as ffi::lua_Integer;
        ffi::lua_replace(l, SRC_ARRAY);
        for k in 1..=len {
            ffi::lua_settop(l, COUNT);
            let t = ffi::lua_rawgeti(l, SRC_ARRAY, k);
            if t != ffi::LUA_TTABLE {
                *bad = Some(format!(
                    "process: element {k} of the array returned for record {j} is a {} (want a record table)",
                    type_name(t)
                ));
                return;
            }
            match read_record(l, src) {
                Ok(r) => {
                    if !push(r) {
                        return;
                    }
                }
                Err(m) => {
                    *bad = Some(format!("process: record {j}, element {k}: {m}"));
                    return;
                }
            }
        }
    }
}

/// Read the record table at ITEM.
unsafe fn read_record(l: *mut ffi::lua_State, src: Option<&Record>) -> Result<Record, String> {
    let field = |k: c_int| {
        ffi::lua_settop(l, ITEM);
        ffi::lua_pushvalue(l, k);
        ffi::lua_rawget(l, ITEM)
    };
    let string_at_top = || {
        let mut len = 0usize;
        let p = ffi::lua_tolstring(l, -1, &mut len) as *const u8;
        std::slice::from_raw_parts(p, len)
    };
    let value = match field(K_VALUE) {
        ffi::LUA_TSTRING => {
            let s = string_at_top();
            match src {
                Some(r) if r.value.as_ref() == s => r.value.clone(),
                _ => Bytes::copy_from_slice(s),
            }
        }
        t => return Err(format!("`value` is a {} (want a string)", type_name(t))),
    };
    let key = match field(K_KEY) {
        ffi::LUA_TNIL => None,
        ffi::LUA_TSTRING => {
            let s = string_at_top();
            Some(match src.and_then(|r| r.key.as_ref()) {
                Some(k) if k.as_ref() == s => k.clone(),
                _ => Bytes::copy_from_slice(s),
            })
        }
        t => {
            return Err(format!(
                "`key` is a {} (want a string or nil)",
                type_name(t)
            ))
        }
    };
    let mut headers = Vec::new();
    match field(K_HEADERS) {
        ffi::LUA_TNIL => {}
        ffi::LUA_TTABLE => {
            let h = ffi::lua_gettop(l);
            ffi::lua_pushnil(l);
            while ffi::lua_next(l, h) != 0 {
                let (kt, vt) = (ffi::lua_type(l, -2), ffi::lua_type(l, -1));
                if kt != ffi::LUA_TSTRING || vt != ffi::LUA_TSTRING {
                    return Err(format!(
                        "headers must map strings to strings, found {} = {}",
                        type_name(kt),
                        type_name(vt)
                    ));
                }
                let v = string_at_top();
                let v = Bytes::copy_from_slice(v);
                let mut len = 0usize;
                let p = ffi::lua_tolstring(l, -2, &mut len) as *const u8;
                let name = String::from_utf8_lossy(std::slice::from_raw_parts(p, len)).into_owned();
                headers.push((name, v));
                ffi::lua_pop(l, 1);
            }
        }
        t => return Err(format!("`headers` is a {} (want a table)", type_name(t))),
    }
    let int = |k: c_int, name: &str, inherit: i64| -> Result<i64, String> {
        match field(k) {
            ffi::LUA_TNIL => Ok(inherit),
            ffi::LUA_TNUMBER if ffi::lua_isinteger(l, -1) != 0 => {
                Ok(ffi::lua_tointegerx(l, -1, std::ptr::null_mut()))
            }
            t => Err(format!("`{name}` is a {} (want an integer)", type_name(t))),
        }
    };
    let timestamp = int(K_TS, "timestamp", src.map_or(0, |r| r.timestamp))?;
    let offset = int(K_OFFSET, "offset", src.map_or(0, |r| r.offset))?;
    let partition = int(
        K_PARTITION,
        "partition",
        src.map_or(0, |r| i64::from(r.partition)),
    )?;
    let partition =
        i32::try_from(partition).map_err(|_| format!("`partition` {partition} out of range"))?;
    Ok(Record {
        key,
        value,
        headers,
        timestamp,
        offset,
        partition,
    })
}
