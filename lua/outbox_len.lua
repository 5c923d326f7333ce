--[[ outbox_len.lua — the length of several outbox streams in one call (the relay's look at
every product it tracks: one call per hash slot, so one call on a single Redis).

KEYS: outbox streams sharing one hash slot (on a cluster; any keys on a single Redis)
ARGV: none
RETURNS one number per key: its length (0 if it does not exist), or -1 if it is not a stream
  (a broken key must not hide the others' lengths)
]]
local out = {}
for i, key in ipairs(KEYS) do
  local ok, n = pcall(redis.call, "XLEN", key)
  if ok then
    out[i] = n
  else
    out[i] = -1
  end
end
return out
