//! The bounded find/match/gmatch/gsub against Lua's own string library: results (values, types,
//! counts) and error messages must be identical on normal inputs, and pathological patterns
//! must stop quickly.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mlua::{Lua, Table};

use super::strlib::{self, Limits, BUDGET_MESSAGE, DEADLINE_MESSAGE};

struct TestLimits {
    steps: AtomicU64,
    tripped: AtomicBool,
    deadline: Option<Instant>,
}

impl TestLimits {
    fn new(steps: u64, deadline: Option<Duration>) -> Arc<Self> {
        Arc::new(TestLimits {
            steps: AtomicU64::new(steps),
            tripped: AtomicBool::new(false),
            deadline: deadline.map(|d| Instant::now() + d),
        })
    }
}

impl Limits for TestLimits {
    fn steps_left(&self) -> u64 {
        self.steps.load(Ordering::Relaxed)
    }
    fn spend(&self, steps: u64) {
        let left = self.steps.load(Ordering::Relaxed);
        self.steps
            .store(left.saturating_sub(steps), Ordering::Relaxed);
    }
    fn expired(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }
    fn trip(&self) {
        self.tripped.store(true, Ordering::Relaxed);
    }
}

/// A full (unsandboxed) Lua with the bounded functions in the global table `bounded`.
fn lua_with_bounded(limits: Arc<dyn Limits>) -> Lua {
    let lua = Lua::new();
    let bounded: Table = lua.create_table().unwrap();
    strlib::install(&lua, &bounded, limits).unwrap();
    lua.globals().set("bounded", bounded).unwrap();
    lua
}

/// Runs every case with `string.X` and `bounded.X` and returns the mismatches.
const HARNESS: &str = r#"
local cases = ...
-- %q, with bytes >= 128 escaped too (the results go to Rust as UTF-8), without patterns.
local function q(v)
  local t, out = string.format("%q", v), {}
  for i = 1, #t do
    local b = string.byte(t, i)
    out[i] = b >= 128 and "\\" .. b or string.char(b)
  end
  return table.concat(out)
end
local function norm(e)
  if type(e) ~= "string" then return "<" .. type(e) .. ">" end
  return e
