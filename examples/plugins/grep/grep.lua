-- Keep records whose value contains config.pattern (a plain substring, not a Lua pattern).
local pattern = config.pattern
local find = string.find

function process(record)
  if find(record.value, pattern, 1, true) then
    return record
  end
  return nil
end
