-- The currency of a product's price (ISO 4217, e.g. EUR): `price_cents` is in its minor unit.
-- Products created before it existed take USD, the default of SECKILL_CURRENCY.
alter table product add column if not exists currency text not null default 'USD'
    constraint product_currency_check check (currency ~ '^[A-Z]{3}$');

-- Order events carry it beside the price.
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
                   'price_cents', p.price_cents, 'currency', p.currency, 'reserved_at', n.reserved_at,
                   'expires_at', n.expires_at, 'paid_at', n.paid_at, 'closed_at', n.closed_at,
                   'payment_reference', n.payment_reference, 'amount_cents', n.paid_amount_cents)) as data
        from unnest(changed) as n
        join product p on p.product_id = n.product_id
    ) e
$$;

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
                   'price_cents', p.price_cents, 'currency', p.currency, 'reason', n.reason) as data
        from new_rows n
        join product p on p.product_id = n.product_id
    ) e;
    return null;
end $$;
