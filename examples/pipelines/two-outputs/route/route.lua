-- Orders are "id amount". Amounts over config.limit go to the pipeline's `large` output
-- (the quiver.sink header names an entry of [sinks]); the rest to the default sink.
-- A value that is not "id amount" fails, and the pipeline dead-letters exactly that record.
local limit = tonumber(config.limit)

function process(record)
  local id, amount = string.match(record.value, "^(%S+) (%d+)$")
  if not id then error("not an order: " .. record.value) end
  local out = { key = id, value = record.value }
  if tonumber(amount) > limit then
    out.headers = { ["quiver.sink"] = "large" }
  end
  return out
end
