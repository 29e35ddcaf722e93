-- Keeps table.insert, table.remove, table.move, table.sort and table.concat from running
-- unbounded inside one C call, where no instruction hook fires. Their C loops run once per
-- position of a range that the script chooses, whatever the table holds, and reading or
-- writing nil allocates nothing, so the memory limit does not stop them either:
--   table.move({}, 1, 1e15, 1)                       -- 10^15 iterations of nil moves
--   table.insert(t, 1, x) / table.remove(t, 1)       -- with a lying __len, or a sparse table
--                                                    -- whose border #t is 2^50
-- and with metatables every element access may call a C function (__index = rawlen), so
-- table.concat and table.sort on a huge "virtual" table run long too.
-- The rule: a call whose loop touches at most BIG positions of a plain table (no metatable)
-- goes to the C function unchanged; any other call runs the same algorithm in Lua, where the
-- instruction hook enforces the CPU limit. table.sort keeps Lua's C sort but, for big or
-- metatabled tables, gets a Lua comparator (the default one is `a < b`), so the hook fires
-- between comparisons.
-- The C functions, called as fields so that their argument errors name 'insert', 'sort'...
local C = { insert = table.insert, remove = table.remove, move = table.move, sort = table.sort, concat = table.concat }
local type, getmetatable, select, error, rawlen = type, getmetatable, select, error, rawlen
local tointeger, maxinteger = math.tointeger, math.maxinteger
local format = string.format
local BIG = 1 << 16

local function plain(t)
  return type(t) == "table" and getmetatable(t) == nil
end

local function lt(a, b) return a < b end

table.insert = function(...)
  local t, pos, v = ...
  if select("#", ...) ~= 3 or type(t) ~= "table" then return C.insert(...) end
  local p = tointeger(pos)
  if p == nil then return C.insert(...) end
  local e = #t + 1
  if plain(t) and e - p <= BIG then return C.insert(...) end
  if p < 1 or p > e then error("bad argument #2 to 'insert' (position out of bounds)", 2) end
  for i = e, p + 1, -1 do t[i] = t[i - 1] end
  t[p] = v
end

table.remove = function(...)
  local t, pos = ...
  if type(t) ~= "table" then return C.remove(...) end
  local size = #t
  local p = size
  if select("#", ...) >= 2 and pos ~= nil then
    p = tointeger(pos)
    if p == nil then return C.remove(...) end
  end
  if plain(t) and size - p <= BIG then return C.remove(...) end
  if p ~= size and (p < 1 or p > size + 1) then
    error("bad argument #2 to 'remove' (position out of bounds)", 2)
  end
  local result = t[p]
  while p < size do
    t[p] = t[p + 1]
    p = p + 1
  end
  t[p] = nil
  return result
end

table.move = function(...)
  local a1, f, e, t, a2 = ...
  local fi, ei, ti = tointeger(f), tointeger(e), tointeger(t)
  if not (fi and ei and ti and ei >= fi and type(a1) == "table") or (a2 ~= nil and type(a2) ~= "table")
      or not (fi > 0 or ei < maxinteger + fi) or ei - fi < BIG then
    return C.move(...)
  end
  local n = ei - fi + 1
  if ti > maxinteger - n + 1 then return C.move(...) end
  local dest = a1
  if a2 ~= nil then dest = a2 end
  if ti > ei or ti <= fi or (a2 ~= nil and not (a1 == a2)) then
    for i = 0, n - 1 do dest[ti + i] = a1[fi + i] end
  else
    for i = n - 1, 0, -1 do dest[ti + i] = a1[fi + i] end
  end
  return dest
end

table.sort = function(...)
  local t, comp = ...
  if type(t) == "table" and (getmetatable(t) ~= nil or rawlen(t) > BIG) then
    if comp == nil then
      comp = lt
    elseif type(comp) == "function" then
      local c = comp
      comp = function(a, b) return c(a, b) end
    end
    return C.sort(t, comp)
  end
  return C.sort(...)
end

table.concat = function(...)
  local t, sep, i, j = ...
  if plain(t) or type(t) ~= "table" then return C.concat(...) end
  local last = #t
  if sep == nil then sep = "" end
  local fi, li = 1, last
  if i ~= nil then fi = tointeger(i) end
  if j ~= nil then li = tointeger(j) end
  if (type(sep) ~= "string" and type(sep) ~= "number") or fi == nil or li == nil then
    return C.concat(...)
  end
  local parts, n = {}, 0
  for k = fi, li do
    local v = t[k]
    local tv = type(v)
    if tv ~= "string" and tv ~= "number" then
      error(format("invalid value (%s) at index %d in table for 'concat'", tv, k), 2)
    end
    n = n + 1
    parts[n] = v
  end
  return C.concat(parts, sep)
end
