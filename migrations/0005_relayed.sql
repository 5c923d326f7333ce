-- Every winner that left Redis for RabbitMQ, recorded by the relay after the broker confirmed
-- it and before the outbox entry is acknowledged. A product Redis lost (or that went back in
-- time) is rebuilt only when each of these has an order or a rejection: a winner still in the
-- queue, held unacknowledged by a stalled worker, waiting out a worker's backoff or sitting in
-- the dead-letter queue keeps it `recovering` (drained means counted, not quiet).
create table if not exists relayed (
    reservation_id uuid not null constraint relayed_pkey primary key,
    product_id     bigint not null constraint relayed_product_fkey references product (product_id),
    -- The product's Redis epoch and win sequence of this win (`lua/reserve.lua`): the highest
    -- sequence relayed is a moment Redis must never be found behind.
    epoch          bigint not null,
    seq            bigint not null,
    relayed_at     timestamptz not null default now()
);
create index if not exists relayed_product_seq_idx on relayed (product_id, epoch, seq);

-- The product's Redis epoch: bumped each time its sale is loaded into a Redis that does not
-- hold it (the first preheat, a rebuild after a loss or a rollback). Redis keeps it in the
-- product's state with the win sequence, so a Redis state from an earlier epoch, or behind a
-- sequence already relayed, is recognised as gone back in time.
alter table product add column if not exists redis_epoch bigint not null default 0;
