-- Order events: a transactional outbox. Every change of an order — created (`order.confirmed`),
-- `order.paid`, `order.cancelled`, `order.expired` — and every win that could not become one
-- (`order.rejected`) adds a row here *in the same transaction as the change*, written by the
-- triggers below, so no writer (the worker, a payment, a cancel, the sweeper, a rejection) can
-- commit a change without its event or an event without its change. Dispatchers in the
-- `worker` processes deliver each one at least once: to RabbitMQ (`published_at`) and, when a
-- webhook is configured, to it (`delivered_at`, with every attempt in `webhook_attempt`).
create table if not exists order_event (
    -- Unique per event; a redelivery repeats it (receivers deduplicate on it).
    event_id        uuid not null constraint order_event_pkey primary key,
    reservation_id  uuid not null,
    -- Per order (per reservation: a rejected win has no order): 1 for its first event, +1 for
    -- each later one; receivers may order by it.
    seq             integer not null,
    type            text not null constraint order_event_type_check check (type in
                    ('order.confirmed', 'order.paid', 'order.cancelled', 'order.expired', 'order.rejected')),
    product_id      bigint not null,
    -- The event exactly as delivered: {id, type, created_at, data: {...}}.
    body            jsonb not null,
    created_at      timestamptz not null default now(),
    published_at    timestamptz,
    delivered_at    timestamptz,
    attempts        integer not null default 0,
    next_attempt_at timestamptz not null default now(),
    last_error      text,
    constraint order_event_seq_key unique (reservation_id, seq)
);
create index if not exists order_event_unpublished_idx on order_event (created_at) where published_at is null;
create index if not exists order_event_undelivered_idx on order_event (next_attempt_at) where delivered_at is null;
create index if not exists order_event_product_idx on order_event (product_id, created_at);

-- Every attempt to deliver an event to the webhook: when, the answer's status (null: no answer),
-- how long it took, and why it failed.
create table if not exists webhook_attempt (
    event_id    uuid not null references order_event (event_id) on delete cascade,
    attempt     integer not null,
    at          timestamptz not null default now(),
    status      integer,
    latency_ms  integer not null,
    error       text,
    constraint webhook_attempt_pkey primary key (event_id, attempt)
);

-- The events of `changed` orders (created, or whose status changed), one each.
create or replace function seckill_add_order_events(changed orders[]) returns void language sql as $$
    insert into order_event (event_id, reservation_id, seq, type, product_id, body, created_at)
    select e.id, e.reservation_id, e.seq, e.type, e.product_id,
           jsonb_build_object('id', e.id, 'type', e.type, 'created_at', e.at,
                              'data', e.data || jsonb_build_object('seq', e.seq)), e.at
    from (
        select gen_random_uuid() as id, n.reservation_id, n.product_id, now() as at,
               coalesce((select max(x.seq) from order_event x where x.reservation_id = n.reservation_id), 0) + 1 as seq,
               case n.status when 'pending_payment' then 'order.confirmed' else 'order.' || n.status end as type,
               jsonb_strip_nulls(jsonb_build_object(
                   'order_id', n.order_id, 'reservation_id', n.reservation_id,
                   'product_id', n.product_id, 'user_id', n.user_id, 'status', n.status,
                   'price_cents', p.price_cents, 'reserved_at', n.reserved_at,
                   'expires_at', n.expires_at, 'paid_at', n.paid_at, 'closed_at', n.closed_at,
                   'payment_reference', n.payment_reference, 'amount_cents', n.paid_amount_cents)) as data
        from unnest(changed) as n
        join product p on p.product_id = n.product_id
    ) e
$$;

-- Statement-level triggers with transition tables: a batch of 200 new orders adds its 200
-- events in one insert.
create or replace function seckill_order_events() returns trigger language plpgsql as $$
begin
    if tg_op = 'INSERT' then
        perform seckill_add_order_events(array(select n::orders from new_rows n));
    else
        perform seckill_add_order_events(array(
            select n::orders from new_rows n join old_rows o on o.order_id = n.order_id
            where o.status <> n.status));
    end if;
    return null;
end $$;

create or replace function seckill_rejection_events() returns trigger language plpgsql as $$
begin
    insert into order_event (event_id, reservation_id, seq, type, product_id, body, created_at)
    select e.id, e.reservation_id, e.seq, 'order.rejected', e.product_id,
           jsonb_build_object('id', e.id, 'type', 'order.rejected', 'created_at', e.at,
                              'data', e.data || jsonb_build_object('seq', e.seq)), e.at
    from (
        select gen_random_uuid() as id, n.reservation_id, n.product_id, now() as at,
               coalesce((select max(x.seq) from order_event x where x.reservation_id = n.reservation_id), 0) + 1 as seq,
               jsonb_build_object(
                   'order_id', null, 'reservation_id', n.reservation_id,
                   'product_id', n.product_id, 'user_id', n.user_id, 'status', 'rejected',
                   'price_cents', p.price_cents, 'reason', n.reason) as data
        from new_rows n
        join product p on p.product_id = n.product_id
    ) e;
    return null;
end $$;

create or replace trigger orders_created_events after insert on orders
    referencing new table as new_rows
    for each statement execute function seckill_order_events();
create or replace trigger orders_changed_events after update on orders
    referencing old table as old_rows new table as new_rows
    for each statement execute function seckill_order_events();
create or replace trigger rejection_events after insert on rejection
    referencing new table as new_rows
    for each statement execute function seckill_rejection_events();
