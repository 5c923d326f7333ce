-- The product's Redis epoch and release sequence (`lua/release.lua`: +1 per unit returned) just
-- after a cancelled or expired order's unit went back on sale. The highest of the product's
-- current epoch is a moment Redis must never be found behind: a state behind it forgot a
-- returned unit (a failover to a replica that had not received the release, a restored
-- snapshot) and is rebuilt by counting, as one behind a relayed win is. Null: returned while
-- the product was not in Redis (the next preheat counted it), or before this column existed.
alter table orders add column if not exists released_epoch bigint;
alter table orders add column if not exists released_seq bigint;
