--[[ behind.lua — is a product's Redis state behind a moment seen outside Redis? If so, delete it.

The moment (epoch, win sequence) comes from Postgres: the product's current epoch and the highest
win sequence of it relayed to RabbitMQ; with it, the highest release sequence of that epoch
recorded with a returned unit's order (release.lua). A state behind either forgot a win or a
returned unit. A state behind it went back in time (a failover to a
replica that had not received the last writes): deleting it makes the product lost everywhere,
so it is rebuilt by counting (see reserve.lua, which does the same against a process's fence).

A state that won at least once (seq > 0) whose buyers hash or outbox stream is gone lost part of
the sale (they exist from the first win on): it is deleted the same way.

KEYS: 1 state hash  2 buyers hash  3 outbox stream
ARGV: 1 epoch  2 seq  3 rseq
RETURNS {code, epoch, seq}: the state's moment and
  code: 1 held (at or past the moment), 0 not in Redis (no `stock`), -1 behind: deleted now
]]
local state = redis.call("HMGET", KEYS[1], "stock", "epoch", "seq", "rseq")
if not state[1] then
  return {0, -1, -1}
end
local epoch, seq, rseq = tonumber(state[2] or "0"), tonumber(state[3] or "0"), tonumber(state[4] or "0")
local fence_epoch, fence_seq, fence_rseq = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if epoch < fence_epoch or (epoch == fence_epoch and (seq < fence_seq or rseq < fence_rseq))
    or (seq > 0 and (redis.call("EXISTS", KEYS[2]) == 0 or redis.call("EXISTS", KEYS[3]) == 0)) then
  redis.call("DEL", KEYS[1])
  return {-1, epoch, seq}
end
return {1, epoch, seq}
