//! Hostile Lua plugins: every limit stops the call with a typed error, nothing outside the
//! sandbox is reachable, the next call works, and repeated failures quarantine.

use quiver_plugins::{HostLimits, PluginConfig, PluginError};

use crate::support::*;

/// A processor that passes records through unless the value is a Lua snippet trigger:
/// `process` runs `actions[value]` when there is one.
const HOSTILE: &str = r#"
local actions = {
  loop = function() while true do end end,
  pcall_loop = function() while true do pcall(function() while true do end end) end end,
  tables = function() local t = {} local i = 0 while true do i = i + 1 t[i] = {i, i, i} end end,
  rep = function() return string.rep("x", 1 << 30) end,
  rep_sep = function() return string.rep("x", 1 << 20, string.rep("y", 1 << 10)) end,
  concat = function() local s = "x" while true do s = s .. s end end,
  recurse = function() local function f(n) return f(n + 1) + 1 end return f(1) end,
  big = function(r) local out = {} for i = 1, 64 do out[i] = { value = string.rep("b", 64 * 1024) } end return out end,
  error = function() error("boom") end,
  pattern = function() return string.find(string.rep("a", 15000), ".-b") end,
}
count = 0
function process(r)
  count = count + 1
  local a = actions[r.value]
  if a then
    local res = a(r)
    if res ~= nil then return res end
  end
  return r
end
"#;

fn hostile() -> Box<dyn quiver_plugins::Processor> {
    hostile_with(tight_limits())
}

fn hostile_with(limits: HostLimits) -> Box<dyn quiver_plugins::Processor> {
    processor(lua_bundle("processor", HOSTILE), limits)
}

/// The CPU limit counts the CPU time a call uses, not the time it waits for a core: a call
/// that needs half its limit succeeds when a loaded CPU stretches it past its limit.
#[test]
#[cfg(target_os = "linux")]
fn a_call_waiting_for_a_busy_cpu_is_not_charged_for_the_wait() {
    const SPIN: &str =
        "function process(r) local x = 0 for i = 1, tonumber(r.value) do x = x + i end return r end";
    let limits = HostLimits {
        cpu_ms: 200,
        ..tight_limits()
    };
    let mut p = processor(lua_bundle("processor", SPIN), limits);
    let rounds = rounds_for(std::time::Duration::from_millis(100), |n| {
        p.process_batch(vec![rec(&n.to_string())]).unwrap();
    });
    let (out, wall) = on_a_loaded_cpu(|| p.process_batch(vec![rec(&rounds.to_string())]));
    assert!(
        wall > std::time::Duration::from_millis(200),
        "the CPU was not loaded: the call took {wall:?}"
    );
    let out =
        out.unwrap_or_else(|e| panic!("a call within its CPU limit failed after {wall:?}: {e}"));
    assert_eq!(out.len(), 1);
}

