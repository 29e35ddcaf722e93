-- Hostile on purpose (see README.md): for every record, match a pattern that backtracks
-- exponentially ("a?" forty times then "a" forty times against forty "a"s: 2^40 tries).
-- In stock Lua this runs inside string.find, a C function, where no instruction hook
-- fires; Quiver's sandbox bounds pattern matching, so the call fails at its budget.
local subject = string.rep("a", 40)
local pattern = string.rep("a?", 40) .. string.rep("a", 40)

function process(r)
  if string.find(subject .. r.value, pattern) then
    return r
  end
  return nil
end