end
local function ser(r, from)
  local out = {}
  for i = from, r.n do
    local v = r[i]
    local t = type(v)
    if t == "string" then out[#out + 1] = q(v)
    elseif t == "number" then out[#out + 1] = math.type(v) .. ":" .. tostring(v)
    else out[#out + 1] = t .. ":" .. tostring(v) end
  end
  return r.n - from + 1 .. "[" .. table.concat(out, ",") .. "]"
end
local function run(lib, case)
  local f = lib[case.name]
  if case.name == "gmatch" then
    local r = table.pack(pcall(f, table.unpack(case.args, 1, case.args.n)))
    if not r[1] then return "E:" .. norm(r[2]) end
    local it, out = r[2], {}
    for _ = 1, 100 do
      local x = table.pack(pcall(it))
      if not x[1] then out[#out + 1] = "E:" .. norm(x[2]) break end
      out[#out + 1] = ser(x, 2)
      if x[2] == nil then break end
    end
    return table.concat(out, " ; ")
  end
  local r = table.pack(pcall(f, table.unpack(case.args, 1, case.args.n)))
  if not r[1] then return "E:" .. norm(r[2]) end
  return ser(r, 2)
end
local results, labels = {}, {}
for i, case in ipairs(cases) do
  results[i] = run(string, case)
  local shown = {}
  for j = 1, case.args.n do
    local v = case.args[j]
    shown[j] = type(v) == "string" and q(v) or type(v) == "number" and tostring(v) or type(v)
  end
  labels[i] = case.name .. "(" .. table.concat(shown, ", ") .. ")"
end
return results, labels
"#;

const CASES: &str = r#"
local cases = {}
local function C(name, ...) cases[#cases + 1] = { name = name, args = table.pack(...) } end
local words = function(...) return table.concat({...}, "|") end
local maybe = function(a) if a == "b" then return nil end if a == "c" then return false end return a:upper() end
local num = function(a) return #a + 0.5 end
local tbl = { a = "A", b = false, hello = 1, world = 2.5 }
-- find / match: classes, sets, quantifiers, anchors, captures
for _, p in ipairs({ "o w", "l+", "l*", "l-", "l?", "^h", "^e", "o$", "d$", "%a+", "%A+", "%d+", "%D+", "%s",
  "%S+", "%w+", "%W", "%l+", "%u+", "%p", "%P+", "%x+", "%c", "%g+", "[aeiou]", "[^aeiou]+", "[a-f]+",
  "[%a_][%w_]*", "[]]", "[^]]+", "[a-]", "[-a]", "[%]]", "[%-]", ".-", ".-o", "(h)(e)", "(l)%1", "()ll()",
  "(o)(.-)%1", "%((.-)%)", "%b()", "%b[]", "%f[%w]%w+", "%f[%W]", "%f[%a]%a+%f[%A]", "(", ")", "%", "[a",
  "%b", "%ba", "%f", "%fx", "%1", "(()%1)", "()%1", "%0", "a)", "(a))", "$", "^", "^$", "x*$", "%.", "%%",
  "[%.%-]", "(h)(.)(l)(l)(o)", "(((h)))", "%z", "%Z+", "[%z]", "[\0]" }) do
  for _, s in ipairs({ "hello world", "", "(a[b]c)", "THE (quick) fox", "x = 1.5e-3; y=%d", "a\0b\0", "]]--" }) do
    C("find", s, p) C("match", s, p) C("gmatch", s, p)
    C("gsub", s, p, "<%0>") C("gsub", s, p, "%1-%1") C("gsub", s, p, words) C("gsub", s, p, tbl)
  end
end
-- init, plain, numbers as strings, bad arguments
for _, init in ipairs({ -100, -12, -11, -3, -1, 0, 1, 2, 5, 11, 12, 13, 100, 2.0, "3", "x", 1.5, math.mininteger, math.maxinteger }) do
  C("find", "hello world", "o", init) C("find", "hello world", "", init) C("find", "hello world", "()", init)
  C("find", "a.b.c", ".", init, true) C("match", "hello world", "(o)(.)", init) C("gmatch", "hello world", "o.", init)
  C("gmatch", "hello", "", init) C("gmatch", "hello", "()", init)
end
C("find", 12345, 34) C("find", 1.5, ".") C("match", 2^63, "%d+") C("gsub", 123, 2, 9) C("gsub", "abc", "b", 1e15)
C("gsub", "abc", "b", 0.1) C("gsub", "abc", "b", 2^53) C("find") C("find", "a") C("find", nil, "a") C("find", {}, "a")
C("find", "a", true) C("match", "a", "a", {}) C("gsub", "a", "a") C("gsub", "a", "a", true) C("gsub", "a", "a", nil)
C("gsub", "a", "a", "x", "y") C("gsub", "a", "a", "x", 1.5) C("gsub", "a", "a", true, "y") C("gmatch", "a")
C("find", "a+b", "+", 1, true) C("find", "a+b", "+", 1, false) C("find", "a+b", "a+", 1, 0) C("find", "aaa", "aa", 2, true)
C("find", "abc", "c", 3, true) C("find", "abc", "", 4, true) C("find", "abc", "", 5, true) C("find", "", "", 1, true)
-- gsub: every replacement kind, %n, n limits, anchors, empty matches
for _, s in ipairs({ "hello world from Lua", "abc", "", "a,b,,c", "  trim me  " }) do
  for _, p in ipairs({ "(%w+)", "%w+", "(%w+) (%w+)", "", "()", "^%s*(.-)%s*$", "^(%w)", "[,]", ",*", "x*", "(o)", "%s+$", "(a)(b)(c)" }) do
    for _, r in ipairs({ "%1", "%0", "%2 %1", "[%%]", "%", "%x", "%9", "", words, maybe, num, tbl, 7, 1.25 }) do
      for _, n in ipairs({ false, 0, 1, 2, -1, 100 }) do
        if n then C("gsub", s, p, r, n) else C("gsub", s, p, r) end
      end
    end
  end
end
C("gsub", "abc", "%w", function() return {} end) C("gsub", "abc", "%w", function() return true end)
C("gsub", "abc", "%w", function() error("inner") end) C("gsub", "abc", "%w", function() error("inner", 0) end)
C("gsub", "abc", "%w", setmetatable({}, { __index = function(_, k) return k .. k end }))
C("gsub", "abc", "(", "x") C("gsub", "abc", "(b", "%1") C("gsub", "abc", "(b", words)
C("gsub", "abc", "()b", "%1") C("gsub", "abc", "(b)()", words) C("gsub", "a.b", ".", "%%") C("gsub", "a.b", "%.", "%0%0")
-- the recursion limit
C("find", string.rep("a", 300), string.rep("a?", 300)) C("match", string.rep("a", 199), string.rep("a?", 199))
C("match", string.rep("a", 198), string.rep("a?", 198) .. "$") C("match", string.rep("a", 250), string.rep("(a)", 33))
C("match", string.rep("a", 50), string.rep("(a)", 32))
-- random patterns and subjects (many malformed: errors must match too)
math.randomseed(7)
local chars = { "a", "b", "c", "(", ")", "[", "]", "%", "-", ".", "x", " ", "1", "\0", "A", "^", "$", "y", "\255", "_" }
local toks = { "a", "b", ".", "%a", "%d", "%s", "%w", "%A", "[ab]", "[^a]", "[a-c]", "[%a]", "*", "+", "-", "?", "^",
  "$", "(", ")", "()", "%1", "%2", "%b()", "%f[%a]", "%", "[", "]", "%%", "%.", "[]]", "[^]]", "%z", "%x", "%p", "%c",
  "%g", "%u", "%l", "a*", "b-", ".?", "(a)", "(.-)", "%b[]", "[%]]", "[a-]", "1", "%f[%s]", "[^%s]", "%b)(",
  "%B", "%F", ")(", "(%a+)", "%3", "[%w_]", "[%%]", "[a%-z]", "x?", "y*", "%bab", "[]-a]", "%S*", "(()" }
local repls = { "%0", "<%1>", "%2", "x", "%%", "%", words, maybe, tbl, 7, "%3", "[%1]", "%0%2", "%%%1", "" }
for _ = 1, 60000 do
  local s = {}
  for i = 1, math.random(0, 12) do s[i] = chars[math.random(#chars)] end
  local p = {}
  for i = 1, math.random(0, 6) do p[i] = toks[math.random(#toks)] end
  s, p = table.concat(s), table.concat(p)
  local init = ({ nil, -3, 1, 2, 5, 14 })[math.random(6)]
  local which = math.random(4)
  if which == 1 then C("find", s, p, init)
  elseif which == 2 then C("match", s, p, init)
  elseif which == 3 then C("gmatch", s, p, init)
  else C("gsub", s, p, repls[math.random(#repls)], ({ nil, 1, 2 })[math.random(3)]) end
end
return cases
"#;

/// `HARNESS` over `CASES` in `lua`: each case's result, and its description.
fn run_cases(lua: &Lua) -> (Vec<String>, Vec<String>) {
    let cases: Table = lua.load(CASES).eval().unwrap();
    lua.load(HARNESS).call(cases).unwrap()
}

#[test]
fn results_and_errors_match_luas_string_library() {
    // Two states: Lua's own library, and the same with the bounded functions installed in
    // `string` (so argument errors name 'string.find' in both).
    let (want, labels) = run_cases(&Lua::new());
    let bounded = Lua::new();
    let string: Table = bounded.globals().get("string").unwrap();
    strlib::install(&bounded, &string, TestLimits::new(u64::MAX, None)).unwrap();
    let (got, _) = run_cases(&bounded);
    assert!(want.len() > 35_000, "only {} cases", want.len());
    assert_eq!(want.len(), got.len());
    let bad: Vec<String> = (0..want.len())
        .filter(|&i| want[i] != got[i])
        .take(20)
        .map(|i| format!("{}: lua {} | bounded {}", labels[i], want[i], got[i]))
        .collect();
    assert!(bad.is_empty(), "mismatches:\n{}", bad.join("\n"));
}

#[test]
fn pathological_patterns_stop_with_the_budget_error_quickly() {
    let cases = [
        // Exponential backtracking (hours with Lua's own matcher).
        r#"string.find(string.rep("a", 40), string.rep("a?", 40) .. string.rep("a", 40))"#,
        r#"string.find(string.rep("a", 5000), string.rep("(.-)", 20) .. "x")"#,
        r#"string.match(string.rep("a", 100000), ".-.-.-.-b")"#,
        r#"string.gsub(string.rep("a", 100000), ".-.-b", "")"#,
        r#"for _ in string.gmatch(string.rep("a", 100000), ".-.-b") do end"#,
        // A quadratic plain search.
        r#"string.find(string.rep("a", 2000000), string.rep("a", 1000000) .. "b", 1, true)"#,
    ];
    for code in cases {
        let limits = TestLimits::new(5_000_000, None);
        let lua = Lua::new();
        let string: Table = lua.globals().get("string").unwrap();
        strlib::install(&lua, &string, limits.clone()).unwrap();
        let start = Instant::now();
        let e = lua.load(code).exec().unwrap_err().to_string();
        let took = start.elapsed();
        assert!(e.contains(BUDGET_MESSAGE), "{code}: {e}");
        assert!(limits.tripped.load(Ordering::Relaxed), "{code}");
        assert!(took < Duration::from_secs(20), "{code}: took {took:?}");
    }
}

#[test]
fn the_deadline_stops_matching_even_with_budget_left() {
    let limits = TestLimits::new(u64::MAX, Some(Duration::from_millis(20)));
    let lua = lua_with_bounded(limits.clone());
    let start = Instant::now();
    let e = lua
        .load(r#"bounded.find(string.rep("a", 40), string.rep("a?", 40) .. string.rep("a", 40))"#)
        .exec()
        .unwrap_err()
        .to_string();
    assert!(e.contains(DEADLINE_MESSAGE), "{e}");
    assert!(start.elapsed() < Duration::from_secs(20));
    assert!(limits.tripped.load(Ordering::Relaxed));
}

#[test]
fn method_calls_on_strings_use_the_bounded_functions() {
    let limits = TestLimits::new(1_000_000, None);
    let lua = Lua::new();
    let string: Table = lua.globals().get("string").unwrap();
    strlib::install(&lua, &string, limits.clone()).unwrap();
    let e = lua
        .load(r#"local s = ("a"):rep(40) return s:find(("a?"):rep(40) .. ("a"):rep(40))"#)
        .exec()
        .unwrap_err()
        .to_string();
    assert!(e.contains(BUDGET_MESSAGE), "{e}");
    limits.steps.store(1_000_000, Ordering::Relaxed);
    let (a, b): (i64, i64) = lua.load(r#"return ("hello"):find("l+")"#).eval().unwrap();
    assert_eq!((a, b), (3, 4));
    // Errors carry the caller's position, as luaL_error gives them.
    let e = lua
        .load("local x = ('a'):find('%')")
        .set_name("=chunk")
        .exec()
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("chunk:1: malformed pattern (ends with '%')"),
        "{e}"
    );
}

#[test]
fn steps_are_shared_by_every_call_and_callbacks() {
    // The budget is for the whole plugin call: many cheap matches add up.
    let limits = TestLimits::new(100_000, None);
    let lua = lua_with_bounded(limits.clone());
    let e = lua
        .load(r#"for i = 1, 1e6 do bounded.find("hello world", "o.-d") end"#)
        .exec()
        .unwrap_err()
        .to_string();
    assert!(e.contains(BUDGET_MESSAGE), "{e}");
    // Nested: a gsub callback running its own matches spends from the same budget.
    let limits = TestLimits::new(100_000, None);
    let lua = lua_with_bounded(limits.clone());
    let e = lua
        .load(
            r#"bounded.gsub(string.rep("x", 1000), "x", function(c)
                 for i = 1, 100 do bounded.find("hello world", "o.-d") end
               end)"#,
        )
        .exec()
        .unwrap_err()
        .to_string();
    assert!(e.contains(BUDGET_MESSAGE), "{e}");
}

#[test]
fn gsub_output_counts_against_the_memory_limit() {
    let lua = lua_with_bounded(TestLimits::new(u64::MAX, None));
    lua.set_memory_limit(8 * 1024 * 1024).unwrap();
    let e = lua
        .load(r#"bounded.gsub(string.rep("a", 100000), "", string.rep("b", 1000))"#)
        .exec()
        .unwrap_err();
    assert!(matches!(e, mlua::Error::MemoryError(_)), "{e:?}");
}

/// Runs table operations (small and past the C-loop limit, plain and with metatables, and
/// their errors) and returns a transcript.
const TABLE_SCRIPT: &str = r#"
local out = {}
local function show(t, n)
  local parts = {}
  for i = 1, n do local v = rawget(t, i) parts[#parts + 1] = v == nil and "_" or tostring(v) end
  return table.concat(parts, ",")
end
local function sum(t, n)
  local s = 0
  for i = 1, n do
    local v = rawget(t, i)
    if type(v) == "string" then v = #v + 1000 end
    s = (s * 31 + (v or 7)) % 1000003
  end
  return s
end
local function try(label, f, ...)
  local r = table.pack(pcall(f, ...))
  -- Errors raised by the wrappers carry their own position and the short name.
  if not r[1] then r[2] = r[2]:gsub("^%[string [^]]*%]:%d+: ", ""):gsub("^quiver%-tablib:%d+: ", ""):gsub("'table%.(%a+)'", "'%1'") end
  for i = 1, r.n do if type(r[i]) == "table" then r[i] = "<table>" else r[i] = tostring(r[i]) end end
  out[#out + 1] = label .. ": " .. table.concat(r, " ", 1, r.n)
end
local function proxy(n)
  local store = {}
  for i = 1, n do store[i] = i end
  return setmetatable({}, {
    __index = function(_, k) return store[k] end,
    __newindex = function(_, k, v) store[k] = v end,
    __len = function() return #store end,
  }), store
end
local BIG = 70000
for _, n in ipairs({ 0, 1, 5, BIG }) do
  local t = {} for i = 1, n do t[i] = i end
  try("insert end " .. n, table.insert, t, "x") out[#out + 1] = sum(t, n + 2)
  try("insert 1 " .. n, table.insert, t, 1, "y") out[#out + 1] = sum(t, n + 3)
  try("insert 2.0 " .. n, table.insert, t, 2.0, "z") out[#out + 1] = sum(t, n + 4)
  try("insert bad pos " .. n, table.insert, t, n + 10, "z")
  try("insert pos 0 " .. n, table.insert, t, 0, "z")
  try("insert str pos " .. n, table.insert, t, "1", "w") out[#out + 1] = sum(t, n + 5)
  try("insert wrong " .. n, table.insert, t, 1, 2, 3)
  try("insert nonint " .. n, table.insert, t, 1.5, 2)
  try("remove " .. n, table.remove, t) out[#out + 1] = sum(t, n + 5)
  try("remove 1 " .. n, table.remove, t, 1) out[#out + 1] = sum(t, n + 5)
  try("remove #+1 " .. n, table.remove, t, #t + 1) out[#out + 1] = sum(t, n + 5)
  try("remove bad " .. n, table.remove, t, #t + 2)
  try("remove 0 " .. n, table.remove, {}, 0)
  local p, store = proxy(n)
  try("proxy insert 1 " .. n, table.insert, p, 1, "q") out[#out + 1] = sum(store, n + 2)
  try("proxy remove 1 " .. n, table.remove, p, 1) out[#out + 1] = sum(store, n + 2)
  try("proxy concat " .. n, function() return #table.concat(p, "-") end)
  try("proxy concat range " .. n, table.concat, p, ",", 1, math.min(n, 3))
  try("proxy concat bad " .. n, table.concat, p, ",", 1, n + 1)
  local m = {} for i = 1, n do m[i] = i end
  try("move fwd " .. n, function() return table.move(m, 1, n, 3) == m end) out[#out + 1] = sum(m, n + 3)
  try("move back " .. n, function() return table.move(m, 3, n + 2, 1) == m end) out[#out + 1] = sum(m, n + 3)
  local d = {}
  try("move other " .. n, function() return table.move(m, 1, n, 2, d) == d end) out[#out + 1] = sum(d, n + 2)
  try("move proxy " .. n, function() return table.move(p, 1, n, 2) == p end) out[#out + 1] = sum(store, n + 2)
  local s = {} for i = 1, n do s[i] = (i * 7919) % 1009 end
  try("sort " .. n, table.sort, s) out[#out + 1] = sum(s, n)
  try("sort desc " .. n, table.sort, s, function(a, b) return a > b end) out[#out + 1] = sum(s, n)
  local ps, pstore = proxy(n)
  for i = 1, n do pstore[i] = (i * 31) % 97 end
  try("sort proxy " .. n, table.sort, ps) out[#out + 1] = sum(pstore, n)
  local w = {} for i = 1, n do w[i] = tostring(i % 10) end
  try("concat " .. n, function() return #table.concat(w, ", ") end)
end
try("move wrap", table.move, {}, 1, 3, math.maxinteger)
try("move too many", table.move, {}, -1, math.maxinteger, 1)
try("move nothing", function() return table.move({1, 2}, 3, 1, 1)[1] end)
try("sort mixed", table.sort, {1, "x", 2})
try("sort bad comp", table.sort, {3, 1, 2}, 42)
try("concat bad", table.concat, {1, {}, 3})
try("concat sep", table.concat, {1, 2, 3}, {})
try("insert on string", table.insert, "abc", 1)
return table.concat(out, "\n")
"#;

#[test]
fn table_functions_match_luas_on_normal_inputs() {
    let plain = Lua::new();
    let want: String = plain.load(TABLE_SCRIPT).eval().unwrap();
    let bounded = Lua::new();
    bounded.load(super::TABLIB).exec().unwrap();
    let got: String = bounded.load(TABLE_SCRIPT).eval().unwrap();
    for (i, (w, g)) in want.lines().zip(got.lines()).enumerate() {
        assert_eq!(w, g, "line {i}");
    }
    assert_eq!(want.lines().count(), got.lines().count());
}