#[test]
fn an_infinite_loop_is_stopped_by_the_cpu_limit() {
    let mut p = hostile_with(cpu_limits());
    let e = fails(&mut *p, "loop");
    assert!(
        matches!(e, PluginError::CpuLimit { limit_ms: 50, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("test-lua@0.1.0"), "{e}");
    still_works(&mut *p);
}

#[test]
fn pcall_cannot_swallow_the_cpu_limit() {
    let mut p = hostile_with(cpu_limits());
    let e = fails(&mut *p, "pcall_loop");
    assert!(matches!(e, PluginError::CpuLimit { .. }), "{e}");
    still_works(&mut *p);
}

#[test]
fn a_quadratic_pattern_is_stopped_at_the_cpu_limit() {
    // One `string.find` call with a quadratic pattern: Lua's own matcher would run it to the
    // end inside C; the metered one stops at the deadline. (A C function that returns late is
    // covered by `lua::tests::a_call_that_returns_late_from_a_c_function_fails_with_the_cpu_limit`.)
    let mut p = hostile_with(cpu_limits());
    let e = fails(&mut *p, "pattern");
    assert!(matches!(e, PluginError::CpuLimit { .. }), "{e}");
    still_works(&mut *p);
}

#[test]
fn memory_bombs_are_stopped_at_the_memory_cap() {
    for bomb in ["tables", "rep", "rep_sep", "concat"] {
        let mut p = hostile();
        let e = fails(&mut *p, bomb);
        assert!(
            matches!(e, PluginError::MemoryLimit { limit_mb: 16, .. }),
            "{bomb}: {e}"
        );
        still_works(&mut *p);
    }
}

#[test]
fn deep_recursion_fails_the_call_only() {
    let mut p = hostile();
    let e = fails(&mut *p, "recurse");
    assert!(
        matches!(
            e,
            PluginError::LuaError { .. } | PluginError::MemoryLimit { .. }
        ),
        "{e}"
    );
    still_works(&mut *p);
}

#[test]
fn huge_output_is_refused() {
    let mut p = hostile();
    let e = fails(&mut *p, "big");
    assert!(
        matches!(
            e,
            PluginError::OutputLimit {
                limit_bytes: 1048576,
                ..
            }
        ),
        "{e}"
    );
    still_works(&mut *p);
}

#[test]
fn nothing_outside_the_sandbox_is_reachable() {
    let escapes = [
        "os.execute('touch /tmp/quiver-escaped')",
        "io.open('/etc/passwd')",
        "require('os')",
        "dofile('/etc/passwd')",
        "loadfile('/etc/passwd')",
        "debug.getinfo(1)",
        "collectgarbage('stop')",
        "string.dump(process)",
        "assert(load('\\27Lua\\84\\0'))",
        "package.loaded.os.exit()",
        "config.word = 'changed'",
        "print('hi')",
    ];
    for code in escapes {
        let src = format!("function process(r) {code} return r end");
        let mut p = processor(lua_bundle("processor", &src), tight_limits());
        match p.process_batch(recs(&["x"])) {
            Err(PluginError::LuaError { message, .. }) => {
                assert!(!message.is_empty(), "{code}")
            }
            other => panic!("{code}: expected a Lua error, got {other:?}"),
        }
    }
    assert!(!std::path::Path::new("/tmp/quiver-escaped").exists());
}

/// A script's error comes as Lua's message with its position, on one line: it is what a
/// pipeline's status and a dead letter's `quiver.error` show. The traceback (mostly the
/// host's frames) filled `pipeline list`'s STATE column before.
#[test]
fn a_script_error_is_its_message_and_position_without_the_traceback() {
    let src = "local function check(v)\n  error('refusing ' .. v)\nend\nfunction process(r) check(r.value) return r end";
    let mut p = processor(lua_bundle("processor", src), tight_limits());
    match p.process_batch(recs(&["bad1"])) {
        Err(PluginError::LuaError { message, .. }) => {
            assert!(message.contains(":2: refusing bad1"), "{message}");
            assert!(!message.contains('\n'), "one line: {message}");
        }
        other => panic!("expected a Lua error, got {other:?}"),
    }
}

#[test]
fn text_chunks_still_load_and_config_and_log_work() {
    let src = r#"
      local f = assert(load("return 40 + 2"))
      function process(r)
        log("processing " .. r.value)
        r.value = r.value .. ":" .. config.word .. ":" .. f()
        return r
      end"#;
    let mut p = processor(lua_bundle("processor", src), tight_limits());
    assert_eq!(
        values(&p.process_batch(recs(&["a"])).unwrap()),
        ["a:hello:42"]
    );
    let mut p = PluginConfig::new(lua_bundle("processor", src))
        .set("word", "bye")
        .build_processor()
        .unwrap();
    assert_eq!(
        values(&p.process_batch(recs(&["a"])).unwrap()),
        ["a:bye:42"]
    );
}

#[test]
fn wrong_return_values_are_bad_returns() {
    for (ret, needle) in [
        ("42", "number"),
        ("'str'", "string"),
        ("{ value = 1 }", "value"),
        ("{ value = 'x', timestamp = 1.5 }", "timestamp"),
        ("{ value = 'x', headers = { 1 } }", "headers"),
        ("{ 1, 2 }", "number"),
    ] {
        let src = format!("function process(r) return {ret} end");
        let mut p = processor(lua_bundle("processor", &src), tight_limits());
        match p.process_batch(recs(&["x"])) {
            Err(PluginError::BadReturn { message, .. }) => {
                assert!(message.contains(needle), "{ret}: {message}")
            }
            other => panic!("{ret}: expected BadReturn, got {other:?}"),
        }
    }
}

#[test]
fn records_can_be_changed_dropped_and_fanned_out() {
    let src = r#"
      function process(r)
        if r.value == "drop" then return nil end
        if r.value == "fan" then return { { value = "a" }, { value = "b", key = "k2", headers = { h = "v" } } } end
        r.value = r.value:upper()
        r.headers.seen = "yes"
        r.key = "k"
        return r
      end"#;
    let mut p = processor(lua_bundle("processor", src), tight_limits());
    let mut input = recs(&["abc", "drop", "fan"]);
    input[2].timestamp = 77;
    let out = p.process_batch(input).unwrap();
    assert_eq!(values(&out), ["ABC", "a", "b"]);
    assert_eq!(out[0].key.as_deref(), Some(&b"k"[..]));
    assert_eq!(
        out[0].headers,
        vec![("seen".to_string(), bytes::Bytes::from_static(b"yes"))]
    );
    assert_eq!(
        (out[1].offset, out[1].timestamp, out[1].key.clone()),
        (2, 77, None),
        "fan-out records inherit position"
    );
    assert_eq!(out[2].headers.len(), 1);
}

#[test]
fn process_batch_is_used_when_defined() {
    let src = r#"
      function process(r) error("not me") end
      function process_batch(rs)
        local out = {}
        for i = #rs, 1, -1 do out[#out + 1] = rs[i] end
        return out
      end"#;
    let mut p = processor(lua_bundle("processor", src), tight_limits());
    assert_eq!(
        values(&p.process_batch(recs(&["1", "2", "3"])).unwrap()),
        ["3", "2", "1"]
    );
}

#[test]
fn state_persists_across_calls_and_resets_after_a_failure() {
    let src = r#"
      local n = 0
      function process(r)
        if r.value == "fail" then error("asked to fail") end
        n = n + 1
        r.value = tostring(n)
        return r
      end"#;
    let mut p = processor(lua_bundle("processor", src), tight_limits());
    assert_eq!(
        values(&p.process_batch(recs(&["a", "b"])).unwrap()),
        ["1", "2"]
    );
    assert_eq!(values(&p.process_batch(recs(&["c"])).unwrap()), ["3"]);
    let e = fails(&mut *p, "fail");
    assert!(
        matches!(&e, PluginError::LuaError { message, .. } if message.contains("asked to fail")),
        "{e}"
    );
    assert_eq!(values(&p.process_batch(recs(&["d"])).unwrap()), ["1"]);
}

#[test]
fn repeated_failures_quarantine_the_plugin() {
    let mut p = processor(
        lua_bundle("processor", HOSTILE),
        HostLimits {
            max_consecutive_failures: 3,
            ..tight_limits()
        },
    );
    for _ in 0..2 {
        assert!(matches!(
            fails(&mut *p, "error"),
            PluginError::LuaError { .. }
        ));
    }
    still_works(&mut *p); // a success resets the streak
    for _ in 0..3 {
        assert!(matches!(
            fails(&mut *p, "error"),
            PluginError::LuaError { .. }
        ));
    }
    let e = p.process_batch(recs(&["fine"])).unwrap_err();
    assert!(
        matches!(e, PluginError::Quarantined { failures: 3, .. }),
        "{e}"
    );
    assert!(e.is_quarantined());
}

#[test]
fn partitioner_results_are_checked() {
    let src = r#"
      function partition(key, value, n)
        if value == "neg" then return -1 end
        if value == "big" then return n end
        if value == "float" then return 0.5 end
        if value == "str" then return "1" end
        if key == nil then return 0 end
        return #key % n
      end"#;
    let mut p = PluginConfig::new(lua_bundle("partitioner", src))
        .limits(tight_limits())
        .build_partitioner()
        .unwrap();
    assert_eq!(p.partition(Some(b"abc"), b"v", 2).unwrap(), 1);
    assert_eq!(p.partition(None, b"v", 2).unwrap(), 0);
    for v in ["neg", "big", "float", "str"] {
        let e = p.partition(None, v.as_bytes(), 4).unwrap_err();
        assert!(matches!(e, PluginError::BadReturn { .. }), "{v}: {e}");
    }
}

#[test]
fn a_script_without_the_role_function_does_not_build() {
    let e = PluginConfig::new(lua_bundle("processor", "x = 1"))
        .build_processor()
        .err()
        .unwrap();
    assert!(matches!(e, PluginError::Load { .. }), "{e}");
    let e = PluginConfig::new(lua_bundle("processor", "this is not lua"))
        .build_processor()
        .err()
        .unwrap();
    assert!(matches!(e, PluginError::LuaError { .. }), "{e}");
    let e = PluginConfig::new(lua_bundle("processor", "while true do end"))
        .limits(cpu_limits())
        .build_processor()
        .err()
        .unwrap();
    assert!(matches!(e, PluginError::CpuLimit { .. }), "{e}");
}

/// Single C-level calls that would run for hours with Lua's own string and table libraries
/// (no instruction hook fires inside a C function, and none of these allocates as it goes).
const RUNAWAY: &str = r#"
local exp_s, exp_p = string.rep("a", 40), string.rep("a?", 40) .. string.rep("a", 40)
local actions = {
  exp_find = function() return string.find(exp_s, exp_p) end,
  exp_method = function() return exp_s:match(exp_p) end,
  lazy_captures = function() return string.find(string.rep("a", 5000), string.rep("(.-)", 20) .. "x") end,
  gsub = function() return (string.gsub(string.rep("a", 100000), ".-.-.-b", "")) end,
  gmatch = function() for _ in string.rep("a", 100000):gmatch(".-.-.-b") do end end,
  plain = function() return string.find(string.rep("a", 2000000), string.rep("a", 1000000) .. "b", 1, true) end,
  pcall_pattern = function() for _ = 1, 1e9 do pcall(string.find, exp_s, exp_p) end end,
  move = function() table.move({}, 1, 1e15, 1) end,
  insert_lying_len = function() table.insert(setmetatable({}, { __len = function() return 1e15 end }), 1, "x") end,
  remove_lying_len = function() table.remove(setmetatable({}, { __len = function() return 1e15 end }), 1) end,
  sort_virtual = function() table.sort(setmetatable({}, { __len = function() return 2^31 - 2 end, __index = rawlen })) end,
  concat_virtual = function() return table.concat(setmetatable({}, { __len = function() return 1e15 end, __index = rawlen })) end,
  sort_big = function() local t = {} for i = 1, 500000 do t[i] = (i * 7919) % 100003 end table.sort(t) end,
}
function process(r)
  local a = actions[r.value]
  if a then a() end
  return r
end
"#;

#[test]
fn runaway_c_calls_fail_with_the_cpu_limit_in_time() {
    let limits = HostLimits {
        cpu_ms: 200,
        ..tight_limits()
    };
    for action in [
        "exp_find",
        "exp_method",
        "lazy_captures",
        "gsub",
        "gmatch",
        "plain",
        "pcall_pattern",
        "move",
        "insert_lying_len",
        "remove_lying_len",
        "sort_virtual",
        "concat_virtual",
        "sort_big",
    ] {
        let mut p = processor(lua_bundle("processor", RUNAWAY), limits.clone());
        let start = std::time::Instant::now();
        let e = fails(&mut *p, action);
        let took = start.elapsed();
        // The Lua replacement of concat over a huge virtual table collects the parts first,
        // so the memory limit may come before the CPU limit: both stop it.
        assert!(
            matches!(e, PluginError::CpuLimit { limit_ms: 200, .. })
                || (action == "concat_virtual" && matches!(e, PluginError::MemoryLimit { .. })),
            "{action}: {e}"
        );
        // The call stops at its limit (checks run every ~1000 instructions or 1024 matching
        // steps), not when a C function happens to return (which would take hours); the bound
        // is generous so a slow or loaded machine passes too.
        assert!(
            took < std::time::Duration::from_secs(10),
            "{action}: took {took:?}"
        );
        still_works(&mut *p);
    }
}

#[test]
fn string_and_table_builders_are_stopped_by_the_memory_limit() {
    let src = r#"
      local actions = {
        rep = function() return string.rep("x", 1 << 30) end,
        rep_empty_sep = function() return string.rep("", 1 << 26, "y") end,
        format = function() local s = "x" while true do s = string.format("%s%s", s, s) end end,
        concat = function()
          local t = {} for i = 1, 1000 do t[i] = string.rep("x", 1000) end
          while true do t = { table.concat(t), table.concat(t) } end
        end,
        gsub = function() return (string.gsub(string.rep("a", 100000), "", string.rep("b", 1000))) end,
        gsub_fn = function() return (string.gsub(string.rep("a", 100000), "", function() return string.rep("b", 1000) end)) end,
      }
      function process(r) local a = actions[r.value] if a then a() end return r end"#;
    for action in [
        "rep",
        "rep_empty_sep",
        "format",
        "concat",
        "gsub",
        "gsub_fn",
    ] {
        let mut p = processor(lua_bundle("processor", src), tight_limits());
        let e = fails(&mut *p, action);
        assert!(
            matches!(e, PluginError::MemoryLimit { limit_mb: 16, .. }),
            "{action}: {e}"
        );
        still_works(&mut *p);
    }
}

#[test]
fn pattern_functions_behave_as_luas_inside_the_sandbox() {
    let src = r#"
      function process(r)
        local out = {}
        out[#out + 1] = table.concat({ r.value:find("(%w+)=(%w+)") }, ",")
        out[#out + 1] = r.value:match("^(%a+)")
        for k, v in r.value:gmatch("(%w+)=(%w+)") do out[#out + 1] = k .. ":" .. v end
        out[#out + 1] = (r.value:gsub("%w+", { a = "A" }))
        out[#out + 1] = (r.value:gsub("(%w+)=(%w+)", "%2=%1", 1))
        local ok, e = pcall(string.find, r.value, "[a")
        out[#out + 1] = tostring(ok) .. " " .. e
        ok, e = pcall(table.insert, {}, 5, 1)
        out[#out + 1] = e
        local t = {} for i = 1, 100000 do t[i] = 100000 - i end
        table.sort(t)
        table.insert(t, 1, -1)
        out[#out + 1] = t[1] .. " " .. t[2] .. " " .. t[#t] .. " " .. table.remove(t, 1)
        r.value = table.concat(out, "|")
        return r
      end"#;
    let mut p = processor(lua_bundle("processor", src), tight_limits());
    let out = p.process_batch(recs(&["a=1 b=2"])).unwrap();
    assert_eq!(
        values(&out),
        ["1,3,a,1|a|a:1|b:2|A=1 b=2|1=a b=2|false malformed pattern (missing ']')|bad argument #2 to 'insert' (position out of bounds)|-1 0 99999 -1"]
    );
}

/// Harm that would come outside any call's limits: a finalizer (Lua runs `__gc` with hooks
/// off, at a collection or when the state is closed, so a looping one could never be
/// stopped), an empty string repeated 2^62 times (a C loop that writes nothing, so neither
/// the hook nor the memory limit sees it), and an error message of megabytes (kept once per
/// failed record, and sent on in dead-letter headers).
#[test]
fn finalizers_empty_repeats_and_huge_errors_are_bounded() {
    let gc_at_load = r#"
keep = setmetatable({}, { __gc = function() while true do end end })
function process(r) return r end
"#;
    let e = PluginConfig::new(lua_bundle("processor", gc_at_load))
        .limits(tight_limits())
        .build_processor()
        .err()
        .expect("a finalizer at load is refused");
    assert!(e.to_string().contains("__gc"), "{e}");

    let src = r#"
local actions = {
  -- Marked at setmetatable when the field exists, whatever its value then.
  gc_later = function() local mt = { __gc = false } keep = setmetatable({}, mt) mt.__gc = function() while true do end end end,
  empty_rep = function() return { value = string.rep("", math.maxinteger) .. ("").rep("", 1 << 62, "") .. "ok" } end,
  empty_rep_bad = function() return string.rep("", "lots") end,
  huge_error = function() error(string.rep("x", 4 << 20), 0) end,
}
function process(r)
  local a = actions[r.value]
  if a then local res = a() if res ~= nil then return res end end
  return r
end
"#;
    // A 2 s limit: a 4 MiB error costs tens of milliseconds on a loaded machine, and
    // nothing here relies on the CPU limit to stop a call.
    let mut p = processor(lua_bundle("processor", src), tight_limits());
    let e = fails(&mut *p, "gc_later");
    assert!(e.to_string().contains("__gc"), "{e}");
    still_works(&mut *p);
    let start = std::time::Instant::now();
    let out = p.process_batch(vec![rec("empty_rep")]).unwrap();
    assert_eq!(values(&out), ["ok"]);
    assert!(start.elapsed() < std::time::Duration::from_secs(10));
    let e = fails(&mut *p, "empty_rep_bad");
    assert!(e.to_string().contains("number expected"), "{e}");
    let e = fails(&mut *p, "huge_error").to_string();
    assert!(e.len() < 2048, "{} bytes", e.len());
    // Lua's message (the error's 4 MiB and its position) was cut, saying how long it was.
    assert!(e.contains("… (cut: 4194") && e.ends_with(" bytes)"), "{e}");
    still_works(&mut *p);
    // Dropping the instance (closing its Lua state) runs no finalizer: none was set.
    drop(p);
}
