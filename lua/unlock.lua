--[[ unlock.lua — release a lock only if this caller still holds it.

KEYS: 1 lock key
ARGV: 1 the holder's token
RETURNS 1 released, 0 held by someone else (or expired)
]]
if redis.call("GET", KEYS[1]) == ARGV[1] then
  return redis.call("DEL", KEYS[1])
end
return 0
