-- When a product's sale was retired from Redis: ended, every winner relayed and persisted, no
-- order left that could still change Redis. Its keys were then given an expiry
-- (`SECKILL_KEY_GRACE_SECS`) and it left the relay's list, so Redis no longer having it is
-- expected, never a loss (`recovering`). A new preheat clears it.
alter table product add column if not exists retired_at timestamptz;
-- The retirement pass looks for ended, preheated products not yet retired.
create index if not exists product_unretired_idx on product (ends_at)
    where preheated_at is not null and retired_at is null;
