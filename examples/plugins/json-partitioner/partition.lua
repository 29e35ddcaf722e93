-- Route by the top-level JSON field config.field of the value: records with the same field
-- value go to the same partition (FNV-1a hash of the field's text, modulo the partition count).
-- Records without the field go to partition 0. The extraction is deliberately small: it finds
-- "field": followed by a string or a bare scalar, which covers flat event objects.
local field = config.field
local key_pattern = '"' .. field:gsub("%p", "%%%0") .. '"%s*:%s*'

local function extract(value)
  local _, e = value:find(key_pattern)
  if not e then return nil end
  local s = value:match('^"([^"]*)"', e + 1)
  if s then return s end
  return value:match("^([^,}%s]+)", e + 1)
end

local function fnv1a(s)
  local h = 2166136261
  for i = 1, #s do
    h = ((h ~ s:byte(i)) * 16777619) & 0xffffffff
  end
  return h
end

function partition(key, value, partition_count)
  local v = extract(value)
  if v == nil then return 0 end
  return fnv1a(v) % partition_count
end
