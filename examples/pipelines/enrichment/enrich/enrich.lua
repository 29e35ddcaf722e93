-- Append the country name looked up by the record's key (a country code) to its value.
-- The lookup table comes from config.countries: "code=name,code=name".
local names = {}
for code, name in string.gmatch(config.countries, "([^=,]+)=([^,]+)") do
  names[code] = name
end
local unknown = config.unknown

function process(record)
  local name = names[record.key or ""] or unknown
  return { key = record.key, value = record.value .. " (" .. name .. ")" }
end
