-- Runs in every plugin state before the plugin's script. Locks the sandbox down and returns
-- the host's drivers; nothing here is reachable by the plugin except through the globals it
-- sets on purpose.
local check, host_config, BAD = ...
local _load, _pcall, _xpcall = load, pcall, xpcall
local type, error, rawlen, setmetatable, next = type, error, rawlen, setmetatable, next

-- Text chunks only: crafted bytecode can crash the interpreter.
load = function(chunk, name, mode, env)
  if env == nil then return _load(chunk, name, "t") end
  return _load(chunk, name, "t", env)
end
-- A CPU-limit error must not be swallowed: re-raise it when the protected call returns.
pcall = function(...) return check(_pcall(...)) end
xpcall = function(...) return check(_xpcall(...)) end
dofile, loadfile, require, collectgarbage, print, loadstring = nil, nil, nil, nil, nil, nil
string.dump = nil

-- No finalizers: Lua runs `__gc` metamethods with hooks off (so outside the CPU limit), at
-- any collection and when the state is closed, where nothing could stop one that loops.
-- An object is marked for finalization only if its metatable has the field (any value) when
-- it is set, so checking there is enough.
-- (`setmetatable` is a local here, Lua's own, so the global is set through _ENV.)
local rawget = rawget
_ENV.setmetatable = function(t, mt)
  if type(mt) == "table" and rawget(mt, "__gc") ~= nil then
    error("__gc metamethods are not allowed in plugins (finalizers would run outside the CPU limit)", 2)
  end
  return setmetatable(t, mt)
end

-- string.rep of an empty string with an empty separator loops n times in C writing nothing:
-- no hook fires and no memory is used, so a large n would never return. Its result is "".
local _rep, tointeger, tonumber = string.rep, math.tointeger, tonumber
string.rep = function(s, n, sep)
  if s == "" and (sep == nil or sep == "") and (type(n) == "number" or type(n) == "string")
    and tointeger(tonumber(n)) then
    return ""
  end
  return _rep(s, n, sep)
end

config = setmetatable({}, {
  __index = host_config,
  __newindex = function() error("config is read-only", 2) end,
  __pairs = function() return next, host_config, nil end,
  __len = function() return #host_config end,
  __metatable = false,
})

-- Calls process(record) per record and stores each result, as returned, at the record's index
-- in `out` (nil for dropped records); the host classifies them (record / array / other) while
-- reading back, which keeps this loop free of C calls.
local function drive(process, inputs, n, out)
  for i = 1, n do
    out[i] = process(inputs[i])
  end
  return out, true, n
end

-- Calls process_batch(records) once; the result must be an array of records.
local function drive_batch(process_batch, inputs, n)
  local out = process_batch(inputs)
  if type(out) ~= "table" then
    error(BAD .. "process_batch returned a " .. type(out) .. " (want an array of records)", 0)
  end
  return out, false, rawlen(out)
end

return drive, drive_batch
