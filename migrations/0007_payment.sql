-- A payment the storefront's backend recorded (`POST /api/v1/orders/{order_id}/payment`): its
-- reference at the payment provider and the amount paid. One reference pays one order: a retry
-- with it answers the same order, and it cannot pay a second one.
alter table orders add column if not exists payment_reference text;
alter table orders add column if not exists paid_amount_cents bigint;
create unique index if not exists orders_payment_reference_key on orders (payment_reference);
