-- Installs the host's bounded pattern functions (Rust, see strlib.rs) as find, match, gmatch and
-- gsub of `target` (the sandbox's `string` table, which is also the string metatable's
-- __index, so `s:find(...)` gets them too). The Rust functions cannot raise a plain Lua error
-- value themselves: for an error they return ERR, a level and the value, and the wrappers
-- below raise it, so a script sees the same error strings (with the caller's position) as
-- with Lua's own string library.
local ERR, rfind, rmatch, rgmatch, rgsub, target = ...
local error = error

local function pass(...)
  if (...) == ERR then
    local _, level, value = ...
    error(value, level)
  end
  return ...
end

target.find = function(...) return pass(rfind(...)) end
target.match = function(...) return pass(rmatch(...)) end
target.gsub = function(...) return pass(rgsub(...)) end
target.gmatch = function(...)
  local it, level, value = rgmatch(...)
  if it == ERR then error(value, level) end
  return function() return pass(it()) end
end
